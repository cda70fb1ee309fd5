"""Batch comparison of two models (compare mode's metrics over many turns): prints a table, writes JSON.

    python -m tools.compare --quantize int4 --compare-quantize fp32 --questions 200
    python -m tools.compare --compare-model DIR --prompts prompts.jsonl
    python -m tools.bench compare ...                              (the same command)

Model A is ``--model`` in ``--quantize``; model B is ``--compare-model`` (else the same checkpoint) in
``--compare-quantize`` (else A's format): the server's own flags and ``server.compare_settings``. Each turn goes
to both engines (greedy: temperature 0, so the answers are each model's own best), then both are teacher-forced
on A's tokens (``engine.compare``).

Turns: ``--questions N`` held-out ShapesWorld questions (the evaluation's scenes, ``training.evaluate``: scene i
from the seed 10**9 + i, the question kinds in turn: colour, where, count, exists, describe; thinking on for even
i), scored as the evaluation scores them; or ``--prompts FILE``: one JSON object per line, ``{"prompt": "...",
"images": ["a.png"], "expected": "...", "thinking": true}`` (``image`` for one image; paths relative to the
file; ``expected`` optional: an answer equal to it up to case and spaces is correct, as in the evaluation).

Per side: accuracy where answers can be scored. Between them: identical answers, argmax agreement and KL(A || B)
per token (the means over all tokens), the focus difference per word (1 - cosine, the distance between the peaks
in patches) and focus-peak agreement (the share of words whose two maps peak on the same patch), and the
routing Jaccard of the expert sets (per MoE layer and overall).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("autoglm.compare")

TASKS = ("color", "where", "count", "exists", "describe")


def shapesworld_turns(n: int) -> list[dict]:
    """N held-out ShapesWorld questions, each with how to score its answer."""
    from training.evaluate import HELDOUT_SEED
    from training.shapesworld import make_qa, random_scene, render

    turns = []
    for i in range(n):
        rng = random.Random(HELDOUT_SEED + i)
        scene = random_scene(rng, rng.choice((128, 160, 192, 224, 256)))
        task = TASKS[i % len(TASKS)]
        qa = make_qa(scene, rng, task)
        turns.append({"prompt": qa.question, "images": [render(scene)], "expected": qa.answer, "task": task,
                      "thinking": i % 2 == 0, "scene": scene})
    return turns


def jsonl_turns(path: Path) -> list[dict]:
    from PIL import Image

    turns = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not JSON ({e})")
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SystemExit(f"{path}:{n}: each line needs a \"prompt\" string")
        names = row.get("images") or ([row["image"]] if row.get("image") else [])
        images = []
        for name in names:
            p = Path(name) if Path(name).is_absolute() else path.parent / name
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        turns.append({"prompt": row["prompt"], "images": images, "expected": row.get("expected"),
                      "task": row.get("task", "prompt"), "thinking": bool(row.get("thinking", True))})
    return turns


def correct(turn: dict, answer: str) -> bool | None:
    """The evaluation's rule: a description names the scene's (colour, shape, place) set; other answers equal the
    expected one up to case and spaces. None when the turn has nothing to score against."""
    from training.evaluate import normalise

    if turn.get("expected") is None:
        return None
    if turn["task"] == "describe" and "scene" in turn:
        from training.shapesworld import caption_tuples, scene_tuples

        return caption_tuples(answer) == scene_tuples(turn["scene"])
    return normalise(answer) == normalise(turn["expected"])


def words_of(side) -> list[tuple[str, list[int]]]:
    """A's tokens as the page's words (ui.words.merge_words: the same grouping the page's per-word view uses)."""
    from autoglm_app.ui.words import merge_words

    return [(w.text, w.tokens) for w in merge_words(list(zip(range(len(side.tokens)), side.tokens, side.phases)))]


def compare_one(engine_a, engine_b, turn: dict, max_tokens: int) -> dict:
    from autoglm_app.engine import compare as C
    from autoglm_app.events import ChatRequest, Message, Options

    messages = [Message("user", turn["prompt"], list(turn["images"]))]
    opts = C.with_token_ids(Options(temperature=0.0, max_new_tokens=max_tokens, seed=0,
                                    enable_thinking=turn["thinking"]))
    # both at once: each engine has its own worker (on two cores the pair takes about the time of one)
    ha, hb = engine_a.submit(ChatRequest(messages, opts)), engine_b.submit(ChatRequest(messages, opts))
    a, b = C.Side.of(list(ha.events())), C.Side.of(list(hb.events()))
    result = C.compare_engines(engine_a, engine_b, messages, a, b, opts, words_of(a))
    return {"prompt": turn["prompt"], "task": turn["task"], "thinking": turn["thinking"],
            "expected": turn.get("expected"), "answer_a": a.answer, "answer_b": b.answer,
            "correct_a": correct(turn, a.answer), "correct_b": correct(turn, b.answer), "error": a.error or b.error,
            "summary": result["summary"], "note": result["note"], "tokens": result["tokens_a"],
            "kl_sum": sum(t["kl"] for t in result["per_token"]),
            "agree_sum": sum(t["agree"] for t in result["per_token"]),
            "jaccard_sum": sum(t["routing_jaccard"] or 0.0 for t in result["per_token"]),
            "routing_per_layer": result["routing_per_layer"],
            "words": [{k: w[k] for k in ("word", "focus_1_minus_cos", "peak_distance")} for w in result["per_word"]]}


def _rate(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def aggregate(rows: list[dict]) -> dict:
    """Over all turns: accuracies per side, identical answers, token-weighted argmax agreement / KL / Jaccard,
    word-weighted focus figures."""
    forced = [r for r in rows if r["note"] is None]
    tokens = sum(r["tokens"] for r in forced)
    words = [w for r in forced for w in r["words"] if w["peak_distance"] is not None]
    layers = [r["routing_per_layer"] for r in forced if r["routing_per_layer"]]
    weights = [r["tokens"] for r in forced if r["routing_per_layer"]]
    return {
        "turns": len(rows), "teacher_forced_turns": len(forced), "tokens": tokens,
        "accuracy_a": _rate(r["correct_a"] for r in rows), "accuracy_b": _rate(r["correct_b"] for r in rows),
        "scored": sum(r["correct_a"] is not None for r in rows),
        "identical_answers": _rate(r["summary"]["identical"] for r in rows),
        "argmax_agreement": round(sum(r["agree_sum"] for r in forced) / tokens, 5) if tokens else None,
        "argmax_disagreements": tokens - sum(r["agree_sum"] for r in forced),
        "differing_answers": sum(not r["summary"]["identical"] for r in rows),
        "kl_mean": round(sum(r["kl_sum"] for r in forced) / tokens, 6) if tokens else None,
        "kl_max": max((r["summary"]["kl_max"] for r in forced), default=None),
        "focus_1_minus_cos": _rate(w["focus_1_minus_cos"] for w in words),
        "peak_distance": _rate(w["peak_distance"] for w in words),
        "focus_peak_agreement": _rate(w["peak_distance"] == 0 for w in words),
        "routing_jaccard": round(sum(r["jaccard_sum"] for r in forced) / tokens, 4) if tokens and layers else None,
        "routing_jaccard_per_layer": [round(float(v), 4) for v in np.average(layers, axis=0, weights=weights)]
        if layers else [],
        "by_task": {t: {"accuracy_a": _rate(r["correct_a"] for r in rows if r["task"] == t),
                        "accuracy_b": _rate(r["correct_b"] for r in rows if r["task"] == t),
                        "identical_answers": _rate(r["summary"]["identical"] for r in rows if r["task"] == t)}
                    for t in dict.fromkeys(r["task"] for r in rows)},
    }


def run(args) -> dict:
    import torch

    from autoglm_app.config import Limits, Settings
    from autoglm_app.server import compare_settings, load_compare_engine, load_engine, set_cpu_threads

    settings = Settings(model=args.model, quantize=args.quantize, compare_model=args.compare_model,
                        compare_quantize=args.compare_quantize, compile=args.compile, max_batch=args.max_batch,
                        cpu_threads=args.cpu_threads, limits=Limits(context_limit=args.context_limit))
    second = compare_settings(settings)
    if second is None:
        raise SystemExit("say what to compare with: --compare-quantize FORMAT and/or --compare-model PATH")
    from autoglm_app.loading.progress import LoadProgress

    t0 = time.perf_counter()
    engine_a = load_engine(settings, LoadProgress(settings.model))
    engine_b = load_compare_engine(settings, LoadProgress(second.model))
    threads = set_cpu_threads(settings.cpu_threads)
    turns = jsonl_turns(Path(args.prompts)) if args.prompts else shapesworld_turns(args.questions)
    log.warning("models loaded in %.1f s; %d turns", time.perf_counter() - t0, len(turns))
    rows, t1 = [], time.perf_counter()
    try:
        for i, turn in enumerate(turns):
            rows.append(compare_one(engine_a, engine_b, turn, args.max_tokens))
            if (i + 1) % 25 == 0:
                log.warning("%d/%d turns, %.0f s", i + 1, len(turns), time.perf_counter() - t1)
    finally:
        engine_a.close()
        engine_b.close()
    info_a, info_b = engine_a.info(), engine_b.info()
    return {
        "a": {"model": info_a["model_id"], "quantize": info_a["quantize"]},
        "b": {"model": info_b["model_id"], "quantize": info_b["quantize"]},
        "source": args.prompts or f"{args.questions} held-out ShapesWorld questions",
        "max_tokens": args.max_tokens, "seconds": round(time.perf_counter() - t1, 1),
        "device": platform.processor() or platform.machine(), "torch_threads": threads, "torch": torch.__version__,
        "summary": aggregate(rows), "turns": rows,
    }


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def compare_table(result: dict) -> str:
    s = result["summary"]
    a, b = result["a"], result["b"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    lines = [f"A = {a['model']} {a['quantize']}, B = {b['model']} {b['quantize']}; {result['source']}, "
             f"greedy, up to {result['max_tokens']} new tokens; {s['tokens']} tokens teacher-forced "
             f"({s['teacher_forced_turns']} of {s['turns']} turns), {result['seconds']} s", "",
             "| figure | value |", "|---|---|",
             f"| accuracy A ({a['quantize']}) | {pct(s['accuracy_a'])} of {s['scored']} scored |",
             f"| accuracy B ({b['quantize']}) | {pct(s['accuracy_b'])} of {s['scored']} scored |",
             f"| identical answers | {pct(s['identical_answers'])} ({s['differing_answers']} differ) |",
             f"| argmax agreement (per token, teacher-forced on A) | {pct(s['argmax_agreement'])} "
             f"({s['argmax_disagreements']} of {s['tokens']} tokens differ) |",
             f"| mean KL(A ‖ B) per token, nats | {_fmt(s['kl_mean'])} (max {_fmt(s['kl_max'])}) |",
             f"| focus 1 - cosine (per word) | {_fmt(s['focus_1_minus_cos'])} |",
             f"| focus peak distance (per word, patches) | {_fmt(s['peak_distance'])} |",
             f"| focus-peak agreement (same patch) | {pct(s['focus_peak_agreement'])} |",
             f"| routing Jaccard (expert sets, per token and layer) | {_fmt(s['routing_jaccard'])} "
             f"(per layer {', '.join(_fmt(v, 3) for v in s['routing_jaccard_per_layer'])}) |"]
    if len(s["by_task"]) > 1:
        lines += ["", "| task | accuracy A | accuracy B | identical |", "|---|---|---|---|"]
        for t, row in s["by_task"].items():
            lines.append(f"| {t} | {pct(row['accuracy_a'])} | {pct(row['accuracy_b'])} | "
                         f"{pct(row['identical_answers'])} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from autoglm_app.config import QUANTIZE_CHOICES, default_model

    p.add_argument("--model", default=default_model(), help="model A (default: the demo model)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help="A's format (default: the server's)")
    p.add_argument("--compare-model", default=None, metavar="PATH", help="model B (default: the same checkpoint)")
    p.add_argument("--compare-quantize", default=None, choices=QUANTIZE_CHOICES, help="B's format")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--questions", type=int, default=200, help="held-out ShapesWorld questions")
    src.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="turns from a JSONL file instead")
    p.add_argument("--max-tokens", type=int, default=160, help="new tokens per answer (the evaluation's 160)")
    p.add_argument("--context-limit", type=int, default=2048)
    p.add_argument("--compile", default="off", choices=("auto", "on", "off"))
    p.add_argument("--max-batch", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results") / "compare.json")


def add_parser(sub) -> argparse.ArgumentParser:
    """``python -m tools.bench compare``: the same arguments."""
    p = sub.add_parser("compare", help="two models over many turns: accuracy, agreement, KL, focus, routing")
    add_arguments(p)
    return p


def run_from_args(args) -> dict:
    return run(args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(compare_table(result))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
