"""The demo model's training-only focus supervision: which tokens are about which shape, which
patches a shape covers, and the loss itself against the decoder's own eager attention."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training.losses import FocusSupervision, focus_spans, focus_targets, patch_targets
from training.data import encode, make_sample
from training.speech import espeak_available as speech_available
from training.shapesworld import QA, Scene, Shape
from training.train import focus_rows, load_initial
from autoglm_app.modeling.small import build_small, save_small

RED_TOP = Shape("circle", "red", "top", (50, 10, 80, 40))
RED_TOP_LEFT = Shape("circle", "red", "top left", (5, 5, 35, 35))
BLUE_CENTER = Shape("square", "blue", "center", (45, 45, 80, 80))
SCENE = Scene(128, (RED_TOP_LEFT, RED_TOP, BLUE_CENTER), seed=1)


def _spans_by_text(target: str, qa: QA, scene: Scene) -> list[tuple[str, tuple]]:
    return [(target[a:b], s.triple) for a, b, s in focus_spans(target, qa, scene)]


def test_phrases_name_their_own_shape_and_top_is_not_top_left():
    qa = QA("describe", "Describe the image.", "", "", None)
    target = ("There are three shapes: a red circle at the top left, a red circle at the top and "
              "a blue square at the center.<|endoftext|>")
    spans = _spans_by_text(target, qa, SCENE)
    assert spans == [("red circle at the top left", RED_TOP_LEFT.triple),
                     ("red circle at the top", RED_TOP.triple),
                     ("blue square at the center", BLUE_CENTER.triple)]


def test_a_resolved_question_points_its_last_trace_sentence_and_answer_at_the_target():
    qa = QA("color", "What color is the square?", "", "The square is blue.", BLUE_CENTER)
    target = ("<think>I see a blue square at the center. The question asks about the square. "
              "It is blue.</think>The square is blue.<|endoftext|>")
    spans = _spans_by_text(target, qa, Scene(128, (BLUE_CENTER,), 1))
    assert ("It is blue.", BLUE_CENTER.triple) in spans
    assert ("The square is blue.", BLUE_CENTER.triple) in spans
    # the sentence that only restates the question is not supervised
    assert not any("question asks" in text for text, _ in spans)


def test_unresolved_questions_supervise_only_phrases():
    qa = QA("count", "How many shapes are there?", "", "There are three shapes.", None)
    target = "There are three shapes.<|endoftext|>"
    assert focus_spans(target, qa, SCENE) == []


def test_patch_targets_are_the_patches_whose_centre_is_in_the_box():
    # 128 px canvas, 8x8 grid of 16 px patches: centres at 8, 24, 40, ...
    assert patch_targets(Shape("square", "red", "top left", (0, 0, 30, 30)), 128, 8) == [0, 1, 8, 9]
    assert patch_targets(Shape("square", "red", "center", (45, 45, 80, 80)), 128, 8) == [27, 28, 35, 36]
    # on a 256 px canvas the same grid has 32 px patches
    assert patch_targets(Shape("square", "red", "top left", (0, 0, 30, 30)), 256, 8) == [0]


def test_every_shape_of_a_random_scene_covers_at_least_one_patch():
    from training.shapesworld import random_scene

    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng, rng.choice((128, 160, 192, 224, 256)))
        for s in scene.shapes:
            assert patch_targets(s, scene.size, 8), (s, scene.size)


def test_focus_targets_assign_each_token_once_phrase_first():
    offsets = [(0, 3), (3, 7), (7, 10), (10, 10)]
    spans = [(3, 7, RED_TOP), (0, 10, BLUE_CENTER)]
    got = focus_targets(offsets, spans, 128, 8)
    red, blue = patch_targets(RED_TOP, 128, 8), patch_targets(BLUE_CENTER, 128, 8)
    assert got == [(0, blue), (1, red), (2, blue)]  # the empty token (10, 10) is skipped


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = save_small(str(tmp_path_factory.mktemp("small")), seed=3)
    return load_initial(Path(path))


def test_rows_query_the_position_that_writes_the_supervised_token(small):
    model, processor, _ = small
    rng = random.Random(4)
    samples = [make_sample(rng, spoken_p=0.0, thinking=True, task="where") for _ in range(6)]
    encoded = [encode(processor, s) for s in samples]
    rows = focus_rows(samples, encoded, model.config.image_token_id, 4)
    assert rows
    tok = processor.tokenizer
    for i, q, first, patches in rows:
        ids = encoded[i]["input_ids"]
        assert ids[first] == model.config.image_token_id and ids[first - 1] != model.config.image_token_id
        assert q + 1 >= encoded[i]["prompt_len"]  # the written token is the assistant's
        written = tok.decode([ids[q + 1]])
        assert written in samples[i].target
        assert all(0 <= p < 16 for p in patches)


def test_loss_is_minus_log_of_the_eager_head_mean_image_attention_on_the_target(small):
    model, processor, _ = small
    rng = random.Random(5)
    samples = [make_sample(rng, spoken_p=0.0, thinking=True, task="color") for _ in range(4)]
    encoded = [encode(processor, s) for s in samples]
    from training.data import collate

    batch = collate(encoded, processor.tokenizer.pad_token_id)
    rows = focus_rows(samples, encoded, model.config.image_token_id, 4)
    assert rows
    layer = model.config.num_hidden_layers - 1
    sup = FocusSupervision(model, [layer]).attach()
    model.train()
    out = model(**batch, use_cache=False)
    loss = sup.loss(rows)
    sup.detach()

    # independent: the layer's full eager attention probabilities, renormalised over the patches
    captured = {}

    def keep(layer_idx, q, k, mask, probs, n_mem):
        if layer_idx == layer:
            captured["probs"] = probs

    for m in (layer_.self_attn for layer_ in model.model.layers):
        m.focus_probe = keep
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        model.config._attn_implementation = "sdpa"
        for m in (layer_.self_attn for layer_ in model.model.layers):
            m.focus_probe = None
    probs = captured["probs"]  # (B, H, T, S)
    expected = []
    for i, q, first, patches in rows:
        row = probs[i, :, q, first:first + 16]
        row = (row / row.sum(-1, keepdim=True)).mean(0)
        expected.append(-torch.log(row[patches].sum()))
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)

    # it trains the supervised layer's queries and keys, and nothing after that layer's attention
    (loss + 0 * out.loss).backward()
    attn = model.model.layers[layer].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[layer].mlp is not None
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.lm_head.parameters())


def _exported(small, tmp_path) -> Path:
    """The small model saved as a model directory, to start a training stage from."""
    model, processor, _ = small
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    processor.save_pretrained(str(src))
    return src


def test_training_runs_a_step_with_focus_supervision_from_an_exported_model(small, tmp_path):
    from training import train

    src = _exported(small, tmp_path)
    train.main(["--init-from", str(src), "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "3",
                "--no-export", "--focus", "0.2", "--focus-layers", "0,1", "--spoken-p", "0",
                "--task-weights", "0,1,1,0,0,0"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu")
    assert state["step"] == 2
    assert "aux" in state
    # --export-only writes the run's latest weights as an fp16 model directory the app loads
    train.main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "exported"), "--export-only"])
    exported, _, _ = load_initial(tmp_path / "exported")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, state["model"][name].half().float()), name
    with pytest.raises(SystemExit):
        train.main(["--init-from", str(src), "--out", str(tmp_path / "run2"), "--steps", "1",
                    "--no-export", "--task-weights", "1,2"])


def test_build_small_has_the_attention_layout_the_loss_expects():
    model, _ = build_small()
    assert all(hasattr(layer_, "self_attn") for layer_ in model.model.layers)


def test_question_first_template_puts_the_question_before_the_media_and_survives_a_save(small, tmp_path):
    from training import train
    from autoglm_app.modeling import AutoGLMProcessor
    from autoglm_app.modeling.processing_autoglm import CHAT_TEMPLATES

    _, processor, _ = small
    src = _exported(small, tmp_path)
    train.main(["--init-from", str(src), "--out", str(tmp_path / "run"), "--steps", "1", "--batch", "2",
                "--no-export", "--spoken-p", "0", "--template", "question-first"])
    train.main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "exported"), "--export-only"])
    loaded = AutoGLMProcessor.from_pretrained(str(tmp_path / "exported"))
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATES["question-first"]
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Hi?"},
                                         {"type": "image"}]}]
    prompt = loaded.apply_chat_template(turn, enable_thinking=False)
    assert prompt == "<|user|>\nHi?<|audio|><|image|><|image|>\n<|assistant|>\n<think></think>"
    assert processor.apply_chat_template(turn, enable_thinking=False) == \
        "<|user|>\n<|image|><|audio|>Hi?<|image|>\n<|assistant|>\n<think></think>"
    # history turns and plain-string content read the same under both orders
    history = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Me."},
               {"role": "user", "content": [{"type": "text", "text": "And?"}]}]
    assert loaded.apply_chat_template(history) == processor.apply_chat_template(history)


def _summary(**over):
    s = {"scenes": 500, "questions": 0.96, "questions_by_task": {"color": 0.97, "where": 0.95, "count": 0.96,
                                                                 "exists": 0.96},
         "questions_by_thinking": {"on": 0.97, "off": 0.95}, "captions": 0.93, "spoken_heldout_voices": 0.9,
         "identity_en": 1.0, "identity_zh": 1.0, "format_thinking_on": 1.0, "format_thinking_off": 1.0,
         "pointing": 0.85, "pointing_rule": "mean(2-3)", "expert_cv_per_layer": [0.3, 0.2],
         "ttft_ms_median": 18.0, "decode_tokens_per_second_median": 150.0}
    s.update(over)
    return s


def test_the_card_names_each_missed_target_and_only_those():
    from training.evaluate import model_card, shortfalls

    assert shortfalls(_summary()).startswith("Every quality target")
    text = shortfalls(_summary(questions=0.7, pointing=0.5, expert_cv_per_layer=[0.6, 0.1]))
    assert "questions (colour, where, count, existence): 0.7 (target ≥ 0.95)" in text
    assert "pointing game: 0.5 (target ≥ 0.8)" in text
    assert "max expert-load CV: 0.6 (target ≤ 0.5)" in text
    assert "captions" not in text and "spoken" not in text
    assert shortfalls(_summary(spoken_heldout_voices=None)).startswith("Every")  # not measured is not missed
    config = {"vision_model": "vit-tiny", "image_size": 128, "patch_size": 16, "vision_depth": 4,
              "vision_embed_dim": 128, "num_mel_bins": 80, "audio_layers": 3, "audio_hidden_size": 128,
              "adapter_rank": 64, "num_hidden_layers": 4, "hidden_size": 192, "num_attention_heads": 6,
              "num_key_value_heads": 2, "num_experts_per_tok": 2, "num_experts": 4, "moe_intermediate_size": 256,
              "capacity_factor": 2.0, "router_aux_loss_coef": 0.02, "vocab_size": 541,
              "focus_aggregation": "mean", "focus_layers": [2, 4]}
    card = model_card(_summary(questions=0.7), config, 4_580_000, 9 * 2**20, "stage notes")
    assert "| questions (colour/where/count/exists) | 0.7 | ≥ 0.95 |" in card
    assert "Measured shortfalls" in card and "stage notes" in card


def test_worker_processes_make_the_same_batches_in_step_order(small):
    """--workers: batches come from other processes, in step order, equal to the in-loop ones."""
    from types import SimpleNamespace

    from training.train import step_batches

    model, processor, _ = small
    grid = model.config.image_size // model.config.patch_size
    args = SimpleNamespace(steps=4, batch=3, seed=7, spoken_p=0.0, thinking_p=0.5, focus=0.2,
                           voices="train", workers=0, perturb_speech=False, perturb_eq=0.0,
                           mask_speech=False)
    inline = list(step_batches(processor, args, None, 1, grid, model.config.image_token_id))
    args.workers = 2
    pooled = list(step_batches(processor, args, None, 1, grid, model.config.image_token_id))
    assert len(inline) == len(pooled) == 3
    for (b1, c1, q1, r1), (b2, c2, q2, r2) in zip(inline, pooled):
        assert b1.keys() == b2.keys()
        for k in b1:
            assert torch.equal(b1[k], b2[k]), k
        assert (c1, q1) == (c2, q2)
        assert [tuple(r[:3]) + (list(r[3]),) for r in r1] == [tuple(r[:3]) + (list(r[3]),) for r in r2]
    # different steps draw different scenes
    assert not torch.equal(inline[0][0]["input_ids"], inline[1][0]["input_ids"])


@pytest.mark.skipif(not speech_available(), reason="espeak-ng not installed")
def test_feature_masking_changes_only_the_recording_of_a_spoken_sample(small):
    """--mask-speech: the same tokens, labels and image; the audio features masked in place."""
    _, processor, _ = small
    sample = make_sample(random.Random(4), spoken=True, task="where")
    plain = encode(processor, sample)
    masked = encode(processor, sample, random.Random(0))
    assert masked["input_ids"] == plain["input_ids"] and masked["labels"] == plain["labels"]
    assert torch.equal(masked["pixel_values"], plain["pixel_values"])
    assert torch.equal(masked["audio_feature_lengths"], plain["audio_feature_lengths"])
    assert masked["audio_features"].shape == plain["audio_features"].shape
    assert not torch.equal(masked["audio_features"], plain["audio_features"])
    assert torch.equal(encode(processor, sample, random.Random(0))["audio_features"], masked["audio_features"])


@pytest.mark.skipif(not speech_available(), reason="espeak-ng not installed")
def test_spoken_only_evaluation_asks_every_scene_and_the_full_evaluations_recordings(monkeypatch):
    """--spoken-only: one spoken question per scene; where the full evaluation asks one, the same one."""
    from types import SimpleNamespace

    from training import evaluate as ev

    asked = []

    def fake_ask(engine, message, thinking, session):
        asked.append((session, message.text, [a.samples for a in message.audios]))
        return "", "The red circle is at the top.", [], {}, None

    monkeypatch.setattr(ev, "ask", fake_ask)
    engine = SimpleNamespace(loaded=SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2))))
    full = ev.evaluate(engine, 6, True, identity=1)
    full_spoken = [a for a in asked if a[2]]
    asked.clear()
    only = ev.evaluate(engine, 6, True, identity=1, spoken_only=True)
    assert only["counts"] == {"qa": 0, "caption": 0, "spoken": 6, "identity_en": 0, "identity_zh": 0}
    assert full["counts"]["spoken"] == 2 and all(a[2] and not a[1] for a in asked)
    same = {a[0]: a[2][0] for a in asked}
    assert [s for s, _, _ in full_spoken] == ["eval-0", "eval-3"]
    for session, _, audios in full_spoken:
        assert np.array_equal(same[session], audios[0])
    assert set(only["spoken_by_task"]) == set(ev.QUESTION_TASKS)
    assert "6 spoken questions" in ev.spoken_table(only)
