"""Fused 3-D MoE experts (transformers 5 leaves them 16-bit under bitsandbytes) become per-expert NF4 layers:
same routing and outputs, about a quarter of the bytes, and the app's int4 load of a fused-expert
checkpoint holds no 16-bit expert weight."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from tests import tiny_families as tiny
import logging

import pytest

from autoglm_app.loading.fused_experts import (
    SplitExperts,
    module_bytes,
    split_fused_experts,
    streamed_expert_split,
)
from autoglm_app.loading.checkpoints import load_model
from tools.fused_memory import load_int4


def _fused(E=8, H=256, I=256):
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    cfg = Qwen3VLMoeTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)
    torch.manual_seed(0)
    fused = Qwen3VLMoeTextExperts(cfg)
    with torch.no_grad():
        fused.gate_up_proj.normal_(0, H**-0.5)
        fused.down_proj.normal_(0, I**-0.5)
    return fused.half()


def test_split_experts_match_the_fused_forward():
    fused = _fused()
    x = torch.randn(16, 256, dtype=torch.float16)
    idx = torch.randint(0, 8, (16, 2))
    w = torch.rand(16, 2, dtype=torch.float16)
    want = fused.float()(x.float(), idx, w.float())
    split = SplitExperts(_fused())
    got = split(x, idx, w).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.25, rel  # NF4 weight error through three projections; a wrong expert gives ~1.4

    # exact wiring: the fused forward on the split layers' own dequantized weights gives the same output
    deq = _fused()
    with torch.no_grad():
        for e in range(8):
            for mine, theirs in ((deq.gate_up_proj, split.gate_up_proj[e]), (deq.down_proj, split.down_proj[e])):
                mine[e] = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    ref = deq.float()(x.float(), idx, w.float())
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in [*split.gate_up_proj, *split.down_proj])


def test_split_experts_hold_under_30_percent_of_fp16_bytes():
    fused = _fused()
    fp16 = module_bytes(fused)
    holder = torch.nn.Module()
    holder.experts = fused
    assert split_fused_experts(holder) == 1
    nf4 = module_bytes(holder.experts)
    assert fp16 == 8 * 3 * 256 * 256 * 2
    assert nf4 < 0.30 * fp16, (nf4, fp16)


@pytest.mark.parametrize("build", [tiny.build_qwen3_vl_moe, tiny.build_qwen3_omni_moe])
def test_int4_load_of_a_fused_moe_checkpoint_quantizes_every_expert(tmp_path, build, caplog):
    path = build(tmp_path / "moe", layers=2, experts=4)
    with caplog.at_level(logging.INFO, logger="autoglm_app.loading.checkpoints"):
        loaded = load_model(path, quantize="int4")
    # streamed: every fused module was packed while the checkpoint was read, none was left for afterwards
    assert "fused experts: 2 modules packed to 4-bit while loading, 0 after" in caplog.text
    layers = loaded.model.model.language_model.layers
    for layer in layers:
        assert isinstance(layer.mlp.experts, SplitExperts)
        assert not any(p.dim() == 3 for p in layer.mlp.parameters())
    experts_bytes = sum(module_bytes(layer.mlp.experts) for layer in layers)
    fp16_bytes = 2 * 4 * 3 * 64 * 64 * 2  # layers x experts x (gate, up, down) x H x I x 2 bytes
    assert experts_bytes < 0.5 * fp16_bytes, (experts_bytes, fp16_bytes)  # tiny: NF4 code books weigh in


def test_streamed_split_gives_the_same_model_as_splitting_after_the_load(tmp_path):
    """The streamed load (fused tensors packed as they are read) and the old path (16-bit load, then split) quantize
    the same tensors the same way: identical logits, every expert NF4, and no 16-bit fused tensor ever set."""
    path = tiny.build_qwen3_vl_moe(tmp_path / "moe", layers=2, experts=4)
    old = load_int4(path, streamed=False)
    with streamed_expert_split() as stats:
        from transformers import AutoModelForImageTextToText

        from autoglm_app.loading.quantize import quantization_config

        qconfig = quantization_config("int4", keep_16bit=("visual", "audio_tower", "embed_tokens", "lm_head", "gate"))
        new = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float16, quantization_config=qconfig,
                                                          device_map={"": "cpu"}).eval()
    assert stats == {"modules": 2, "tensors": 4, "bytes_16bit": 2 * 4 * 3 * 64 * 64 * 2}
    for model in (old, new):
        for layer in model.model.language_model.layers:
            assert isinstance(layer.mlp.experts, SplitExperts) and layer.mlp.experts.complete
            assert all(isinstance(m, bnb.nn.Linear4bit) for m in [*layer.mlp.experts.gate_up_proj,
                                                                   *layer.mlp.experts.down_proj])
        assert not any(p.is_meta or p.dim() == 3 for p in model.parameters())
    ids = torch.randint(0, 250, (1, 24))
    with torch.inference_mode():
        a, b = old(input_ids=ids).logits.float(), new(input_ids=ids).logits.float()
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    for x, y in zip(old.model.language_model.layers, new.model.language_model.layers):
        for p, q in zip(x.mlp.experts.parameters(), y.mlp.experts.parameters()):
            assert torch.equal(p, q)  # the same packed NF4 bytes


def test_streamed_split_leaves_other_loads_alone(tmp_path):
    """Outside a 4-bit load (here fp16) the hook passes everything through: the fused experts stay fused."""
    path = tiny.build_qwen3_vl_moe(tmp_path / "moe", layers=2, experts=4)
    from transformers import AutoModelForImageTextToText

    with streamed_expert_split() as stats:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float16, device_map={"": "cpu"})
    assert stats["tensors"] == 0
    assert model.model.language_model.layers[0].mlp.experts.gate_up_proj.dim() == 3


def test_fused_experts_imports_quantize_not_the_checkpoint_loader():
    """No import circle: packing experts needs the 4-bit knowledge (quantize), not checkpoint loading."""
    import subprocess
    import sys

    code = ("import sys, autoglm_app.loading.fused_experts; "
            "print('autoglm_app.loading.checkpoints' in sys.modules, 'autoglm_app.loading.quantize' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
