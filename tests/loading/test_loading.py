"""Loading: INT4 (NF4) mixed with 16-bit, accuracy against fp32, round trips, memory accounting, errors.

Everything runs on the CPU on tiny models built locally (bitsandbytes' 4-bit layers run on the CPU).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from PIL import Image

from autoglm_app.loading.checkpoints import ModelNotFoundError, load_model
from autoglm_app.loading.planning import build_on_meta, estimate_module_bytes
from autoglm_app.loading.quantize import (
    KEEP_16BIT,
    QuantizationError,
    default_quantize,
    guard_cpu_int4_packing,
    is_kept_16bit,
    linear4bit,
    quantization_config,
    verify_quantized,
)
from autoglm_app.modeling import AutoGLMForConditionalGeneration
from autoglm_app.modeling.small import build_small
from autoglm_app.modeling.summary import module_rows, total_bytes, total_parameters

SCENE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "scene1.png"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT = ("gate_proj", "up_proj", "down_proj")
LARGER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              num_experts=8, moe_intermediate_size=512)


def realistic_scale(model: AutoGLMForConditionalGeneration) -> AutoGLMForConditionalGeneration:
    """Give the random decoder trained-model-like scales so every layer matters to the logits.

    The default init (std 0.02) makes a 64-wide decoder almost the identity: the logits would
    be embeddings @ lm_head, both kept 16-bit, and an int4 test would test nothing. Instead:
    N(0,1) embeddings, Linear weights N(0, 1/fan_in) (unit gain), residual-branch outputs
    (o_proj, down_proj) scaled by 1/sqrt(2 L) as in GPT-2/Megatron. Logits then have std ~1
    and each layer's attention and experts change them substantially.
    """
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "vision_tower" not in name and "audio_tower" not in name:
                std = 1 / math.sqrt(module.in_features)
                if name.endswith(("o_proj", "down_proj")):
                    std /= math.sqrt(2 * n_layers)
                module.weight.normal_(0, std)
                if module.bias is not None:
                    module.bias.normal_(0, 0.02)
        model.model.embed_tokens.weight.normal_(0, 1)
    return model


def make_checkpoint(path, seed: int = 0, **overrides):
    model, processor = build_small(seed, **overrides)
    realistic_scale(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def image_prompt(processor) -> dict:
    image = Image.open(SCENE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see here?"}]}]
    inputs = processor(processor.apply_chat_template(messages), images=[image])
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0].float()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    model, processor = make_checkpoint(path)
    return path, model.eval(), processor


@pytest.fixture(scope="module")
def small_int4(small):
    path, _, _ = small
    return load_model(str(path), quantize="int4")


# ----------------------------------------------------------------------------- int4 layout


def test_int4_projections_are_4bit_and_kept_modules_16bit(small_int4):
    model = small_int4.model
    assert small_int4.quantize == "int4" and small_int4.device_map == {"": "cpu"}
    n_attn = n_expert = 0
    for layer in model.model.layers:
        for name in ATTENTION:
            assert isinstance(getattr(layer.self_attn, name), bnb.nn.Linear4bit), name
            n_attn += 1
        for expert in layer.mlp.experts:
            for name in EXPERT:
                proj = getattr(expert, name)
                assert isinstance(proj, bnb.nn.Linear4bit), name
                assert proj.weight.quant_state.quant_type == "nf4"
                assert proj.weight.quant_state.nested  # double quantization
                n_expert += 1
    cfg = model.config
    assert n_attn == 4 * cfg.num_hidden_layers
    assert n_expert == 3 * cfg.num_experts * cfg.num_hidden_layers

    kept = {
        "vision_tower": model.model.vision_tower,
        "audio_tower": model.model.audio_tower,
        "adapter": model.model.adapter,
        "embed_tokens": model.model.embed_tokens,
        "lm_head": model.lm_head,
        **{f"router{i}": layer.mlp.router for i, layer in enumerate(model.model.layers)},
    }
    for label, module in kept.items():
        for sub in module.modules():
            assert not isinstance(sub, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), label
        for pname, p in module.named_parameters():
            assert p.dtype == torch.float16, f"{label}.{pname} is {p.dtype}"
    assert model.model.layers[0].mlp.router.classifier.weight.dtype == torch.float16
    assert set(KEEP_16BIT) == {"vision_tower", "audio_tower", "adapter", "router", "embed_tokens", "lm_head"}
    assert verify_quantized(model, "int4") == n_attn + n_expert


def test_verify_quantized_catches_full_precision_projections(small):
    _, model, _ = small
    with pytest.raises(QuantizationError, match="unquantized"):
        verify_quantized(model, "int4")


def test_quantization_config_choices():
    q4 = quantization_config("int4")
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.float16
    q8 = quantization_config("int8")
    assert q8.load_in_8bit
    assert quantization_config("fp16") is None and quantization_config("fp32") is None
    with pytest.raises(ValueError, match="int4"):
        quantization_config("int3")
    assert default_quantize() == ("int4" if torch.cuda.is_available() else "fp32")
    assert is_kept_16bit("model.layers.3.mlp.router.classifier")
    assert not is_kept_16bit("model.layers.3.mlp.experts.0.gate_proj")


# ----------------------------------------------------------------------------- accuracy


def test_int4_logits_close_to_fp32(small, small_int4):
    _, ref_model, processor = small
    inputs = image_prompt(processor)
    ref = logits(ref_model, inputs)
    out = logits(small_int4.model, inputs)
    assert ref.std() > 0.5  # realistic_scale: logits vary; the decoder is not a near-identity

    # 1) The int4 path (bnb kernels, fp16 compute, fp16 kept modules) adds nothing beyond
    #    the weight rounding: an fp32 model holding the *dequantized* NF4 weights gives the
    #    same logits to < 1% (fp16 alone costs ~0.2% here).
    dequant = copy.deepcopy(ref_model)
    ref_modules = dict(dequant.named_modules())
    weight_errors = []
    for name, module in small_int4.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            target = ref_modules[name].weight.detach()
            weight_errors.append(float((w - target).norm() / target.norm()))
            target.copy_(w)
    path_error = (out - logits(dequant, inputs)).norm() / out.norm()
    assert path_error < 0.01, path_error

    # 2) The rounding itself is NF4's: ~9% relative RMS on Gaussian weights (4 bits, 64-blocks).
    assert 0.05 < max(weight_errors) < 0.12, weight_errors

    # 3) End to end against fp32. Those ~9% weight errors pass through 2 layers of attention
    #    and top-2 routing (a few tokens switch experts), measured ~0.15 relative L2 on this
    #    model; a wrong or unrelated model scores ~1.4 (uncorrelated logits, sqrt 2). Thresholds:
    #    relative L2 < 0.25 and mean per-position cosine > 0.97 (measured ~0.99, worst position
    #    > 0.9). Top-1 is not asserted: a random model's logits are nearly flat (std ~1 over
    #    ~500 tokens), so its top-1 flips on tiny perturbations and would test noise.
    rel_l2 = (out - ref).norm() / ref.norm()
    cosine = F.cosine_similarity(out, ref, dim=-1)
    assert rel_l2 < 0.25, rel_l2
    assert cosine.mean() > 0.97 and cosine.min() > 0.85, cosine
    other, _ = build_small(seed=1)
    unrelated = (logits(realistic_scale(other).eval(), inputs) - ref).norm() / ref.norm()
    assert unrelated > 4 * rel_l2  # the metric separates "quantized" from "different model"


# ----------------------------------------------------------------------------- round trip and summary


def test_fp32_save_load_round_trip_identical_logits(small, tmp_path):
    path, ref_model, processor = small
    first = load_model(str(path), quantize="fp32")
    assert next(first.model.parameters()).dtype == torch.float32
    inputs = image_prompt(first.processor)
    expected = logits(ref_model, inputs)
    assert torch.equal(logits(first.model, inputs), expected)

    first.model.save_pretrained(tmp_path / "again")
    first.processor.save_pretrained(tmp_path / "again")
    second = load_model(str(tmp_path / "again"), quantize="fp32")
    assert torch.equal(logits(second.model, inputs), expected)
    assert second.processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_summary_parameter_count_int4_equals_fp32(small, small_int4):
    _, ref_model, _ = small
    fp32_count = sum(p.numel() for p in ref_model.parameters())
    assert total_parameters(small_int4.model) == fp32_count
    assert f"{fp32_count:,}" in small_int4.model.summary()
    assert "nf4" in small_int4.model.summary()


# ----------------------------------------------------------------------------- memory


def unique_storage_bytes(model) -> int:
    """Bytes of distinct storages behind parameters, buffers and 4-bit quant states (an independent count)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def add_state(state):
        for attr in ("absmax", "code", "offset"):
            add(getattr(state, attr, None))
        if getattr(state, "state2", None) is not None:
            add_state(state.state2)

    for p in list(model.parameters()) + list(model.buffers()):
        add(p)
        if getattr(p, "quant_state", None) is not None:
            add_state(p.quant_state)
    return sum(seen.values())


MEMORY_FIGURES: dict[str, dict] = {}


@pytest.mark.parametrize("size", ["small", "larger"])
def test_memory_measured_vs_estimate(size, small, small_int4, tmp_path):
    if size == "small":
        loaded = small_int4
    else:
        make_checkpoint(tmp_path / "larger", **LARGER)
        loaded = load_model(str(tmp_path / "larger"), quantize="int4")
    model = loaded.model
    estimate = estimate_module_bytes(build_on_meta(model.config), "int4")
    measured = total_bytes(model)
    total_estimate = sum(estimate.values())
    four_bit = sum(r.bytes for r in module_rows(model) if "nf4" in r.dtypes)
    MEMORY_FIGURES[size] = dict(
        estimate=total_estimate, measured=measured, storages=unique_storage_bytes(model),
        fp32=4 * total_parameters(model), nf4_rows_bytes=four_bit,
    )
    print(size, MEMORY_FIGURES[size])
    assert abs(total_estimate - measured) <= 0.05 * measured
    # Per layer too: the planner places layers, so each layer's estimate must hold.
    for i, layer in enumerate(model.model.layers):
        held = total_bytes(layer)
        assert abs(estimate[f"model.layers.{i}"] - held) <= 0.05 * held
    # Shared code books (if bitsandbytes shares them) can only make the real footprint smaller.
    assert MEMORY_FIGURES[size]["storages"] <= measured * 1.01
    if size == "larger":
        assert measured < 0.5 * MEMORY_FIGURES[size]["fp32"]  # the 4-bit part dominates


# ----------------------------------------------------------------------------- errors


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        load_model(str(tmp_path / "nope"), quantize="fp32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"), quantize="fp32")


def test_unreachable_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        load_model("zai-org/autoglm-phone-9b-does-not-exist", quantize="fp32")
    message = str(err.value)
    assert "HF_HUB_OFFLINE=1" in message and "not in the local HF cache" in message
    assert "hf download zai-org/autoglm-phone-9b-does-not-exist" in message


def test_a_checkpoint_with_only_pickled_weights_is_refused(tmp_path):
    """Weights load from safetensors only: a .bin-only checkpoint is refused before anything is unpickled."""
    from transformers import Qwen2_5_VLConfig

    from autoglm_app.loading.checkpoints import UnsafeCheckpointError

    Qwen2_5_VLConfig().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(str(tmp_path), quantize="fp32")
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message and "Convert it to safetensors" in message
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="no model weights"):
        load_model(str(tmp_path), quantize="fp32")


def test_remote_code_is_off_unless_asked_and_reaches_every_from_pretrained(tmp_path, monkeypatch):
    import inspect

    import transformers

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    from tests import tiny_families as tiny

    path = tiny.build_qwen2_5_vl(tmp_path / "q")
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoProcessor, transformers.Qwen2_5_VLForConditionalGeneration):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code"), kwargs.get("use_safetensors")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(path, quantize="fp32")
    names = {name for name, *_ in seen}
    assert {"AutoConfig", "AutoProcessor"} <= names
    assert all(trust is False for _, trust, _ in seen), seen
    assert any(name.startswith("Qwen2_5_VL") and safe is True for name, _, safe in seen), seen


def test_int4_layers_stay_on_the_portable_cpu_path(small_int4):
    """On an AVX512-BF16 CPU bitsandbytes would repack 4-bit weights in place on first use (another
    layout, bigger statistics, and a crash for layers narrower than one block); loads switch it off."""
    layers = [m for m in small_int4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    # a shared expert of a tiny real-config MoE checkpoint: 32 inputs, narrower than one 64-value block
    narrow = linear4bit(torch.randn(64, 32, dtype=torch.float16), torch.float16, "cpu")
    narrow.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16, whatever this one has
    packed = narrow.weight.data.clone()
    assert guard_cpu_int4_packing(torch.nn.Sequential(narrow)) == 1
    assert not narrow.support_avx512bf16_for_cpu
    with torch.no_grad():
        y = narrow(torch.randn(3, 32, dtype=torch.float16))
    assert y.shape == (3, 64) and torch.isfinite(y).all()
    assert torch.equal(narrow.weight.data, packed)  # the NF4 bytes are untouched by the forward
    assert guard_cpu_int4_packing(torch.nn.Sequential(narrow)) == 0
