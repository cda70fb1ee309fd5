"""The batch comparison (tools/compare.py) on a few turns of the demo model: it writes its JSON and its table,
scores ShapesWorld answers, reads a JSONL file of prompts with images, and a model against itself (the same
checkpoint loaded again in the same format) agrees everywhere. Functional, not a timing test."""

from __future__ import annotations

import json

import pytest

from autoglm_app.config import DEMO_MODEL
from tools import compare

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="no demo checkpoint")


def test_the_tool_compares_a_few_shapesworld_questions_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "compare.json"
    compare.main(["--questions", "3", "--quantize", "fp32", "--compare-quantize", "fp32", "--max-tokens", "48",
                  "--context-limit", "1024", "--out", str(out)])
    result = json.loads(out.read_text())
    s = result["summary"]
    assert result["a"]["quantize"] == result["b"]["quantize"] == "fp32"
    assert s["turns"] == 3 and s["scored"] == 3 and s["teacher_forced_turns"] == 3 and s["tokens"] > 0
    assert 0.0 <= s["accuracy_a"] <= 1.0 and s["accuracy_a"] == s["accuracy_b"]
    assert s["identical_answers"] == 1.0 and s["argmax_agreement"] == 1.0
    assert s["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert s["routing_jaccard"] == 1.0 and s["routing_jaccard_per_layer"] == [1.0] * 4
    assert s["focus_peak_agreement"] == 1.0 and s["peak_distance"] == 0.0
    assert [t["task"] for t in result["turns"]] == ["color", "where", "count"]
    assert all(isinstance(t["correct_a"], bool) for t in result["turns"])
    table = capsys.readouterr().out
    assert "| accuracy A (fp32) |" in table and "routing Jaccard" in table and str(out) in table


def test_the_tool_reads_prompts_with_images_from_jsonl(tmp_path):
    from PIL import Image

    Image.new("RGB", (128, 128), (200, 40, 40)).save(tmp_path / "red.png")
    lines = [{"prompt": "What color is the square?", "image": "red.png", "expected": "It is red.", "thinking": False},
             {"prompt": "Who are you?", "thinking": False}]
    (tmp_path / "turns.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "c.json"
    compare.main(["--prompts", str(tmp_path / "turns.jsonl"), "--compare-quantize", "fp32", "--max-tokens", "24",
                  "--context-limit", "1024", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["summary"]["turns"] == 2 and result["summary"]["scored"] == 1
    assert result["turns"][1]["correct_a"] is None  # nothing to score it against
    assert result["turns"][0]["words"] and result["turns"][1]["words"][0]["peak_distance"] is None  # no image


def test_without_a_second_model_the_tool_says_what_to_give(tmp_path):
    with pytest.raises(SystemExit, match="--compare-quantize"):
        compare.main(["--questions", "1", "--out", str(tmp_path / "x.json")])


def test_the_bench_dispatches_compare_to_the_same_tool(tmp_path):
    from tools import bench

    out = tmp_path / "b.json"
    bench.main(["compare", "--questions", "1", "--compare-quantize", "fp32", "--max-tokens", "16",
                "--context-limit", "1024", "--out", str(out)])
    assert json.loads(out.read_text())["summary"]["turns"] == 1
