"""The AutoGLM-Phone family: the project's own architecture (``autoglm_app.modeling``).

Its attention modules take a ``focus_probe`` directly, its routers return (logits, experts,
weights, kept), and it carries recurrent memory slots across turns.
"""

from __future__ import annotations

import numpy as np

from ..events import Message
from .base import ModelFamily, Prepared


class AutoGLMFamily(ModelFamily):
    # ------------------------------------------------------------------ forward passes
    def forward_kwargs(self, memory_state) -> dict:
        """Extra keyword arguments for model.forward: AutoGLM carries its memory slots across turns."""
        return {"memory_state": memory_state}

    @staticmethod
    def read_route(module, args, output) -> tuple:
        """A router forward -> (experts (N, k), weights (N, k), kept (N, k) bool). AutoGLMRouter returns all four."""
        _, experts, weights, kept = output
        return experts, weights, kept

    # ------------------------------------------------------------------ model structure
    def attention_modules(self, model) -> list:
        return [layer.self_attn for layer in model.model.layers]

    def routers(self, model) -> list:
        return [(i, moe.router) for i, moe in model.moe_blocks()]

    def num_experts(self, model) -> tuple[int, int]:
        return model.config.num_experts, model.config.num_experts_per_tok

    def num_layers(self, model) -> int:
        return model.config.num_hidden_layers

    def default_focus(self, model) -> tuple[str, tuple[int, int] | None]:
        layers = model.config.focus_layers
        return model.config.focus_aggregation, (tuple(layers) if layers else None)

    def stop_ids(self, processor) -> set[int]:
        tok = processor.tokenizer
        ids = {tok.eos_token_id}
        for t in ("<|user|>", "<|system|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id:
                ids.add(i)
        return {i for i in ids if i is not None}

    def banned_ids(self, processor) -> list[int]:
        """Tokens the model must never generate: media placeholders and their markers, padding."""
        tok = processor.tokenizer
        names = ("<|image|>", "<|audio|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_audio|>",
                 "<|end_of_audio|>", "<|pad|>", "<|bos|>")
        ids = [tok.convert_tokens_to_ids(n) for n in names]
        return [i for i in ids if isinstance(i, int) and i != tok.unk_token_id and i is not None]

    def count_tokens(self, processor, messages: list[Message], enable_thinking: bool) -> int:
        """Prompt length after placeholder expansion, without preprocessing any pixels."""
        dicts, images, audios = self.template_messages(messages)
        text = processor.apply_chat_template(dicts, enable_thinking=enable_thinking)
        n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        rows, cols = processor.grid
        n += len(images) * (rows * cols + 1)  # placeholder -> begin + patches + end
        n += sum(processor.audio_frames(len(a)) + 1 for a in audios)
        return n

    def prepare(self, processor, messages: list[Message], enable_thinking: bool) -> Prepared:
        dicts, images, audios = self.template_messages(messages)
        text = processor.apply_chat_template(dicts, enable_thinking=enable_thinking)
        enc = processor(text, images=images, audios=audios)
        image_spans, audio_spans = enc.pop("image_spans"), enc.pop("audio_spans")
        ids = enc["input_ids"][0].numpy()
        modality = np.zeros(len(ids), np.int64)
        modality[ids == processor.image_token_id] = 1
        modality[ids == processor.audio_token_id] = 2
        return Prepared(enc, image_spans, audio_spans, modality, self.opens_thinking(text))


AUTOGLM = AutoGLMFamily("autoglm")
