"""The seed's public API under both import names, on the shipped demo checkpoint."""

from __future__ import annotations

from autoglm_app.config import DEMO_MODEL


def test_the_seed_api_is_importable_as_autoglm_and_loads_the_demo_in_int4():
    import autoglm
    from autoglm_app import seed

    assert autoglm.AutoGLMModel is seed.AutoGLMModel and autoglm.MultiModalConfig is seed.MultiModalConfig
    config = autoglm.MultiModalConfig(vision_encoder="vit-tiny", audio_encoder="qwenaudio-lite",
                                      text_decoder="glm-tiny", quantize="int4")
    model = autoglm.AutoGLMModel.from_pretrained(str(DEMO_MODEL), config=config)
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    rows = {line.split()[0]: line.split()[2] for line in model.summary().splitlines()[2:-2]}
    assert rows["layers.0.experts"] == "nf4" and rows["vision_tower"] == "float16"
    assert model.processor is not None


def test_the_seed_import_line_works_in_a_fresh_interpreter(tmp_path):
    """The article's own line, after the README's install, from any directory."""
    import subprocess
    import sys

    code = "from autoglm import AutoGLMModel, MultiModalConfig; print(MultiModalConfig().text_decoder)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "glm-tiny", out.stderr[-2000:]


def test_the_seed_model_name_stands_for_the_published_checkpoint_and_says_what_to_do_offline():
    import pytest

    import autoglm
    from autoglm_app.loading.checkpoints import ModelNotFoundError

    with pytest.raises(ModelNotFoundError) as err:  # the tests run with HF_HUB_OFFLINE=1
        autoglm.AutoGLMModel.from_pretrained("autoglm-phone-9b", config=autoglm.MultiModalConfig(quantize="int4"))
    message = str(err.value)
    assert "zai-org/AutoGLM-Phone-9B" in message and "hf download zai-org/AutoGLM-Phone-9B" in message
    assert "assets/autoglm-phone-tiny" in message
