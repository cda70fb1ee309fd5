"""``--model random:<config.json>``: seeded random weights straight into the requested format, every family.

The builds here are the shipped full-size configs shrunk to test size (``shrunk.py``: same architecture,
same 150k-token vocabulary and special-token ids) and the tiny checkpoints of ``tests/tiny_families``.
"""

from __future__ import annotations

import time
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import numpy as np
import pytest
import torch
from PIL import Image

from autoglm_app.events import Message
from autoglm_app.families import family_for
from autoglm_app.loading.checkpoints import load_model
from autoglm_app.loading.fused_experts import SplitExperts
from autoglm_app.loading.planning import (
    GiB, PlanError, build_on_meta, estimate_module_bytes, layers_path_of, load_config, placement_unit, run_plan,
)
from autoglm_app.loading.progress import LoadProgress
from autoglm_app.loading.random_build import random_tensor
from autoglm_app.modeling.summary import tensor_stats
from tests.loading.shrunk import CONFIGS, SHIPPED, write_shrunk

# published parameter counts (meta build, every part of the model the app loads)
PUBLISHED_PARAMS = {
    "autoglm-phone-9b": (9.0e9, 10.0e9, "autoglm"),
    "glm-4.1v-9b-thinking": (10.2e9, 10.4e9, "glm4v"),  # 9B decoder + a 1.3B-wide vision tower
    "qwen2.5-vl-7b-instruct": (8.2e9, 8.4e9, "qwen2_5_vl"),
    "qwen2.5-omni-7b-thinker": (8.8e9, 9.1e9, "qwen2_5_omni"),
    "qwen3-vl-30b-a3b-instruct": (30.5e9, 31.5e9, "qwen3_vl_moe"),
}


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("shrunk")
    return {name: write_shrunk(name, directory) for name in SHIPPED}


def build(path, quantize="int4", **kwargs):
    return load_model(f"random:{path}", quantize=quantize, **kwargs)


def held_bytes(model) -> dict[str, int]:
    """Bytes of parameters and their quantization states, by placement unit (modeling.summary's accounting)."""
    layers_path, out = layers_path_of(model), {}
    for name, p in model.named_parameters():
        unit = placement_unit(name, layers_path)
        out[unit] = out.get(unit, 0) + tensor_stats(p)[1]
    return out


def fingerprint(model) -> dict[str, torch.Tensor]:
    """Every stored tensor: parameters (packed NF4 bytes as stored) and each 4-bit weight's absmax."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach()
        state = getattr(p, "quant_state", None)
        if state is not None:
            out[name + ".absmax"] = state.absmax
            out[name + ".nested_absmax"] = state.state2.absmax
    return out


# ----------------------------------------------------------------------------- the shipped configs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_build_on_meta_at_their_published_size(name):
    low, high, family = PUBLISHED_PARAMS[name]
    start = time.perf_counter()
    model = build_on_meta(load_config(CONFIGS / f"{name}.json"))
    assert time.perf_counter() - start < 20
    assert family_for(model).name == family
    assert all(p.device.type == "meta" for p in model.parameters())
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    readme = (CONFIGS / "README.md").read_text()
    assert f"`{name}.json`" in readme  # where its dimensions come from


def test_the_9b_models_int4_plans_fit_one_24gib_machine():
    for name, most in (("glm-4.1v-9b-thinking", 8.5), ("autoglm-phone-9b", 8.0), ("qwen2.5-vl-7b-instruct", 7.0)):
        table = run_plan("cpu", "24GiB", "int4", str(CONFIGS / f"{name}.json"))
        total = float(table.splitlines()[-1].split()[-1])
        assert 4.0 < total < most, (name, table)


def test_plan_cli_covers_a_transformers_family_with_split_experts():
    table = run_plan("0,1", "24GiB", "int4", str(CONFIGS / "qwen3-vl-30b-a3b-instruct.json"))
    assert "cuda:0" in table and "cuda:1" in table and "visual" in table and "lm_head" in table
    meta = build_on_meta(load_config(CONFIGS / "qwen3-vl-30b-a3b-instruct.json"))
    total = sum(estimate_module_bytes(meta, "int4").values())
    assert f"{total / GiB:.2f}" in table.splitlines()[-1]
    # 30B parameters, nearly all of them experts: ~4.1 bits each, so well under the 16-bit size
    assert total < 0.3 * 2 * sum(p.numel() for p in meta.parameters())


# ----------------------------------------------------------------------------- weights


def test_same_seed_same_weights_another_seed_others(shrunk):
    a = fingerprint(build(shrunk["glm-4.1v-9b-thinking"]).model)
    b = fingerprint(build(shrunk["glm-4.1v-9b-thinking"]).model)
    c = fingerprint(build(shrunk["glm-4.1v-9b-thinking"], seed=1).model)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    randomised = [k for k in a if a[k].unique().numel() > 1]  # not the ones / zeros of norms and biases
    assert len(randomised) > 10 and not any(torch.equal(a[k], c[k]) for k in randomised)


def assert_nf4_of(layer, expected_fp16):
    """The layer stores what bitsandbytes' quantize_4bit makes of these float16 values (NF4, double quant)."""
    assert isinstance(layer, bnb.nn.Linear4bit)
    packed, state = F.quantize_4bit(expected_fp16, blocksize=64, compress_statistics=True, quant_type="nf4")
    weight = layer.weight
    assert weight.dtype == torch.uint8 and torch.equal(weight.data, packed)
    mine = weight.quant_state
    assert torch.equal(mine.absmax, state.absmax) and torch.equal(mine.offset, state.offset)
    assert torch.equal(mine.code, state.code) and mine.shape == state.shape
    assert torch.equal(mine.state2.absmax, state.state2.absmax) and torch.equal(mine.state2.code, state.state2.code)


def test_nf4_layers_hold_bitsandbytes_packing_of_the_seeded_fp16_weights(shrunk):
    prefix = "model.language_model.layers.1"
    int4 = build(shrunk["glm-4.1v-9b-thinking"]).model
    fp16 = build(shrunk["glm-4.1v-9b-thinking"], quantize="fp16").model
    for name in (f"{prefix}.self_attn.q_proj", f"{prefix}.mlp.down_proj"):
        expected = random_tensor(0, f"{name}.weight", fp16.get_submodule(name).weight.shape)
        assert torch.equal(fp16.get_submodule(name).weight, expected)  # fp16 is the same draw, unquantized
        assert_nf4_of(int4.get_submodule(name), expected)
        bias = int4.get_submodule(name).bias
        assert bias is None or (bias.dtype == torch.float16 and not bias.any())
    norm = int4.get_submodule(f"{prefix}.input_layernorm").weight
    assert norm.dtype == torch.float16 and bool((norm == 1).all())
    head = int4.lm_head.weight  # kept 16-bit: the draw itself
    assert head.dtype == torch.float16 and torch.equal(head, random_tensor(0, "lm_head.weight", head.shape))

    moe = build(shrunk["qwen3-vl-30b-a3b-instruct"]).model  # fused experts -> one NF4 layer per expert
    experts = moe.get_submodule("model.language_model.layers.0.mlp.experts")
    assert isinstance(experts, SplitExperts) and experts.complete
    shape = experts.gate_up_proj[3].weight.quant_state.shape
    expected = random_tensor(0, "model.language_model.layers.0.mlp.experts.gate_up_proj.3", shape)
    assert_nf4_of(experts.gate_up_proj[3], expected)


@pytest.mark.parametrize("family", ["glm4v", "qwen3_vl_moe", "qwen2_5_omni"])
def test_a_random_build_has_the_layers_an_ordinary_load_gives(family, tmp_path):
    """Same module classes, parameter dtypes and shapes, same bytes as loading a checkpoint of that config."""
    from tests import tiny_families as tiny

    path = getattr(tiny, f"build_{family}")(tmp_path / family)
    random, ordinary = build(path).model, load_model(path, quantize="int4").model
    assert {n: type(m) for n, m in random.named_modules()} == {n: type(m) for n, m in ordinary.named_modules()}
    layout = lambda m: {n: (p.dtype, tuple(p.shape)) for n, p in m.named_parameters()}  # noqa: E731
    assert layout(random) == layout(ordinary)
    assert held_bytes(random) == held_bytes(ordinary)


# ----------------------------------------------------------------------------- planning and placement


@pytest.mark.parametrize("name", ["glm-4.1v-9b-thinking", "qwen3-vl-30b-a3b-instruct", "qwen2.5-omni-7b-thinker",
                                  "autoglm-phone-9b"])
def test_plan_bytes_are_what_a_random_int4_build_holds(name, shrunk):
    estimate = estimate_module_bytes(build_on_meta(load_config(shrunk[name])), "int4", buffers=False)
    held = held_bytes(build(shrunk[name]).model)
    assert estimate == held  # per placement unit, to the byte (packed data + quantization states)


def test_a_planned_build_puts_each_unit_where_the_plan_says(shrunk):
    loaded = build(shrunk["qwen2.5-vl-7b-instruct"], gpus=["cpu", "cpu"], gpu_memory="1GiB")
    plan = loaded.plan
    assert plan is not None and loaded.device_map == plan.device_map
    assert list(plan.bytes_per_device) == ["cpu#0", "cpu#1"] and all(plan.bytes_per_device.values())
    assert plan.layers_on(0) + plan.layers_on(1) == [0, 1]  # every layer placed, in order
    assert "model.visual" in plan.units_per_slot[0] and "lm_head" in plan.units_per_slot[1]
    assert sum(plan.bytes_per_device.values()) == plan.total_bytes


def test_a_model_that_does_not_fit_fails_before_anything_is_built():
    start = time.perf_counter()
    with pytest.raises(PlanError, match="does not fit"):
        build(CONFIGS / "glm-4.1v-9b-thinking.json", gpus=["cpu"], gpu_memory="4GiB")
    assert time.perf_counter() - start < 15  # the meta build and the plan only


# ----------------------------------------------------------------------------- every family, progress, errors


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((56, 84, 3)) * 255).astype("uint8"))


FAMILIES = [*SHIPPED, "tiny:glm4v_moe", "tiny:qwen3_vl", "tiny:qwen3_omni_moe"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_builds_with_its_tokenizer_and_processor(name, shrunk, tmp_path):
    from tests import tiny_families as tiny

    path = getattr(tiny, f"build_{name[5:]}")(tmp_path / "tiny") if name.startswith("tiny:") else shrunk[name]
    loaded = build(path)
    model, processor = loaded.model, loaded.processor
    tokenizer = processor.tokenizer
    text_config = model.config.get_text_config()
    assert len(tokenizer) == text_config.vocab_size
    family = family_for(model)
    image_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    image_token = getattr(family, "image_token", "<|image|>")
    assert tokenizer.convert_tokens_to_ids(image_token) == image_id  # the model finds images by this id
    stops = family.stop_ids(processor)
    assert tokenizer.eos_token_id in stops and all(0 <= i < len(tokenizer) for i in stops)
    prepared = family.prepare(processor, [Message("user", "What is in this picture?", images=[_image()])], True)
    assert len(prepared.image_spans) == 1
    assert tokenizer.decode(list(range(len(tokenizer) - 5, len(tokenizer)))).strip()  # every id decodes to text


def test_progress_counts_the_units_built(shrunk):
    seen = []

    class Recording(LoadProgress):
        def stage(self, name, total=0, unit=""):
            seen.append((self.snapshot()["progress"], name))
            super().stage(name, total, unit)

    loaded = build(shrunk["qwen2.5-vl-7b-instruct"], progress=Recording("random"))
    finished = {before["stage"]: before for before, _ in seen}
    building = finished["building random int4 weights (seed 0)"]
    units = {placement_unit(n, layers_path_of(loaded.model)) for n, _ in loaded.model.named_parameters()}
    assert building["unit"] == "layers" and building["done"] == building["total"] >= len(units)
    stages = [name for _, name in seen]
    assert stages.index("building the model on the meta device") < stages.index("building random int4 weights (seed 0)")


def test_bad_random_specs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="random: needs a model config"):
        load_model(f"random:{tmp_path / 'missing.json'}")
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(ValueError, match="not an architecture this app supports.*glm4v"):
        load_model(f"random:{unknown}")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(f"random:{broken}")
    bad_ids = write_shrunk("glm-4.1v-9b-thinking", tmp_path)
    text = bad_ids.read_text().replace('"image_token_id": 151343', '"image_token_id": 999999')
    bad_ids.write_text(text)
    with pytest.raises(ValueError, match="image_token_id = 999999 is not an id in its vocabulary"):
        load_model(f"random:{bad_ids}", quantize="fp16")


def test_a_shipped_config_can_be_named_without_its_path():
    from autoglm_app.loading.random_build import random_config_path

    assert random_config_path("random:glm-4.1v-9b-thinking") == CONFIGS / "glm-4.1v-9b-thinking.json"
    assert random_config_path(f"random:{CONFIGS}/qwen2.5-vl-7b-instruct.json").name == "qwen2.5-vl-7b-instruct.json"


def test_tied_embeddings_stay_one_tensor_and_count_once(tmp_path):
    import json

    path = write_shrunk("qwen2.5-vl-7b-instruct", tmp_path)
    data = json.loads(path.read_text())
    data["tie_word_embeddings"] = True  # as Qwen2.5-VL-3B ships
    path.write_text(json.dumps(data))
    model = build(path).model
    assert model.lm_head.weight is model.get_input_embeddings().weight
    estimate = estimate_module_bytes(build_on_meta(load_config(path)), "int4", buffers=False)
    assert "lm_head" not in estimate and estimate == held_bytes(model)
