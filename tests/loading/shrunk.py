"""Shrunk copies of the shipped full-size configs: the same architecture and vocabulary, small widths and depths.

``shrink(data, hidden=64, layers=2)`` keeps every field a family reads (token ids, rope kind, vocab size,
vision patch sizes) and scales the widths, depths and expert counts down, so a ``random:`` build of the
result is the shipped architecture at test size. ``write_shrunk(name, dir)`` writes one to a file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "assets" / "configs"
SHIPPED = ("autoglm-phone-9b", "glm-4.1v-9b-thinking", "qwen2.5-vl-7b-instruct", "qwen2.5-omni-7b-thinker",
           "qwen3-vl-30b-a3b-instruct")


def _text(c: dict, hidden: int, layers: int, experts: int) -> None:
    heads = 4
    c.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2)
    head_dim = hidden // heads
    if "head_dim" in c:
        c["head_dim"] = head_dim
    if "intermediate_size" in c:
        c["intermediate_size"] = 2 * hidden
    if "moe_intermediate_size" in c:
        c["moe_intermediate_size"] = hidden
    for key in ("num_experts", "n_routed_experts"):
        if key in c:
            c[key] = experts
    if "num_experts_per_tok" in c:
        c["num_experts_per_tok"] = 2
    if "max_window_layers" in c:
        c["max_window_layers"] = layers
    rope = c.get("rope_scaling") or c.get("rope_parameters")
    if rope and "mrope_section" in rope:  # the three M-RoPE sections must cover the rotary half of a head
        half = int(head_dim * c.get("partial_rotary_factor", 1.0)) // 2
        rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]


def shrink(data: dict, hidden: int = 64, layers: int = 2, experts: int = 4, vision_hidden: int = 32,
           vision_depth: int = 1) -> dict:
    d = copy.deepcopy(data)
    if d["model_type"] == "autoglm":
        d.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=hidden // 4, intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_experts=experts,
                 moe_layers=list(range(layers)), vision_model="vit-tiny", image_size=64, patch_size=16,
                 vision_depth=vision_depth, vision_embed_dim=64, vision_num_heads=2, audio_hidden_size=64,
                 audio_layers=1, audio_heads=2, adapter_rank=16)
        return d
    _text(d.get("text_config", d), hidden, layers, experts)
    vision = d["vision_config"]
    vision.update(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden, num_heads=2,
                  out_hidden_size=hidden)
    for key, value in (("embed_dim", vision_hidden), ("fullatt_block_indexes", [0]), ("deepstack_visual_indexes", [0]),
                       ("num_position_embeddings", 64)):
        if key in vision:
            vision[key] = value
    if "audio_config" in d:
        d["audio_config"].update(d_model=32, encoder_layers=1, num_hidden_layers=1, encoder_attention_heads=2,
                                 encoder_ffn_dim=32, output_dim=hidden)
    return d


def write_shrunk(name: str, directory: Path, **sizes) -> Path:
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(shrink(json.loads((CONFIGS / f"{name}.json").read_text()), **sizes), indent=1))
    return path
