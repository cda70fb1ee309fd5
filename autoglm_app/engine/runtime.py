"""What the generation loop knows of the loaded model, asked of its family once when the Engine starts.

Stop and banned token ids, the attention modules the focus probe plugs into, the routers, the
expert and layer counts, the default focus rule and the input device do not change between
requests, so no request asks the family again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..events import Options, aggregate_layers
from ..families.base import ModelFamily


@dataclass(frozen=True)
class Runtime:
    model: torch.nn.Module
    processor: object
    family: ModelFamily
    context_limit: int
    device: torch.device  # where input ids go (the input embeddings' device)
    stop_ids: frozenset[int]  # a sampled stop id ends the answer
    stop_list: list[int]  # the same, for indexing logits
    banned_ids: list[int]  # never sampled (media placeholders, padding)
    attention_modules: list  # one per decoder layer, each with a ``focus_probe`` slot
    routers: list  # (layer index, router module) per MoE layer; empty for a dense model
    num_experts: int  # per layer (0 for a dense model)
    top_k: int  # experts per token
    num_layers: int  # decoder layers
    focus_aggregation: str  # the model's default focus rule
    focus_layers: tuple[int, int] | None  # the model's default [start, end) layers; None = all

    @classmethod
    def build(cls, model: torch.nn.Module, processor, family: ModelFamily, context_limit: int) -> "Runtime":
        """Ask ``family`` everything the loop needs of ``model``, once (for HF families this also switches
        the text attention to the probed kernel, see families.probe_attention)."""
        stop = family.stop_ids(processor)
        experts, top_k = family.num_experts(model)
        rule, layers = family.default_focus(model)
        return cls(
            model=model, processor=processor, family=family, context_limit=context_limit,
            device=model.get_input_embeddings().weight.device,
            stop_ids=frozenset(stop), stop_list=sorted(stop), banned_ids=family.banned_ids(processor),
            attention_modules=family.attention_modules(model), routers=family.routers(model),
            num_experts=experts, top_k=top_k, num_layers=family.num_layers(model),
            focus_aggregation=rule, focus_layers=layers,
        )

    def focus_rule(self, opts: Options) -> tuple[str, tuple[int, int] | None]:
        """The request's focus rule and layer range (its own, else the model's); a bad one fails here,
        before any work."""
        rule, layers = opts.focus_aggregation or self.focus_aggregation, opts.focus_layers or self.focus_layers
        aggregate_layers(np.zeros((self.num_layers, 1)), rule, layers)
        return rule, layers
