"""CI: a mid-size ``--model random:`` model (tens of millions of parameters, int4 on the CPU) answers through the Engine.

The shipped full-size config, shrunk in width and depth but with its real 150k-token vocabulary (the
embeddings and head are most of the parameters), goes the way the command line sends it:
``Settings(model="random:PATH", quantize="int4", random_seed=...)`` -> ``server.load_engine`` ->
``load_model`` -> ``random_build`` -> the Engine; one text request and one image request are answered.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from autoglm_app.config import Settings
from autoglm_app.events import Answer, ChatRequest, Done, Focus, Message, Options, Reasoning, Stats
from autoglm_app.loading.progress import LoadProgress
from autoglm_app.loading.random_build import random_tensor
from autoglm_app.modeling.summary import total_parameters
from autoglm_app.server import load_engine
from tests.loading.shrunk import write_shrunk

MID_SIZE = dict(hidden=256, layers=4, vision_hidden=64, vision_depth=2)


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(1).random((56, 84, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("name", ["glm-4.1v-9b-thinking", "autoglm-phone-9b", "qwen3-vl-30b-a3b-instruct"])
def test_a_mid_size_random_int4_model_answers_through_the_engine(name, tmp_path):
    import bitsandbytes as bnb

    start = time.perf_counter()
    path = write_shrunk(name, tmp_path, **MID_SIZE)
    settings = Settings(model=f"random:{path}", quantize="int4", random_seed=3, compile="off",
                        cpu_threads=torch.get_num_threads())
    progress = LoadProgress(name)
    engine = load_engine(settings, progress)
    try:
        model = engine.loaded.model
        assert engine.info()["quantize"] == "int4" and engine.loaded.model_id == f"random-{name}"
        assert 20e6 < total_parameters(model) < 150e6  # tens of millions (most of it the 150k vocabulary)
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) >= 4 * 4  # every layer's projections
        head = model.get_output_embeddings().weight  # 16-bit: the seed's own draw, so --random-seed reached the build
        assert torch.equal(head, random_tensor(3, "lm_head.weight", head.shape))
        built_s = time.perf_counter() - start

        text = engine.run(ChatRequest([Message("user", "Hello, who are you?")],
                                      Options(max_new_tokens=8, temperature=0.0)))
        assert isinstance(text[-1], Done)
        stats = next(e for e in text if isinstance(e, Stats))
        assert stats.completion_tokens >= 1 and stats.prompt_tokens > 5
        assert "".join(e.text for e in text if isinstance(e, (Answer, Reasoning))).strip()

        seen = engine.run(ChatRequest([Message("user", "What is here?", images=[_image()])],
                                      Options(max_new_tokens=4, temperature=0.0)))
        assert isinstance(seen[-1], Done)
        assert any(isinstance(e, Focus) and len(e.images) == 1 for e in seen)  # the image was attended to
    finally:
        engine.close()
    total_s = time.perf_counter() - start
    print(f"{name}: {total_parameters(model) / 1e6:.1f}M parameters, built in {built_s:.1f} s, "
          f"two requests answered by {total_s:.1f} s")
    assert total_s < 60
