"""What the engine needs to know about an architecture: the interface every family fills in.

Where image tokens sit and on what grid, which modules route experts, which
attention modules the focus probe plugs into, the think-tag format, and how
thinking is switched on and off. Only the engine reads these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..events import Message


@dataclass
class Prepared:
    """A prompt ready for the model, and where each image / recording sits in it."""

    inputs: dict  # tensors for model.forward
    image_spans: list
    audio_spans: list
    modality: "np.ndarray"  # (T,) 0 text, 1 image, 2 audio per prompt position
    thinking_open: bool = False  # the rendered prompt ends inside an open think block (ModelFamily.opens_thinking)


@dataclass
class ModelFamily:
    name: str
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_tags: tuple[str, str] = ("<answer>", "</answer>")
    hears_audio: bool = True

    # ------------------------------------------------------------------ what each family describes
    def begin(self, model) -> None:
        """Reset per-request model state before a prefill (nothing by default)."""

    def forward_kwargs(self, memory_state) -> dict:
        """Extra keyword arguments for model.forward (none by default)."""
        return {}

    @staticmethod
    def read_route(module, args, output) -> tuple:
        """A router forward -> (experts (N, k), weights (N, k), kept (N, k) bool)."""
        raise NotImplementedError

    def attention_modules(self, model) -> list:
        raise NotImplementedError

    def routers(self, model) -> list:
        """(layer index, router module) for every MoE layer; empty for a dense model."""
        raise NotImplementedError

    def num_experts(self, model) -> tuple[int, int]:
        """(experts per layer, experts per token)."""
        raise NotImplementedError

    def num_layers(self, model) -> int:
        raise NotImplementedError

    def default_focus(self, model) -> tuple[str, tuple[int, int] | None]:
        """(aggregation rule, [start, end) layers or None for all)."""
        raise NotImplementedError

    def stop_ids(self, processor) -> set[int]:
        raise NotImplementedError

    def banned_ids(self, processor) -> list[int]:
        raise NotImplementedError

    def count_tokens(self, processor, messages: list[Message], enable_thinking: bool) -> int:
        """Prompt length of ``messages``; by default that of the prepared prompt (a family with a cheaper
        count, one that skips the pixels, overrides it)."""
        return int(self.prepare(processor, messages, enable_thinking).inputs["input_ids"].shape[1])

    def prepare(self, processor, messages: list[Message], enable_thinking: bool) -> Prepared:
        raise NotImplementedError

    # ------------------------------------------------------------------ prompts
    def opens_thinking(self, text: str) -> bool:
        """Whether a rendered prompt ends inside an open think block: its last non-blank text is the open tag
        (Qwen3 Thinking-2507 and QwQ end with ``<think>`` and a newline, GLM-4.7 with ``<think>``), so the
        output starts in the reasoning. Only the end counts: a user's literal ``<think>`` earlier opens nothing."""
        return text.rstrip().endswith(self.think_open)

    @staticmethod
    def template_messages(messages: list[Message]) -> tuple[list[dict], list[Image.Image], list[np.ndarray]]:
        """Engine messages (audio already 16 kHz mono) -> chat-template dicts + media in prompt order."""
        out, images, audios = [], [], []
        for m in messages:
            parts = []
            for img in m.images:
                parts.append({"type": "image"})
                images.append(img)
            for aud in m.audios:
                parts.append({"type": "audio"})
                audios.append(aud.samples)
            if m.text:
                parts.append({"type": "text", "text": m.text})
            out.append({"role": m.role, "content": parts})
        return out, images, audios
