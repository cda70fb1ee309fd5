"""Evaluate AutoGLM-Phone-Tiny on held-out ShapesWorld scenes and voices, through the app's engine.

    python -m training.evaluate                       # 500 scenes, writes JSON + a table
    python -m training.evaluate --scenes 50 --no-speech

Per scene: one question (colour / where / count / existence, by turns), one description,
and every third scene a spoken question in a held-out voice; plus identity questions in
English and Chinese. Thinking alternates on and off. Scenes come from random streams the
training never draws (training seeds are ``seed * 1_000_003 + step``; these start at 10**9).

Pointing game: while the model writes the shape word of its answer to a "where" / "what
color" question, is the peak of its caption-focus map inside that shape's box? Every
layer-aggregation rule is scored on the first half of the scenes and the best is reported
on the second half (``--set-default`` writes it into the checkpoint's config).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoglm_app.config import DEMO_MODEL
from autoglm_app.engine.worker import Engine
from autoglm_app.events import Answer, Audio, ChatRequest, Done, Focus, Message, Options, Reasoning, Routing, Stats
from autoglm_app.loading.checkpoints import load_model
from autoglm_app.events import balance_cv_rows
from . import speech
from .shapesworld import IDENTITY_ANSWER_EN, IDENTITY_ANSWER_ZH, caption_tuples, make_qa, random_scene, render, \
    scene_tuples

log = logging.getLogger("autoglm.evaluate")

QUESTION_TASKS = ("color", "where", "count", "exists")
HELDOUT_SEED = 10**9


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


@dataclass
class Result:
    kind: str  # "qa" | "caption" | "spoken" | "identity_en" | "identity_zh"
    task: str
    thinking: bool
    correct: bool
    format_ok: bool
    reasoning: str
    answer: str
    expected: str
    pointing: dict = field(default_factory=dict)  # rule -> hit (bool), only for pointing questions
    voice: str = ""  # the held-out voice of a spoken question


def ask(engine: Engine, message: Message, thinking: bool, session: str) -> tuple[str, str, list, dict, Stats]:
    req = ChatRequest([message], Options(enable_thinking=thinking, temperature=0.0, max_new_tokens=160,
                                         seed=0), session_id=session)
    reasoning, answer, focus, load, stats = "", "", [], {}, None
    for e in engine.submit(req).events():
        if isinstance(e, Reasoning):
            reasoning += e.text
        elif isinstance(e, Answer):
            answer += e.text
        elif isinstance(e, Focus):
            focus.append(e)
        elif isinstance(e, Routing):
            load = e.load
        elif isinstance(e, Stats):
            stats = e
        elif not isinstance(e, Done) and hasattr(e, "kind"):
            raise RuntimeError(e.message)
    return reasoning, answer, focus, load, stats


def candidate_rules(n_layers: int) -> dict[str, tuple[str, tuple[int, int] | None]]:
    rules = {"mean(all)": ("mean", None), "max(all)": ("max", None)}
    for i in range(n_layers):
        rules[f"layer {i}"] = ("mean", (i, i + 1))
    for i in range(n_layers - 1):
        rules[f"mean({i}-{n_layers - 1})"] = ("mean", (i, n_layers))
    return rules


def pointing_hits(focus: list[Focus], target, size: int, rules: dict) -> dict[str, bool]:
    """Peak of the focus map while writing the shape word, per aggregation rule: inside the box?"""
    tokens = [f for f in focus if f.phase == "answer" and target.kind.startswith(f.token.strip()) and f.token.strip()]
    if not tokens:
        return {}
    per_layer = tokens[0].per_layer_images[0]  # (layers, rows, cols)
    rows, cols = per_layer.shape[1:]
    x0, y0, x1, y1 = target.box
    hits = {}
    for name, (rule, layers) in rules.items():
        stack = per_layer if layers is None else per_layer[layers[0]:layers[1]]
        m = stack.max(0) if rule == "max" else stack.mean(0)
        r, c = np.unravel_index(int(m.argmax()), m.shape)
        cx, cy = (c + 0.5) * size / cols, (r + 0.5) * size / rows
        hits[name] = bool(x0 <= cx < x1 and y0 <= cy < y1)
    return hits


def format_ok(reasoning: str, answer: str, thinking: bool) -> bool:
    return bool(answer.strip()) and (bool(reasoning.strip()) if thinking else reasoning == "")


def evaluate(engine: Engine, scenes: int, speech_on: bool, identity: int = 20, spoken_only: bool = False) -> dict:
    """Every scene's questions through ``engine``. With ``spoken_only``, only spoken questions, one per
    scene (the scenes that have one in the full evaluation ask the same recording), no identity."""
    model = engine.loaded.model
    rules = candidate_rules(model.config.num_hidden_layers)
    results: list[Result] = []
    loads = None
    ttft, tps = [], []
    spoken_ok = speech_on and speech.espeak_available()
    if spoken_only and not spoken_ok:
        raise RuntimeError("a spoken-only evaluation needs speech_on and espeak-ng (apt-get install espeak-ng)")
    t0 = time.time()
    for i in range(scenes):
        rng = random.Random(HELDOUT_SEED + i)
        scene = random_scene(rng, rng.choice((128, 160, 192, 224, 256)))
        image = render(scene)
        thinking = i % 2 == 0
        jobs = [("qa", make_qa(scene, rng, QUESTION_TASKS[i % 4]), False),
                ("caption", make_qa(scene, rng, "describe"), False)]
        if spoken_ok and (i % 3 == 0 or spoken_only):
            jobs.append(("spoken", make_qa(scene, rng, QUESTION_TASKS[(i // 3) % 4]), True))
        if spoken_only:  # the text questions were drawn (the rng stream stays the same) but are not asked
            jobs = [job for job in jobs if job[2]]
        for kind, qa, spoken in jobs:
            voice = ""
            if spoken:
                voice = rng.choice(speech.VOICES_HELDOUT)  # the draws synthesize() makes
                audio = speech.speak(qa.question, rng, voice)
                msg = Message("user", "", [image], [Audio(audio, speech.SAMPLE_RATE)])
            else:
                msg = Message("user", qa.question, [image])
            reasoning, answer, focus, load, stats = ask(engine, msg, thinking, f"eval-{i}")
            if kind == "caption":
                correct = caption_tuples(answer) == scene_tuples(scene)
            else:
                correct = normalise(answer) == normalise(qa.answer)
            res = Result(kind, qa.task, thinking, correct, format_ok(reasoning, answer, thinking),
                         reasoning, answer, qa.answer, voice=voice)
            if qa.target is not None and qa.task in ("where", "color") and not spoken:
                res.pointing = pointing_hits(focus, qa.target, scene.size, rules)
            results.append(res)
            if load:
                total = np.array(load["total"])
                loads = total if loads is None else loads + total
            if stats and stats.completion_tokens > 8:
                ttft.append(stats.ttft_s)
                tps.append(stats.tokens_per_second)
        if (i + 1) % 50 == 0:
            log.info("%d/%d scenes, %.1f min", i + 1, scenes, (time.time() - t0) / 60)
    for j in range(0 if spoken_only else identity):
        for lang, question, expected in (("en", "Who are you?", IDENTITY_ANSWER_EN),
                                         ("zh", "你是谁?", IDENTITY_ANSWER_ZH)):
            thinking = j % 2 == 0
            reasoning, answer, *_ = ask(engine, Message("user", question), thinking, f"id-{j}")
            results.append(Result(f"identity_{lang}", "identity", thinking,
                                  normalise(answer) == normalise(expected),
                                  format_ok(reasoning, answer, thinking), reasoning, answer, expected))
    return summarise(results, loads, rules, ttft, tps, scenes)


def rate(rs: list[Result]) -> float | None:
    return round(sum(r.correct for r in rs) / len(rs), 4) if rs else None


def summarise(results: list[Result], loads, rules: dict, ttft: list, tps: list, scenes: int) -> dict:
    qa = [r for r in results if r.kind == "qa"]
    pointed = [r for r in results if r.pointing]
    half = len(pointed) // 2
    val, test = pointed[:half], pointed[half:]

    def point_rate(rs, name):
        scored = [r.pointing[name] for r in rs if name in r.pointing]
        return sum(scored) / len(scored) if scored else 0.0

    best = max(rules, key=lambda n: point_rate(val, n)) if val else "mean(all)"
    think_on = [r for r in results if r.thinking]
    think_off = [r for r in results if not r.thinking]
    summary = {
        "scenes": scenes,
        "questions": rate(qa),
        "questions_by_task": {t: rate([r for r in qa if r.task == t]) for t in QUESTION_TASKS},
        "questions_by_thinking": {"on": rate([r for r in qa if r.thinking]),
                                  "off": rate([r for r in qa if not r.thinking])},
        "captions": rate([r for r in results if r.kind == "caption"]),
        "spoken_heldout_voices": rate([r for r in results if r.kind == "spoken"]),
        "spoken_by_task": {t: rate([r for r in results if r.kind == "spoken" and r.task == t])
                           for t in QUESTION_TASKS},
        "spoken_by_voice": {v: rate([r for r in results if r.kind == "spoken" and r.voice == v])
                            for v in speech.VOICES_HELDOUT if any(r.voice == v for r in results)},
        "identity_en": rate([r for r in results if r.kind == "identity_en"]),
        "identity_zh": rate([r for r in results if r.kind == "identity_zh"]),
        "format_thinking_on": round(sum(r.format_ok for r in think_on) / max(1, len(think_on)), 4),
        "format_thinking_off": round(sum(r.format_ok for r in think_off) / max(1, len(think_off)), 4),
        "pointing": round(point_rate(test, best), 4),
        "pointing_rule": best,
        "pointing_rule_value": list(rules[best][:1]) + [list(rules[best][1]) if rules[best][1] else None],
        "pointing_by_rule_validation": {n: round(point_rate(val, n), 4) for n in rules},
        "pointing_questions": len(test),
        "expert_cv_per_layer": [round(cv, 4) for cv in balance_cv_rows(loads)] if loads is not None else [],
        "ttft_ms_median": round(1000 * float(np.median(ttft)), 1) if ttft else None,
        "decode_tokens_per_second_median": round(float(np.median(tps)), 1) if tps else None,
        "counts": {k: sum(r.kind == k for r in results) for k in ("qa", "caption", "spoken", "identity_en",
                                                                   "identity_zh")},
        "errors": [{"kind": r.kind, "task": r.task, "expected": r.expected, "answer": r.answer}
                   | ({"voice": r.voice} if r.voice else {})
                   for r in results if not r.correct][:60],
    }
    return summary


def table(s: dict) -> str:
    rows = [
        ("questions (colour/where/count/exists)", s["questions"], "≥ 0.95"),
        ("captions, exact (colour, shape, place) set", s["captions"], "≥ 0.90"),
        ("spoken questions, held-out voices", s["spoken_heldout_voices"], "≥ 0.85"),
        *[(f"  spoken, voice {v}", x, "") for v, x in (s.get("spoken_by_voice") or {}).items()],
        ("identity, English", s["identity_en"], "1.0"),
        ("identity, Chinese", s["identity_zh"], "1.0"),
        ("think/answer format, thinking on", s["format_thinking_on"], "1.0"),
        ("think/answer format, thinking off", s["format_thinking_off"], "1.0"),
        (f"pointing game ({s['pointing_rule']})", s["pointing"], "≥ 0.80"),
        ("max expert-load CV over layers", max(s["expert_cv_per_layer"] or [0]), "≤ 0.5"),
        ("median TTFT, ms (CPU)", s["ttft_ms_median"], "≤ 300"),
        ("median decode tokens/s (CPU)", s["decode_tokens_per_second_median"], "≥ 30"),
    ]
    return _markdown("metric", rows)


def _markdown(first: str, rows) -> str:
    lines = [f"| {first} | value | target |", "|---|---|---|"]
    return "\n".join(lines + [f"| {name} | {value} | {target} |" for name, value, target in rows])


def spoken_table(s: dict) -> str:
    """The spoken rows only (``--spoken-only``), by voice and by task."""
    rows = [("spoken questions, held-out voices", s["spoken_heldout_voices"], "≥ 0.85"),
            *[(f"  voice {v}", x, "") for v, x in s["spoken_by_voice"].items()],
            *[(f"  task {t}", x, "") for t, x in s["spoken_by_task"].items()]]
    return _markdown(f"{s['counts']['spoken']} spoken questions", rows)


def shortfalls(s: dict) -> str:
    """One sentence per acceptance target this evaluation did not meet (for the card's Limits)."""
    checks = [
        ("questions (colour, where, count, existence)", s["questions"], 0.95, True),
        ("captions with exactly the right set", s["captions"], 0.90, True),
        ("spoken questions on held-out voices", s["spoken_heldout_voices"], 0.85, True),
        ("pointing game", s["pointing"], 0.80, True),
        ("identity in English", s["identity_en"], 1.0, True),
        ("identity in Chinese", s["identity_zh"], 1.0, True),
        ("think/answer format with thinking on", s["format_thinking_on"], 1.0, True),
        ("think/answer format with thinking off", s["format_thinking_off"], 1.0, True),
        ("max expert-load CV", max(s["expert_cv_per_layer"] or [0]), 0.5, False),
    ]
    missed = [f"{name}: {value} (target {'≥' if high else '≤'} {target})" for name, value, target, high in checks
              if value is not None and (value < target if high else value > target)]
    if not missed:
        return "Every quality target of the evaluation above is met on these held-out scenes."
    by_task = ", ".join(f"{t} {v}" for t, v in s["questions_by_task"].items())
    thinking = s.get("questions_by_thinking") or {}
    return ("Measured shortfalls of this checkpoint: " + "; ".join(missed) + ". Questions by task: "
            + by_task + (f"; with thinking on {thinking.get('on')}, off {thinking.get('off')}" if thinking else "")
            + ". More training (a GPU, or hours on the CPU) is the known remedy.")


# What the app reads from the card (autoglm_app/loading/card.py): the page shows the domain next to the
# model's name and defaults to "each turn alone" for a model trained on single turns.
CARD_FRONT_MATTER = """---
domain: "ShapesWorld only: flat coloured circles, squares and triangles on a light background, the question \
templates it was trained on, and espeak-ng voices"
conversation: single-turn
---
"""


def model_card(summary: dict, config: dict, n_params: int, size_bytes: int, stages: str = "") -> str:
    """The checkpoint's README: architecture, recipe, evaluation, limits."""
    c = config
    return f"""{CARD_FRONT_MATTER}# AutoGLM-Phone-Tiny

A {n_params / 1e6:.2f}M-parameter AutoGLM-Phone model trained by the AutoGLM Studio project on
generated ShapesWorld scenes, so the app runs and shows true things with no download and no GPU.
Weights: fp16 safetensors, {size_bytes / 2**20:.1f} MiB, with tokenizer, chat template and processor config.

## Architecture
- vision: timm `{c["vision_model"]}` family, {c["image_size"]} px input, {c["patch_size"]} px patches
  ({c["image_size"] // c["patch_size"]}x{c["image_size"] // c["patch_size"]} grid), depth {c["vision_depth"]},
  width {c["vision_embed_dim"]}
- speech: log-mel ({c["num_mel_bins"]} bins, 25 ms window, 10 ms hop), two stride-2 convolutions and
  {c["audio_layers"]} transformer layers of width {c["audio_hidden_size"]} (40 ms per audio token)
- adapter: rank-{c["adapter_rank"]} projections into the decoder
- decoder: {c["num_hidden_layers"]} GLM-style layers, width {c["hidden_size"]}, {c["num_attention_heads"]} query /
  {c["num_key_value_heads"]} KV heads; every feed-forward a top-{c["num_experts_per_tok"]} of {c["num_experts"]}
  experts MoE (width {c["moe_intermediate_size"]}, capacity factor {c["capacity_factor"]}, load-balancing loss
  coefficient {c["router_aux_loss_coef"]}); byte-level BPE vocabulary of {c["vocab_size"]}
- caption-focus default: {c.get("focus_aggregation")} over {
    f"layers {c['focus_layers']}" if c.get("focus_layers") else "all layers"}
  (the rule that pointed best on validation scenes)

## Training
`python -m training.train` (resumable; the learning-rate schedule follows a time budget).
Every step draws 24 fresh samples: a scene (128-256 px, 1-3 shapes), one task (describe, colour,
where, count, existence, identity in English or Chinese), thinking on for 60% of samples
(`<think>` trace, then the answer) and off for the rest, and a spoken question (espeak-ng, 8
training voices, 18 from stage 8 on; random speed, pitch, level and noise; from stage 9 on also
speed, spectral-tilt and equaliser augmentation, in stage 10 also masked mel bands and time spans)
for 25% of the English questions (up to 70% in later stages). AdamW (peak LR 2e-3, betas 0.9/0.95,
weight decay 0.01), warm-up then cosine, gradient clip 1.0, loss on the assistant tokens only, on
the CPU (stage 8 on a GPU). From stage 3 on, two auxiliary heads (training only, not in this
checkpoint; `training/losses.py`, weight `--aux 0.5`) give the encoders their own targets: the adapter's image features pooled per cell of the 3x3 grid must name what the cell holds
(empty or one of 12 colour-shape pairs), and the adapter's speech features pooled per recording
must name the spoken question's task and the colour and shape words in it. From stage 5 on, a
focus-supervision loss (training only, `--focus`, `--focus-layers`) asks that while the model writes
about one shape (a "<colour> <shape> at the <place>" phrase, or the answer and last trace sentence
of a question that resolves to one shape) the head-mean image attention of the supervised decoder
layers, renormalised over the patches, falls on the patches inside that shape's box: the same
quantity the app's focus map draws. From stage 6 on, the checkpoint's chat template is
question-first: a user turn's text (or recording) comes before its image, so under causal attention
the image's patch tokens read the question and can work out for themselves whether they are the
shape being asked about.

{stages}

## Evaluation
`python -m training.evaluate` on {summary["scenes"]} held-out scenes (random streams the training never
draws), spoken questions in 3 held-out voices, greedy decoding through the app's engine:

{table(summary)}

## Limits
{shortfalls(summary)}

It knows only ShapesWorld: flat coloured circles, squares and triangles on a light background,
the question templates it was trained on, and espeak-ng voices. Real photos, other objects,
free-form questions and human voices are outside its world, and it will answer them with
ShapesWorld sentences. It is a demonstration of the app, not a general model.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--no-speech", action="store_true")
    p.add_argument("--spoken-only", action="store_true",
                   help="only spoken questions in the held-out voices, one per scene (3x the full evaluation's "
                        "count for the same scenes): a tighter figure for the speech target alone")
    p.add_argument("--identity", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench-results") / "demo-eval.json")
    p.add_argument("--set-default", action="store_true",
                   help="write the best pointing rule into the checkpoint's config as its focus default")
    p.add_argument("--card", action="store_true", help="write the model card (README.md) beside the checkpoint")
    p.add_argument("--card-stages", default="", help="the training stages of this checkpoint, for the card")
    args = p.parse_args(argv)
    if args.spoken_only and (args.set_default or args.card or args.no_speech):
        p.error("--spoken-only measures speech alone: it cannot set the focus default, write the card "
                "or run with --no-speech")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    loaded = load_model(args.model, quantize="fp32")
    engine = Engine(loaded)
    try:
        summary = evaluate(engine, args.scenes, not args.no_speech, args.identity, args.spoken_only)
    finally:
        engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(spoken_table(summary) if args.spoken_only else table(summary))
    print(f"\nJSON: {args.out}")
    if args.set_default:
        cfg_path = Path(args.model) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rule, layers = summary["pointing_rule_value"]
        cfg["focus_aggregation"], cfg["focus_layers"] = rule, layers
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        log.info("focus default set to %s %s in %s", rule, layers, cfg_path)
    if args.card:
        model_dir = Path(args.model)
        cfg = json.loads((model_dir / "config.json").read_text())
        size = (model_dir / "model.safetensors").stat().st_size
        n_params = sum(p.numel() for p in loaded.model.parameters())
        (model_dir / "README.md").write_text(model_card(summary, cfg, n_params, size, args.card_stages))
        log.info("model card written to %s", model_dir / "README.md")


if __name__ == "__main__":
    main()
