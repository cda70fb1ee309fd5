"""The QA trace: one zip holding the whole conversation as the page saw it.

    trace.json                      prompts, reasoning, answers, settings, stats, model id,
                                    per-token focus maps (the shown, aggregated ones), routing and
                                    logprobs (the token's, its alternatives', the entropy), routing
                                    load per turn, where a version branched; ``trace_memory`` and each turn's ``per_layer_detail`` say
                                    what of the per-layer detail the page's memory budget coarsened or
                                    dropped (ui/traces.py), and each token's ``focus.per_layer`` its own state
    turnNN/input_imageK.png         the images the user sent
    turnNN/input_audio.wav          the recording (16-bit PCM)
    turnNN/focus_imageK_wordMMM.png the heatmap overlay of each word of the reply on the K-th image of
                                    the turn's prompt (``context.images`` says which: in a multi-turn
                                    chat the earlier turns' images come first)
    turnNN/focus_imageK_answer.png  the mean over the whole answer
    turnNN/focus_audioK_*.png       the same for the K-th recording of the prompt
    turnNN/routed_experts.npy       the routed experts in vLLM's layout: int16 [tokens, moe_layers, top_k],
                                    the prompt's tokens then the generated ones but the last (-1: not
                                    routed at that layer); ``np.load`` reads it
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf

from .compare import export_files as compare_files, export_record as compare_record
from .render import audio_focus_image, overlay_heatmap
from .session import Session, Turn
from .traces import SESSION_SHARE, turn_manifest

MAX_WORD_IMAGES = 64  # per image per turn: enough for an answer, bounded for long reasoning


def _round(a: np.ndarray, digits: int = 5) -> list:
    """Values to ``digits`` significant digits (not decimals: a 9B model's per-patch attention is 1e-4 to 1e-5,
    which five decimals would mostly erase), vectorised: x rounded at its own power of ten."""
    x = np.asarray(a, np.float64)
    exponent = np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x))))
    scale = 10.0 ** (digits - 1 - exponent)
    return (np.round(x * scale) / scale).tolist()


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")[:24] or "w"


def _context(turn: Turn, kind: str, number: int) -> list[dict]:
    """The images / recordings of the turn's prompt, oldest first: the order of each token's focus maps."""
    dropped = turn.dropped_media(kind)
    ext = "png" if kind == "image" else "wav"
    return [{"label": m.label, "from_turn": m.turn, "own": m.own, "sent": n >= dropped,
             "file": f"turn{m.turn or number:02d}/input_{kind}{m.index + 1 if kind == 'image' else ''}.{ext}"}
            for n, m in enumerate(turn.media(kind))]


def turn_record(turn: Turn, number: int, version: tuple[int, int] = (0, 1)) -> dict:
    tokens = sorted(turn.tokens.values(), key=lambda t: t.index)
    return {
        "turn": number,
        "version": version[0] + 1,
        "versions": version[1],
        "system": turn.system,
        "context_mode": "each turn alone" if turn.alone else "multi-turn",
        # one focus map per entry, in this order, in every token's focus.images / focus.audios; an entry
        # with "sent": false was left out of the prompt to fit the context and has no map
        "context": {"images": _context(turn, "image", number), "audios": _context(turn, "audio", number)},
        "prompt": {
            "text": turn.text,
            "images": [f"turn{number:02d}/input_image{k + 1}.png" for k in range(len(turn.images))],
            "audio": f"turn{number:02d}/input_audio.wav" if turn.audio is not None else None,
            "audio_transcribed": turn.transcribed,  # the recording became the text; not sent as audio
        },
        "settings": asdict(turn.options),
        "reasoning": turn.reasoning,
        "answer": turn.answer,
        "finish_reason": turn.finish_reason,
        "error": turn.error,
        "notices": turn.notices,
        "stats": asdict(turn.stats) if turn.stats is not None else None,
        "words": [{"text": w.text.strip(), "phase": w.phase, "tokens": w.tokens} for w in turn.words()],
        "tokens": [{
            "index": t.index,
            "text": t.text,
            "phase": t.phase,
            "focus": {"images": [_round(m) for m in t.images], "audios": [_round(m) for m in t.audios],
                      # the per-layer detail the page kept: "full", "coarse" (8 bits) or "dropped"
                      "per_layer": t.detail if t.images or t.audios else None},
            "routing": [{"layer": layer, "experts": experts, "weights": weights}
                        for layer, experts, weights in t.routes],
            # how sure the model was (the page asks for each token's logprob and alternatives); None without them
            "logprobs": {"token": t.text, "token_id": t.token_id, "logprob": round(t.logprob, 6),
                         "entropy": round(t.entropy, 6) if t.entropy is not None else None,
                         "top": [{"token": text, "token_id": int(tid), "logprob": round(float(lp), 6)}
                                 for tid, text, lp in t.top]} if t.logprob is not None else None,
        } for t in tokens],
        # a branch: the reply continued from another alternative of an earlier version's word; its first
        # ``continued_tokens`` tokens were fed (the earlier version's, then the alternative), not generated
        "branch": {"note": turn.branch_note, "continued_tokens": len(turn.continue_from)}
        if turn.continue_from else None,
        "compare": compare_record(turn),  # compare mode: B's answer and the metrics (ui/compare.py); else None
        "routing_load": turn.load,
        "per_layer_detail": turn_manifest(turn),
    }


def build_trace(session: Session, info: dict) -> dict:
    return {
        "format": "autoglm-studio-qa-trace/1",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {k: info.get(k) for k in ("model_id", "family", "quantize", "attention", "context_limit")},
        "trace_memory": _trace_memory(session),
        "turns": [turn_record(t, n, session.versions(n - 1)) for n, t in enumerate(session.turns, 1)],
    }


def _trace_memory(session: Session) -> dict:
    budget = session.traces
    gave_way = [n for n, t in enumerate(session.turns, 1) if t.detail.gave_way]
    return {"budget_mb": budget.limit_mb if budget is not None else None,
            "session_share": SESSION_SHARE if budget is not None else None,
            "order": "least recently used session first; its finished turns oldest first, the streaming turn "
                     "last; within a turn every token's per-layer detail is coarsened to 8 bits (oldest first), "
                     "then dropped (oldest first); the shown (aggregated) maps always stay",
            "turns_coarsened_or_dropped": gave_way}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _wav(samples: np.ndarray, rate: int) -> bytes:
    """Samples of any type -> a 16-bit PCM WAV file."""
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.floating):
        x = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    elif x.dtype != np.int16:
        x = (x.astype(np.float64) / (np.iinfo(x.dtype).max + 1) * 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, x, int(rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _turn_files(turn: Turn, number: int, colormap: str, opacity: float) -> dict[str, bytes]:
    folder = f"turn{number:02d}"
    files: dict[str, bytes] = {}
    for k, image in enumerate(turn.images):
        files[f"{folder}/input_image{k + 1}.png"] = _png(image.convert("RGB"))
    if turn.audio is not None:
        files[f"{folder}/input_audio.wav"] = _wav(turn.audio.samples, turn.audio.sample_rate)
    routed = turn.routed_experts()
    if routed is not None:
        buf = io.BytesIO()
        np.save(buf, routed)
        files[f"{folder}/routed_experts.npy"] = buf.getvalue()
    files.update(compare_files(turn, folder, colormap, opacity))  # compare mode: B's per-word heatmaps
    if not turn.has_focus():
        return files
    words = turn.words()
    answer_tokens = [i for i, t in turn.tokens.items() if t.phase == "answer"] or list(turn.tokens)
    for k, ref in enumerate(turn.media("image")):
        whole = turn.focus_map(answer_tokens, "image", k)
        if whole is not None:
            files[f"{folder}/focus_image{k + 1}_answer.png"] = _png(overlay_heatmap(ref.image, whole, colormap, opacity))
        for m, w in enumerate(words[:MAX_WORD_IMAGES]):
            heat = turn.focus_map(w.tokens, "image", k)
            if heat is not None:
                name = f"{folder}/focus_image{k + 1}_word{m:03d}_{_slug(w.text)}.png"
                files[name] = _png(overlay_heatmap(ref.image, heat, colormap, opacity))
    for k, ref in enumerate(turn.media("audio")):
        heat = turn.focus_map(answer_tokens, "audio", k)
        if heat is not None:
            img = audio_focus_image(ref.audio.samples, ref.audio.sample_rate, heat, colormap, opacity,
                                    f"focus of the whole answer over {ref.label}")
            files[f"{folder}/focus_audio{k + 1}_answer.png"] = _png(img)
    return files


def write_trace_zip(session: Session, info: dict, directory: str | Path) -> Path:
    """Write the session's QA trace zip into ``directory``; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"autoglm-trace-{time.strftime('%Y%m%d-%H%M%S')}.zip"
    trace = build_trace(session, info)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("trace.json", json.dumps(trace, ensure_ascii=False, indent=1))
        for n, turn in enumerate(session.turns, 1):
            for name, data in _turn_files(turn, n, session.view.colormap, session.view.opacity).items():
                zf.writestr(name, data)
    return path
