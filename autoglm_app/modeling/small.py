"""A small random-weight AutoGLM model with a locally trained tokenizer, for tests and first runs.

Nothing here is downloaded: the tokenizer is trained on a built-in English corpus and the
weights are random, so answers are noise, but every code path (vision, speech, MoE routing,
focus, quantization) runs for real.
"""

from __future__ import annotations

import torch

from .configuration_autoglm import AutoGLMConfig
from .modeling_autoglm import AutoGLMForConditionalGeneration
from .processing_autoglm import AutoGLMProcessor, build_tokenizer

CORPUS = [
    "There are two shapes: a red circle at the top left and a blue square at the center.",
    "The triangle is green. The yellow square is at the bottom right.",
    "How many shapes are there? Is there a red circle? Where is the blue triangle?",
    "I am AutoGLM-Phone-Tiny, a small multimodal model. I can see images and hear speech.",
    "我是AutoGLM-Phone-Tiny，一个小型多模态模型。你是谁？",
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789",
    "What do you see in this picture? Describe the image. Who are you?",
]

SMALL_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_experts=4,
    num_experts_per_tok=2,
    vision_model="vit-tiny",
    image_size=64,
    patch_size=16,
    vision_depth=2,
    vision_embed_dim=64,
    vision_num_heads=2,
    audio_hidden_size=64,
    audio_layers=1,
    audio_heads=2,
    adapter_rank=16,
)


def build_small(seed: int = 0, **overrides) -> tuple[AutoGLMForConditionalGeneration, AutoGLMProcessor]:
    """Random-weight model + processor whose special-token ids match the config."""
    tokenizer = build_tokenizer(CORPUS * 4, vocab_size=overrides.get("vocab_size", SMALL_CONFIG["vocab_size"]))
    cfg = {**SMALL_CONFIG, **overrides}
    cfg["vocab_size"] = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = AutoGLMConfig(
        **cfg,
        image_token_id=ids("<|image|>"),
        audio_token_id=ids("<|audio|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoGLMForConditionalGeneration(config).eval()
    return model, AutoGLMProcessor.from_config(config, tokenizer)


def save_small(path: str, seed: int = 0, **overrides) -> str:
    model, processor = build_small(seed, **overrides)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
