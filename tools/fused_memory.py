"""Peak host memory of an int4 load of a fused-expert MoE checkpoint: split after the load (old) vs streamed.

    python -m tools.fused_memory               # 8 layers (~300 MiB checkpoint)
    python -m tools.fused_memory --layers 16   # 16 layers (~600 MiB)

Saves a random-weight Qwen3-VL-MoE-style checkpoint in bf16 safetensors, then loads it int4 on the CPU
twice, each in a fresh subprocess, and prints a table (docs/PERFORMANCE.md) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from autoglm_app.families.hf import HF_FAMILIES
from autoglm_app.loading.fused_experts import SplitExperts, check_split, module_bytes, split_fused_experts, \
    streamed_expert_split
from autoglm_app.loading.quantize import quantization_config
from autoglm_app.memory import anon_rss_bytes, peak_rss_bytes, rss_bytes

ROOT = Path(__file__).resolve().parent.parent


def build_measure_checkpoint(path: str, layers: int = 8, experts: int = 16, hidden: int = 512,
                             moe_intermediate: int = 768) -> str:
    """A random-weight Qwen3-VL-MoE-style checkpoint (bf16 safetensors), text-heavy: experts dominate the bytes."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=moe_intermediate,
                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=1000, video_token_id=1001,
                              vision_start_token_id=1002, vision_end_token_id=1003)
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return str(path)


def load_int4(path: str, streamed: bool) -> nn.Module:
    """The loader's int4 path for a fused-expert checkpoint, with (new) or without (old) the streamed split."""
    from transformers import AutoModelForImageTextToText

    qconfig = quantization_config("int4", keep_16bit=HF_FAMILIES["qwen3_vl_moe"].keep_16bit)
    kwargs = dict(dtype=torch.float16, quantization_config=qconfig, device_map={"": "cpu"}, use_safetensors=True)
    if streamed:
        with streamed_expert_split(torch.float16):
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    split_fused_experts(model, torch.float16)  # the old path's conversion; a no-op after a streamed load
    check_split(model)
    return model.eval()


def _measure_one(path: str, streamed: bool) -> dict:
    """Run in a fresh process: load, then report peak RSS (VmHWM) and the sampled peak anonymous RSS."""
    # the libraries first, so the baseline holds them and the peaks above it are the load's own
    import bitsandbytes  # noqa: F401
    import transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe  # noqa: F401
    from transformers import AutoModelForImageTextToText  # noqa: F401

    peak = {"anon": anon_rss_bytes() or 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], anon_rss_bytes() or 0)
            time.sleep(0.002)

    base = {"rss": rss_bytes() or 0, "anon": anon_rss_bytes() or 0}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    model = load_int4(path, streamed)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    experts = [m for m in model.modules() if isinstance(m, SplitExperts)]
    mib = 2**20
    return {"streamed": streamed, "seconds": round(seconds, 2), "baseline_rss_mib": base["rss"] / mib,
            "end_anon_mib": (anon_rss_bytes() or 0) / mib,
            "baseline_anon_mib": base["anon"] / mib, "peak_rss_mib": peak_rss_bytes() / mib,
            "peak_anon_mib": peak["anon"] / mib, "experts_4bit_bytes": sum(module_bytes(m) for m in experts),
            "model_bytes": module_bytes(model)}


def measure(layers: int = 8, experts: int = 16, hidden: int = 512, moe_intermediate: int = 768) -> list[dict]:
    """Build the checkpoint once, then load it with the old and the new path, each in its own subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "moe")
        build_measure_checkpoint(path, layers, experts, hidden, moe_intermediate)
        files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
        size = sum(os.path.getsize(f) for f in files)
        fused16 = layers * experts * 3 * hidden * moe_intermediate * 2
        rows = []
        for streamed in (False, True):
            code = ("import json,sys; from tools.fused_memory import _measure_one; "
                    f"print('RESULT', json.dumps(_measure_one({path!r}, {streamed})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "TQDM_DISABLE": "1"}, cwd=ROOT)
            line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
            row = json.loads(line[len("RESULT "):])
            row.update(checkpoint_mib=size / 2**20, experts_16bit_mib=fused16 / 2**20)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--out", type=Path, default=Path("bench-results") / "fused_experts.json")
    args = p.parse_args(argv)
    rows = measure(args.layers, args.experts, args.hidden, args.moe_intermediate)
    print(f"checkpoint {rows[0]['checkpoint_mib']:.0f} MiB bf16 safetensors; fused experts "
          f"{rows[0]['experts_16bit_mib']:.0f} MiB at 16-bit -> {rows[0]['experts_4bit_bytes'] / 2**20:.0f} MiB NF4")
    print("| path | peak RSS (VmHWM) | peak anonymous RSS | baseline RSS / anon | peak anon above baseline "
          "| load s | model held |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'streamed (new)' if r['streamed'] else 'split after load (old)'} | {r['peak_rss_mib']:.0f} MiB | "
              f"{r['peak_anon_mib']:.0f} MiB | {r['baseline_rss_mib']:.0f} / {r['baseline_anon_mib']:.0f} MiB | "
              f"{r['peak_anon_mib'] - r['baseline_anon_mib']:.0f} MiB | {r['seconds']:.1f} | "
              f"{r['model_bytes'] / 2**20:.0f} MiB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
