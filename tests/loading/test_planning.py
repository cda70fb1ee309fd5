"""Device planning: the 9B config on two 24 GiB cards, budgets, and a planned map that loads for real."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from autoglm_app.loading.checkpoints import load_model
from autoglm_app.loading.planning import (
    GiB,
    PlanError,
    build_on_meta,
    estimate_module_bytes,
    load_config,
    parse_devices,
    parse_memory,
    plan_device_map,
    run_plan,
)
from autoglm_app.modeling.small import save_small

CONFIG_9B = Path(__file__).resolve().parents[2] / "assets" / "configs" / "autoglm-phone-9b.json"
ENCODERS = ("model.vision_tower", "model.audio_tower", "model.adapter", "model.embed_tokens")


@pytest.fixture(scope="module")
def meta_9b():
    start = time.perf_counter()
    model = build_on_meta(load_config(CONFIG_9B))
    assert time.perf_counter() - start < 20  # meta device: no allocation, seconds at most
    return model


def test_9b_config_has_glm4_9b_dimensions(meta_9b):
    cfg = meta_9b.config
    assert cfg.model_type == "autoglm"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        4096, 40, 32, 2)
    assert cfg.head_dim == 128 and cfg.vocab_size == 151552 and cfg.partial_rotary_factor == 0.5
    # Per layer, 8 experts x 1712 hold exactly GLM-4-9B's dense 13696-wide SwiGLU.
    assert cfg.num_experts * cfg.moe_intermediate_size == 13696 and cfg.moe_layers == list(range(40))
    assert all(p.device.type == "meta" for p in meta_9b.parameters())
    total = sum(p.numel() for p in meta_9b.parameters())
    assert 9e9 <= total <= 10e9, total


def test_9b_int4_on_two_24gib_devices(meta_9b):
    plan = plan_device_map(meta_9b, [0, 1], "24GiB", "int4")
    loads = list(plan.bytes_per_device.values())
    assert len(loads) == 2 and min(loads) > 0  # both used
    assert max(loads) <= 1.15 * min(loads)  # balanced within 15%
    assert plan.total_bytes <= 12e9 and sum(loads) == plan.total_bytes
    assert max(loads) <= 24 * GiB

    dm = plan.device_map
    for unit in ENCODERS:
        assert dm[unit] == 0
    assert dm["model.norm"] == 1 and dm["lm_head"] == 1
    layer_devices = [dm[f"model.layers.{i}"] for i in range(40)]
    assert layer_devices == sorted(layer_devices)  # contiguous: 0 ... 0 1 ... 1
    assert set(layer_devices) == {0, 1}
    # Whole layers only: no key below the layer level, and nothing missing.
    assert not any(k.count(".") > 2 for k in dm)
    assert set(dm) == set(ENCODERS) | {f"model.layers.{i}" for i in range(40)} | {"model.norm", "lm_head"}

    table = plan.table()
    assert "cuda:0" in table and "cuda:1" in table and "layers 0-" in table and "-39" in table
    assert f"{plan.total_bytes / GiB:.2f}" in table


def test_estimates_follow_the_quantization(meta_9b):
    totals = {q: sum(estimate_module_bytes(meta_9b, q).values()) for q in ("int4", "int8", "bf16", "fp32")}
    n = sum(p.numel() for p in meta_9b.parameters())
    assert totals["fp32"] == 4 * n and totals["bf16"] == 2 * n
    assert totals["int4"] < totals["int8"] < totals["bf16"]
    layer = estimate_module_bytes(meta_9b, "int4")["model.layers.0"]
    layer_params = sum(p.numel() for p in meta_9b.model.layers[0].parameters())
    assert 0.5 * layer_params < layer < 0.6 * layer_params  # ~4.1 bits per quantized value


def test_run_plan_cli_text():
    table = run_plan("0,1", "24GiB", "int4", str(CONFIG_9B))
    assert "cuda:0" in table and "cuda:1" in table and "int4" in table and "total" in table


def test_too_small_budget_is_a_clear_error(meta_9b):
    with pytest.raises(PlanError) as err:
        plan_device_map(meta_9b, [0, 1], "4GiB", "bf16")
    message = str(err.value)
    assert "does not fit" in message and "GiB missing in total" in message
    assert "--quantize int4" in message and "more GPUs" in message and "--gpu-memory" in message
    assert "offload" not in message  # no flag offloads to the CPU: only advice the user can follow
    with pytest.raises(PlanError, match="over its budget") as err:
        plan_device_map(meta_9b, [0, 1], "3GiB", "int4")
    message = str(err.value)
    assert "--quantize" not in message and "--gpu-memory" in message and "--gpus" in message


def test_one_device_holds_everything(meta_9b):
    plan = plan_device_map(meta_9b, ["cuda:0"], "24GiB", "int4")
    assert set(plan.device_map.values()) == {0}
    assert plan.bytes_per_device == {"cuda:0": plan.total_bytes}


def test_device_names_and_memory_parsing():
    assert parse_devices("0,1") == [0, 1]
    assert parse_devices("cuda:1, cpu") == [1, "cpu"]
    assert parse_devices([0, "cpu", torch.device("cuda", 2)]) == [0, "cpu", 2]
    assert parse_memory("24GiB") == 24 * GiB and parse_memory("24 GB") == 24 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20 and parse_memory("512mb") == 512 * 10**6
    with pytest.raises(ValueError):
        parse_memory("lots")
    with pytest.raises(ValueError):
        parse_devices("gpu0")


def test_planned_device_map_loads_for_real(tmp_path):
    path = save_small(str(tmp_path / "small"), num_hidden_layers=4)
    plan = plan_device_map(load_config(path), ["cpu", "cpu"], "1GiB", "fp32")
    assert list(plan.bytes_per_device) == ["cpu#0", "cpu#1"]
    assert all(v > 0 for v in plan.bytes_per_device.values())

    reference = load_model(path, quantize="fp32")
    planned = load_model(path, quantize="fp32", gpus=["cpu", "cpu"], gpu_memory="1GiB")
    assert planned.plan is not None and planned.device_map == plan.device_map
    int4 = load_model(path, quantize="int4", gpus=["cpu"], gpu_memory="1GiB")
    assert int4.plan is not None and set(int4.device_map.values()) == {"cpu"}

    ids = reference.processor.tokenizer("Hello, who are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference.model(ids, use_cache=False).logits
        assert torch.equal(planned.model(ids, use_cache=False).logits, expected)
        out4 = int4.model(ids, use_cache=False).logits
    assert out4.shape == expected.shape and torch.isfinite(out4).all()
