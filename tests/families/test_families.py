"""Real architectures end to end on the CPU: tiny random checkpoints of each family are saved, loaded by
the app's own loader in int4, and served by the Engine (reasoning, answer, focus on the merged-token
grid, routing from the MoE layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny_families as tiny
from autoglm_app.config import Limits
from autoglm_app.engine.worker import Engine
from autoglm_app.events import Answer, Audio, BadRequest, ChatRequest, Focus, Message, Options, Reasoning, Routing, Stats
from autoglm_app.families import family_for
from autoglm_app.loading.checkpoints import load_model

# family -> (builder, image size (w, h), routed layers)
CASES = {
    "glm4v": (tiny.build_glm4v, (84, 56), []),
    "qwen2_5_vl": (tiny.build_qwen2_5_vl, (84, 56), []),
    "qwen3_vl": (tiny.build_qwen3_vl, (96, 64), []),
    "qwen3_vl_moe": (tiny.build_qwen3_vl_moe, (96, 64), [0, 1]),
    "glm4v_moe": (tiny.build_glm4v_moe, (84, 56), [1, 2]),  # layer 0 is dense (first_k_dense_replace)
    # Omni: a whole-model checkpoint (thinker + talker weights); the app loads the Thinker, which hears audio
    "qwen2_5_omni": (tiny.build_qwen2_5_omni, (84, 56), []),
    "qwen3_omni_moe": (tiny.build_qwen3_omni_moe, (96, 64), [0, 1]),
}
RECORDING = (0.1 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)  # 1 s at 16 kHz


def merged_grid(processor, image) -> tuple[int, int]:
    """The (rows, cols) of LLM tokens an image becomes: the image processor's patch grid / merge size."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    merge = processor.image_processor.merge_size
    return t * h // merge, w // merge


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    name = request.param
    build, size, routed = CASES[name]
    path = build(tmp_path_factory.mktemp(name))
    loaded = load_model(path, quantize="int4")
    engine = Engine(loaded, Limits(context_limit=512))
    yield name, loaded, engine, size, routed
    engine.close()


def _script(processor, name: str) -> list[int]:
    """A think block, then an answer, in the family's tag format, then end of text."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids("<think>"), *tok.encode("I think", add_special_tokens=False),
           tok.convert_tokens_to_ids("</think>")]
    if name.startswith("glm"):
        ids += [tok.convert_tokens_to_ids("<answer>"), *tok.encode("yes", add_special_tokens=False),
                tok.convert_tokens_to_ids("</answer>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    else:
        ids += [*tok.encode("yes", add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]
    return ids


def _ask(engine, image, thinking=True, text="what is here?", audio=None):
    images = [image] if image is not None else []
    audios = [Audio(audio, 16000)] if audio is not None else []
    req = ChatRequest([Message("user", text, images, audios)], Options(max_new_tokens=12, temperature=0,
                                                                       enable_thinking=thinking))
    return engine.run(req)


def audio_tokens(loaded, samples) -> int:
    """How many audio-encoder frames (LLM tokens) a recording becomes, by the model's own audio tower."""
    fe = loaded.processor.feature_extractor
    feats = fe([samples], sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.get_audio_features(feats["input_features"].to(torch.float16),
                                              feats["attention_mask"], return_dict=True)
    return int(out.last_hidden_state.shape[0])


def test_loads_int4_with_vision_router_and_head_kept_16bit(served):
    import bitsandbytes as bnb

    name, loaded, engine, *_ = served
    model = loaded.model
    assert engine.family.name == name and family_for(model).name == name
    layers = engine.family.layers(model)
    assert isinstance(layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.visual.modules())
    if engine.family.hears_audio:  # the Omni Thinker: its own audio encoder, kept 16-bit; no talker loaded
        assert engine.info()["hears_audio"]
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.audio_tower.modules())
        assert type(model).__name__.endswith("ThinkerForConditionalGeneration")
        assert not any(n.startswith(("talker", "token2wav", "code2wav")) for n, _ in model.named_modules())
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.lm_head.weight.dtype == torch.float16
    for _, gate in engine.family.routers(model):
        assert gate.weight.dtype == torch.float16
    if engine.family.fused_experts:  # no 16-bit fused 3-D expert tensor left anywhere in the decoder
        assert not any(p.dim() == 3 for layer in layers for p in layer.parameters())


def test_streams_reasoning_then_answer_with_focus_on_the_merged_grid(served):
    name, loaded, engine, size, routed = served
    image = Image.new("RGB", size, "red")
    grid = merged_grid(loaded.processor, image)
    assert grid[0] * grid[1] > 1
    hears = engine.family.hears_audio
    recording = RECORDING if hears else None
    frames = audio_tokens(loaded, RECORDING) if hears else 0
    state = tiny.script_logits(loaded.model, _script(loaded.processor, name))
    try:
        events = _ask(engine, image, audio=recording)
    finally:
        state["step"] = 10**9  # later requests: the hook stays but keeps emitting the stop token
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    answer = "".join(e.text for e in events if isinstance(e, Answer))
    assert reasoning.strip() == "I think"
    assert answer.strip() == "yes"
    focus = [e for e in events if isinstance(e, Focus)]
    assert focus, "no focus maps"
    L = engine.family.num_layers(loaded.model)
    for f in focus:
        assert f.images[0].shape == grid
        assert f.per_layer_images[0].shape == (L, *grid)
        assert (f.images[0] >= 0).all() and 0 < f.images[0].sum() <= 1 + 1e-3
        if hears:  # one map per recording over its audio tokens, in time order
            assert len(f.audios) == 1 and f.audios[0].shape == (frames,) and frames > 1
            assert f.per_layer_audios[0].shape == (L, frames)
            assert (f.audios[0] >= 0).all() and 0 < f.images[0].sum() + f.audios[0].sum() <= 1 + 1e-3
        else:
            assert f.audios == []
    routes = [e for e in events if isinstance(e, Routing)]
    if routed:
        assert routes and all([r.layer for r in e.layers] == routed for e in routes)
        E, k = engine.family.num_experts(loaded.model)
        assert all(len(r.experts) == k and all(0 <= x < E for x in r.experts) for e in routes for r in e.layers)
        assert sum(routes[-1].load["prefill"][0]) == k * next(e for e in events if isinstance(e, Stats)).prompt_tokens
    else:
        assert not routes
    assert events[-1].finish_reason == "stop"


def test_thinking_off_closes_the_think_block_in_the_prompt(served):
    name, loaded, engine, *_ = served
    prep = engine.family.prepare(loaded.processor, [Message("user", "hi")], enable_thinking=False)
    text = loaded.processor.tokenizer.decode(prep.inputs["input_ids"][0])
    if name == "qwen2_5_omni":  # not a thinking model: its template has no think block, none is added
        assert "<think>" not in text and text.rstrip().endswith("assistant")
        return
    assert text.rstrip().endswith("</think>")
    prep_on = engine.family.prepare(loaded.processor, [Message("user", "hi")], enable_thinking=True)
    assert "</think>" not in loaded.processor.tokenizer.decode(prep_on.inputs["input_ids"][0])


def test_a_text_only_prompt_does_not_reuse_the_last_images_rope_offset(served):
    """M-RoPE models cache the prompt's position offset; a text-only prompt must decode from its own (none)."""
    name, loaded, engine, size, *_ = served
    _ask(engine, Image.new("RGB", size, "blue"))
    assert loaded.model.model.rope_deltas is not None  # the image prompt set an offset
    events = _ask(engine, None, thinking=False, text="and now?")
    assert events[-1].__class__.__name__ == "Done", events[-1]
    assert not any(isinstance(e, Focus) for e in events)
    deltas = loaded.model.model.rope_deltas  # the Omni thinker recomputes it on every prefill: zero for plain text
    assert deltas is None or not deltas.any()


def test_a_request_prepares_its_prompt_once_and_again_only_after_dropping_turns(served, monkeypatch):
    name, loaded, engine, size, *_ = served
    calls = []
    real = engine.family.prepare
    monkeypatch.setattr(engine.family, "prepare", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    events = _ask(engine, Image.new("RGB", size, "red"))
    assert calls == [1] and events[-1].__class__.__name__ == "Done"

    calls.clear()
    turn = "describe the picture and every shape in it please " * 3
    history = []
    for i in range(8):
        history += [Message("user", f"{i} {turn}"), Message("assistant", "A red circle.")]
    request = ChatRequest(history + [Message("user", "And now?")], Options(max_new_tokens=12, temperature=0))
    events = engine.run(request)
    notices = [e for e in events if e.__class__.__name__ == "Notice"]
    stats = next(e for e in events if isinstance(e, Stats))
    assert notices and "oldest" in notices[0].message
    dropped = int(notices[0].message.split("oldest ")[1].split(" ")[0])
    kept = history[2 * dropped:] + request.messages[-1:]
    # the whole conversation, then the shorter candidates (each counted by preparing it), then the one kept
    assert calls == [len(request.messages)] + [len(request.messages) - 2 * d for d in range(1, dropped + 1)] + \
        [len(kept)]
    assert stats.prompt_tokens == real(loaded.processor, kept, True).inputs["input_ids"].shape[1]
    assert stats.prompt_tokens + 12 <= 512


def test_omni_prompt_spans_follow_the_processor_placeholders(served):
    """Image and audio spans sit on the runs of their pad tokens, audio after the image, and the modality array
    marks them; a recording's span has exactly as many positions as the audio encoder has frames for it."""
    name, loaded, engine, size, _ = served
    msg = Message("user", "what do you hear?", [Image.new("RGB", size)], [Audio(RECORDING, 16000)])
    if not engine.family.hears_audio:  # a model that does not hear gets no recording (no ASR configured here)
        with pytest.raises(BadRequest, match="does not hear audio"):
            engine.submit(ChatRequest([msg], Options(max_new_tokens=2)))
        return
    prep = engine.family.prepare(loaded.processor, [msg], enable_thinking=True)
    ids = prep.inputs["input_ids"][0].numpy()
    audio_id = loaded.processor.tokenizer.convert_tokens_to_ids(engine.family.audio_token)
    (img,), (aud,) = prep.image_spans, prep.audio_spans
    assert img.start + img.rows * img.cols < aud.start
    assert aud.frames == audio_tokens(loaded, RECORDING) == int((ids == audio_id).sum())
    assert (ids[aud.start : aud.start + aud.frames] == audio_id).all()
    assert (prep.modality == 2).sum() == aud.frames and (prep.modality == 1).sum() == img.rows * img.cols
    assert "input_features" in prep.inputs and "feature_attention_mask" in prep.inputs  # the model's own encoder
    # two recordings: two spans, in prompt order
    two = Message("user", "and these?", [], [Audio(RECORDING, 16000), Audio(RECORDING[:8000], 16000)])
    prep2 = engine.family.prepare(loaded.processor, [two], enable_thinking=True)
    a, b = prep2.audio_spans
    assert a.start + a.frames < b.start and b.frames < a.frames
    assert engine.family.count_tokens(loaded.processor, [two], True) == prep2.inputs["input_ids"].shape[1]


def test_a_thinker_only_omni_checkpoint_loads_too(tmp_path):
    path = tiny.build_qwen2_5_omni(tmp_path / "thinker", full=False)
    loaded = load_model(path, quantize="int4")
    assert family_for(loaded.model).name == "qwen2_5_omni"
    assert type(loaded.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    engine = Engine(loaded, Limits(context_limit=512))
    try:
        events = _ask(engine, None, audio=RECORDING)
    finally:
        engine.close()
    assert events[-1].__class__.__name__ == "Done", events[-1]
    focus = [e for e in events if isinstance(e, Focus)]
    assert focus and all(f.images == [] and f.audios[0].shape == (audio_tokens(loaded, RECORDING),) for f in focus)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_5_omni"])
def test_focus_probe_matches_eager_attention_probabilities(tmp_path, name):
    """The probed SDPA path computes the same rows as eager attention's own probabilities (M-RoPE applied),
    for the image map and, on the Omni thinker, the recording's map over time."""
    path = CASES[name][0](tmp_path / "q")
    image = Image.new("RGB", (84, 56), "green")
    recording = RECORDING if name == "qwen2_5_omni" else None
    maps, audio_maps = {}, {}
    for impl in ("sdpa", "eager"):
        loaded = load_model(path, quantize="fp32", attn_implementation=impl)
        engine = Engine(loaded)
        try:
            events = _ask(engine, image, audio=recording)
        finally:
            engine.close()
        maps[impl] = np.stack([e.per_layer_images[0] for e in events if isinstance(e, Focus)])
        audio_maps[impl] = [a for e in events if isinstance(e, Focus) for a in e.per_layer_audios]
        assert next(e for e in events if isinstance(e, Stats)).attention == ("eager" if impl == "eager" else "sdpa+probe")
    np.testing.assert_allclose(maps["sdpa"], maps["eager"], atol=1e-5)
    assert len(audio_maps["sdpa"]) == len(audio_maps["eager"]) == (len(maps["sdpa"]) if recording is not None else 0)
    for a, b in zip(audio_maps["sdpa"], audio_maps["eager"]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_an_undescribed_model_type_is_refused_with_the_supported_list():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="qwen2_audio.*supported: autoglm, glm4v.*qwen3_omni_moe"):
        family_for(SimpleNamespace(model_type="qwen2_audio"))
    for model_type in ("qwen2_5_omni", "qwen2_5_omni_thinker", "qwen3_omni_moe", "qwen3_omni_moe_thinker"):
        assert family_for(SimpleNamespace(model_type=model_type)).name == model_type.removesuffix("_thinker")
