"""The GPU check's pure parts (the bound's arithmetic, the budget's skips, the table) and its flow on a CPU.

The check itself runs on a lent GPU (``tools/gpu_check.sh``, docs/PERFORMANCE.md "GPU check"); here
``--small --device cpu`` runs the same code on shrunk configs, one model and the cross-device case.
"""

from __future__ import annotations

import json

import pytest

from tools import gpu_bench
from tools.gpu_bench import GiB, bound_tokens_per_s, estimate_case_s, gpu_table, share_of_bound, skip_reason


def test_bound_and_share_arithmetic():
    # 4,300 GB/s over 4.3 GB a token: 1,000 tokens/s; 300 measured is 30% of it
    bound = bound_tokens_per_s(4300.0, 4_300_000_000)
    assert bound == pytest.approx(1000.0)
    assert share_of_bound(300.0, bound) == pytest.approx(0.3)
    assert bound_tokens_per_s(None, 10) is None and bound_tokens_per_s(100.0, 0) is None
    assert share_of_bound(None, bound) is None and share_of_bound(5.0, None) is None


def test_a_case_that_would_overrun_the_budget_is_skipped():
    assert skip_reason(100, 480, 200) is None
    why = skip_reason(400, 480, 100)
    assert why and "over budget" in why and "480" in why
    assert estimate_case_s("model", 5.0, 8.0) == pytest.approx(5 * 8 + gpu_bench.MEASURE_S["model"])
    cross = estimate_case_s("cross", 5.0, 8.0, cpu_gib=2.5)  # the CPU half packs slower
    assert cross == pytest.approx((2.5 + 2.5 * gpu_bench.CROSS_CPU_FACTOR) * 8 + gpu_bench.MEASURE_S["cross"])


def result() -> dict:
    ok = {"case": "autoglm-phone-9b", "kind": "model", "status": "ok", "build_s": 31.2,
          "allocated_bytes": int(5.5 * GiB), "plan_bytes": int(5.4 * GiB), "counted_bytes": int(5.4 * GiB),
          "build_peak_bytes": 6 * GiB, "ttft_ms": 120.0, "engine_off_tps": 40.0, "engine_on_tps": 38.0,
          "generate_tps": 20.0, "batch_tps": 250.0, "batch": 8, "read_bytes_per_token": int(4.3e9),
          "bound_tps": 1000.0, "share_off": 0.04, "routing": "40 x 8, top-2", "step": "eager"}
    cross = {"case": "autoglm-phone-9b", "kind": "cross", "status": "ok", "plan_bytes": {"cuda:0": 3 * GiB,
             "cpu": 3 * GiB}, "layers": {"cuda:0": "0-19", "cpu": "20-39"}, "build_s": 80.0, "completion_tokens": 8,
             "answer": "some text", "finish_reason": "length", "ttft_ms": 900.0, "decode_tps": 2.5, "step": "eager",
             "allocated_bytes": 3 * GiB}
    skipped = {"case": "qwen3-vl-30b-a3b-instruct", "kind": "model", "status": "skipped",
               "reason": skip_reason(470, 480, 200)}
    failed = {"case": "glm-4.1v-9b-thinking", "kind": "model", "status": "failed", "reason": "RuntimeError: boom"}
    return {"device": "cuda:0", "label": "NVIDIA H200, 140 GiB", "versions": {"torch": "2.11.0",
            "bitsandbytes": "0.50.2", "transformers": "5.23.0"}, "tokens": 32, "repeats": 3, "compile": "auto",
            "elapsed_s": 470.0, "budget_s": 480.0, "bandwidth": {"gb_per_s": 4300.0, "buffer_bytes": 2 * GiB,
            "iters": 10}, "rows": [ok, failed, cross, skipped]}


def test_the_table_has_a_row_per_model_and_lines_for_the_rest():
    table = gpu_table(result())
    assert "4300.0 GB/s" in table and "NVIDIA H200" in table
    row = next(line for line in table.splitlines() if line.startswith("| autoglm-phone-9b"))
    assert "5.50 / 5.40 / 5.40" in row and "4.0%" in row and "40 x 8, top-2" in row and "250.0 (8)" in row
    assert "**failed**: RuntimeError: boom" in table
    assert "**skipped**: over budget" in table and "qwen3-vl-30b-a3b-instruct" in table
    assert "cross-device autoglm-phone-9b: plan cuda:0 3.00 GiB (layers 0-19), cpu 3.00 GiB (layers 20-39)" in table
    json.dumps(result())  # what is written


def test_fewer_layers_keeps_the_width(tmp_path):
    from autoglm_app.loading.random_build import CONFIGS

    path = gpu_bench.fewer_layers(CONFIGS / "autoglm-phone-9b.json", 8, tmp_path)
    data = json.loads(path.read_text())
    assert data["num_hidden_layers"] == 8 and data["moe_layers"] == list(range(8)) and data["hidden_size"] == 4096


def test_the_small_flow_runs_on_the_cpu_through_the_bench_command(tmp_path):
    """One shrunk model and the cross-device case, as ``python -m tools.bench gpu --small --device cpu``."""
    from tools.bench import main

    out = tmp_path / "gpu.json"
    main(["gpu", "--small", "--device", "cpu", "--only", "autoglm-phone-9b", "--tokens", "4", "--batch", "2",
          "--copy-gib", "0.01", "--out", str(out)])
    r = json.loads(out.read_text())
    model, cross = r["rows"]
    assert model["status"] == "ok" and cross["status"] == "ok", r["rows"]
    assert model["counted_bytes"] == model["plan_bytes"]  # the plan's exact bytes are what the build holds
    assert 0 < model["read_bytes_per_token"] < model["counted_bytes"]
    assert model["engine_off_tps"] > 0 and model["generate_tps"] > 0 and model["batch_completed"] == 2
    assert model["routing"] == "2 x 4, top-2" and model["bound_tps"] > 0
    assert cross["completion_tokens"] == 4 and list(cross["plan_bytes"]) == ["cpu#0", "cpu#1"]
