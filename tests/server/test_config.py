"""Settings and Limits are declared once: flags, variables, defaults and the README's table come from it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from autoglm_app.config import Limits, Settings, flag_table, parse_gpus, parse_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_flag_table_is_the_declared_one():
    assert flag_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_default_comes_from_the_declaration():
    parsed = parse_settings([], environ={})
    assert parsed.limits == Limits()
    declared = Settings()
    for f in fields(Settings):
        assert getattr(parsed, f.name) == getattr(declared, f.name), f.name


def test_flags_beat_variables_beat_defaults():
    env = {"AUTOGLM_CONTEXT_LIMIT": "4096", "AUTOGLM_MAX_AUDIO_SECONDS": "60", "AUTOGLM_SERVED_MODEL_NAME": "a,b",
           "AUTOGLM_GPUS": "cuda:1, cpu", "AUTOGLM_SHARE": "yes"}
    s = parse_settings(["--context-limit", "2048"], environ=env)
    assert s.limits.context_limit == 2048 and s.limits.max_audio_seconds == 60.0
    assert s.served_model_names == ["a", "b"] and s.gpus == [1, "cpu"] and s.share is True
    s = parse_settings(["--served-model-name", "x", "--served-model-name", "y", "--cors-origins", "http://a, http://b"],
                       environ={})
    assert s.served_model_names == ["x", "y"] and s.cors_origins == ["http://a", "http://b"]


@pytest.mark.parametrize("argv", [["--max-queue", "0"], ["--max-audio-seconds", "-1"], ["--gpus", "gpu0"],
                                  ["--quantize", "int3"], ["--context-limit", "many"]])
def test_a_bad_flag_is_refused_with_its_name(argv, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ={})
    assert argv[0] in capsys.readouterr().err


def test_a_bad_variable_is_refused_at_start(capsys):
    with pytest.raises(SystemExit):
        parse_settings([], environ={"AUTOGLM_GPUS": "gpu0"})
    assert "AUTOGLM_GPUS='gpu0'" in capsys.readouterr().err


def test_the_one_gpus_parser():
    assert parse_gpus("0,1") == [0, 1]
    assert parse_gpus(" cuda:2 , cpu ") == [2, "cpu"]
    assert parse_gpus("") is None and parse_gpus(None) is None
    with pytest.raises(ValueError, match="unknown device"):
        parse_gpus("gpu0")


def test_the_installed_command_starts_the_same_cli(tmp_path):
    """`pip install -e .` (requirements-test.txt does it) puts `autoglm-studio` on the PATH: it parses the
    same declared flags and prints a device plan without a GPU."""
    import shutil
    import subprocess

    exe = shutil.which("autoglm-studio")
    assert exe, "autoglm-studio is not installed: run `pip install -e .` (the README's test command does)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--max-images-per-turn" in out.stdout and "AUTOGLM_CONTEXT_LIMIT" in out.stdout
    plan = subprocess.run([exe, "--plan", "--gpus", "0,1", "--gpu-memory", "24GiB", "--quantize", "int4",
                           "--model-config", str(ROOT / "assets" / "configs" / "autoglm-phone-9b.json")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "cuda:0" in plan.stderr + plan.stdout and "cuda:1" in plan.stderr + plan.stdout
