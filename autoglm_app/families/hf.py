"""Model families of real transformers checkpoints: GLM-4.1V / AutoGLM-Phone-9B, GLM-4.5V, Qwen2.5-VL,
Qwen3-VL (dense and MoE), Qwen2.5-Omni and Qwen3-Omni-MoE.

Qwen-Omni: a checkpoint's top-level config is the whole Omni model (thinker + talker + token2wav /
code2wav). Only the **Thinker** is loaded (``Qwen2_5OmniThinkerForConditionalGeneration`` /
``Qwen3OmniMoeThinkerForConditionalGeneration``: text out of text, images and audio), built from
``config.thinker_config`` with the ``thinker.``-prefixed weights (transformers' own key mapping strips
the prefix; talker / token2wav weights are never read). Speech output (the talker) is out of scope. A
thinker-only checkpoint (model_type ``qwen2_5_omni_thinker`` / ``qwen3_omni_moe_thinker``) loads too.
The Omni models hear audio natively: a recording goes, 16 kHz mono, through the checkpoint's own
processor (``WhisperFeatureExtractor`` log-mel features) into the model's audio encoder, never through
speech-to-text; each recording's audio pad tokens form its focus map over time.

Each ``HFFamily`` says, from data rather than code paths: where the decoder layers sit, which modules
stay 16-bit under INT4, the special tokens that stop or must never be generated, the think / answer
tags, how thinking is switched off when a chat template ignores ``enable_thinking``, and whether the
model hears audio. The shared behaviour is the same for all of them:

- image spans come from the processor's own outputs: each run of the image pad token in
  ``input_ids`` is one image, on the grid ``image_grid_thw`` / merge size (so the map is on the
  merged-token grid the LLM actually attends to);
- focus: the text attention layers dispatch through transformers' ``AttentionInterface``; the family
  switches the *text* config to ``probe_sdpa`` (or ``probe_eager``), registered here, which runs the
  real kernel and then hands the post-rotary (M-RoPE included) query and the cached keys to the
  FocusProbe attached to that module, if any;
- audio spans likewise: each run of the audio pad token is one recording, ``AudioSpan(start, frames)``
  over its encoder frames in sequence order;
- routing: every MoE gate of these families (``*TopKRouter``) returns ``(logits, weights, indices)``,
  which ``read_route`` turns into the RoutingProbe's (experts, weights, kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..modeling.processing_autoglm import AudioSpan, ImageSpan
from ..events import Message
from .base import ModelFamily, Prepared
from .probe_attention import install_probe_attention

# ----------------------------------------------------------------------------- the family description


def _token_id(tok, name: str) -> int | None:
    i = tok.convert_tokens_to_ids(name)
    if not isinstance(i, int) or i is None or i == tok.unk_token_id:
        return None
    return i


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


@dataclass
class HFFamily(ModelFamily):
    """A transformers-native multimodal model. Fields are data; the methods are shared."""

    model_types: tuple[str, ...] = ()
    layers_path: str = "model.language_model.layers"  # the decoder layers
    rope_owner: str | None = "model"  # the module caching M-RoPE ``rope_deltas``
    keep_16bit: tuple[str, ...] = ("visual", "audio_tower", "embed_tokens", "lm_head", "gate")
    image_token: str = "<|image_pad|>"
    audio_token: str | None = None
    stop_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
    media_tokens: tuple[str, ...] = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    thinking_off_suffix: str = "<think>\n\n</think>\n\n"  # appended when a template ignores enable_thinking
    moe: bool = False
    fused_experts: bool = False  # experts stored as 3-D tensors (gate_up_proj / down_proj)
    auto_class: str = "AutoModelForImageTextToText"
    # a composite checkpoint (Qwen-Omni: thinker + talker) loads only this part of its config
    # (the model class is then ``auto_class``, a transformers class name, built from that sub-config)
    sub_config: str | None = None

    # ------------------------------------------------------------------ forward passes
    def begin(self, model) -> None:
        # Qwen/GLM VL models cache the M-RoPE offset of the last prompt; a text-only prompt after an image
        # prompt would otherwise decode with the stale offset.
        owner = _get(model, self.rope_owner) if self.rope_owner else None
        if owner is not None and hasattr(owner, "rope_deltas"):
            owner.rope_deltas = None

    @staticmethod
    def read_route(module, args, output) -> tuple:
        _, weights, experts = output  # (N, E) logits, (N, k) weights, (N, k) indices
        return experts, weights, torch.ones_like(experts, dtype=torch.bool)

    # ------------------------------------------------------------------ model structure
    def layers(self, model) -> list:
        return list(_get(model, self.layers_path))

    def attention_modules(self, model) -> list:
        modules = [layer.self_attn for layer in self.layers(model)]
        install_probe_attention(modules)
        return modules

    def routers(self, model) -> list:
        if not self.moe:
            return []
        out = []
        for i, layer in enumerate(self.layers(model)):
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(gate, "top_k"):  # dense layers (GLM's first_k_dense) have none
                out.append((i, gate))
        return out

    def num_experts(self, model) -> tuple[int, int]:
        routers = self.routers(model)
        if not routers:
            return 0, 0
        gate = routers[0][1]
        E = getattr(gate, "num_experts", None) or getattr(gate, "n_routed_experts", None) or gate.weight.shape[0]
        return int(E), int(gate.top_k)

    def num_layers(self, model) -> int:
        return len(self.layers(model))

    def default_focus(self, model) -> tuple[str, tuple[int, int] | None]:
        return "mean", None

    def stop_ids(self, processor) -> set[int]:
        tok = processor.tokenizer
        ids = {tok.eos_token_id, *(_token_id(tok, t) for t in self.stop_tokens)}
        return {i for i in ids if i is not None}

    def banned_ids(self, processor) -> list[int]:
        tok = processor.tokenizer
        names = (*self.media_tokens, *((self.audio_token,) if self.audio_token else ()))
        return [i for i in (_token_id(tok, n) for n in names) if i is not None and i != tok.eos_token_id]

    # ------------------------------------------------------------------ prompts
    def render(self, processor, dicts: list[dict], enable_thinking: bool) -> str:
        template = getattr(processor, "chat_template", None)
        # a template that has no thinking switch gets none (transformers would log a warning on every request)
        switch = {"enable_thinking": enable_thinking} if "enable_thinking" in str(template or "enable_thinking") else {}
        text = processor.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True, **switch)
        if not enable_thinking and self.think_close not in text[-len(self.thinking_off_suffix) - 8:]:
            # the template ignored the switch: close an empty think block (only close it when the template
            # opened one itself, as Qwen3-VL-Thinking's does, rather than nest a second open tag)
            suffix = self.thinking_off_suffix
            if suffix and self.opens_thinking(text):
                suffix = suffix.removeprefix(self.think_open).lstrip("\n")
            text += suffix
        return text

    def prepare(self, processor, messages: list[Message], enable_thinking: bool) -> Prepared:
        dicts, images, audios = self.template_messages(messages)
        text = self.render(processor, dicts, enable_thinking)
        kwargs = {"images": images} if images else {}
        if audios:  # 16 kHz mono float32 (inputs.validate_request): the feature extractor checks the rate
            kwargs.update(audio=audios, sampling_rate=16000)
        enc = dict(processor(text=[text], return_tensors="pt", **kwargs))
        ids = enc["input_ids"][0].numpy()
        modality = np.zeros(len(ids), np.int64)

        image_spans = []
        image_id = _token_id(processor.tokenizer, self.image_token)
        if images:
            runs = _runs(ids == image_id)
            merge = processor.image_processor.merge_size
            grids = enc["image_grid_thw"].tolist()
            if len(runs) != len(grids):
                raise RuntimeError(f"{len(grids)} images but {len(runs)} runs of {self.image_token} in the prompt")
            for (start, n), (t, h, w) in zip(runs, grids):
                rows, cols = t * h // merge, w // merge
                if rows * cols != n:
                    raise RuntimeError(f"image at {start}: {n} tokens, grid {t}x{h}x{w} / merge {merge}")
                image_spans.append(ImageSpan(start, rows, cols))
                modality[start : start + n] = 1
        audio_spans = []
        if audios and self.audio_token:
            # one run of the audio pad token per recording (the templates wrap each in audio bos / eos),
            # one token per audio-encoder frame, in time order
            runs = _runs(ids == _token_id(processor.tokenizer, self.audio_token))
            if len(runs) != len(audios):
                raise RuntimeError(f"{len(audios)} recordings but {len(runs)} runs of {self.audio_token} in the prompt")
            for start, n in runs:
                audio_spans.append(AudioSpan(start, n))
                modality[start : start + n] = 2
        return Prepared(enc, image_spans, audio_spans, modality, self.opens_thinking(text))


def _get(obj, path: str | None):
    for part in (path or "").split("."):
        if not part:
            continue
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# ----------------------------------------------------------------------------- the families

GLM_TOKENS = dict(
    image_token="<|image|>",
    stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
    media_tokens=("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                  "<|end_of_video|>"),
    thinking_off_suffix="<think></think>\n",
    answer_tags=("<answer>", "</answer>"),
)
FAMILIES = [
    # GLM-4.1V-9B-Thinking and AutoGLM-Phone-9B
    HFFamily("glm4v", model_types=("glm4v",), hears_audio=False, **GLM_TOKENS),
    # GLM-4.5V: experts fused; the first `first_k_dense_replace` layers are dense
    HFFamily("glm4v_moe", model_types=("glm4v_moe",), hears_audio=False, moe=True, fused_experts=True, **GLM_TOKENS),
    HFFamily("qwen2_5_vl", model_types=("qwen2_5_vl",), hears_audio=False),
    HFFamily("qwen3_vl", model_types=("qwen3_vl",), hears_audio=False),
    HFFamily("qwen3_vl_moe", model_types=("qwen3_vl_moe",), hears_audio=False, moe=True, fused_experts=True),
    # Qwen2.5-Omni-3B / 7B: the Thinker only (no speech output). Not a thinking model: with thinking off nothing
    # is appended (its template has no think block), with thinking on the splitter sees it skip thinking.
    HFFamily("qwen2_5_omni", model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"), hears_audio=True,
             image_token="<|IMAGE|>", audio_token="<|AUDIO|>",
             media_tokens=("<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|audio_bos|>",
                           "<|audio_eos|>"),
             thinking_off_suffix="", auto_class="Qwen2_5OmniThinkerForConditionalGeneration",
             sub_config="thinker_config"),
    # Qwen3-Omni-30B-A3B (Instruct / Thinking / Captioner): the Thinker only; fused 3-D experts, like Qwen3-VL-MoE.
    # The Thinking checkpoint opens <think>; thinking off is enable_thinking=False to the template, or an empty
    # think block appended when the template ignores it (as for the Qwen3 families).
    HFFamily("qwen3_omni_moe", model_types=("qwen3_omni_moe", "qwen3_omni_moe_thinker"), hears_audio=True,
             audio_token="<|audio_pad|>",
             media_tokens=("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|audio_start|>",
                           "<|audio_end|>"),
             moe=True, fused_experts=True, auto_class="Qwen3OmniMoeThinkerForConditionalGeneration",
             sub_config="thinker_config"),
]
HF_FAMILIES: dict[str, HFFamily] = {t: f for f in FAMILIES for t in f.model_types}
