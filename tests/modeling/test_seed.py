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
