"""The page's compare view (compare mode: ``--compare-quantize`` / ``--compare-model``), a Compare tab.

Every page turn is also sent to the second engine (B) with the same conversation and settings: ``CompareView.follow``
chains ``stream`` after each turn's start event, beside the chat's own stream, so B answers while A does. When
both are done, both models are teacher-forced on A's tokens (``engine.compare``, each on its own worker) and the
tab shows B's reply next to A's (the raw token stream, the part after the first differing token marked), the
summary row, per-layer routing Jaccard, a per-word table (A's words, the page's grouping) and, for the word
picked, A's and B's focus heatmaps from the teacher-forced passes (the same tokens on both sides, so the maps are
comparable; the metric is computed on exactly these). Nothing of it exists without a compare engine.

The records are kept per ``Turn`` (a weak mapping: a turn that goes, with New chat or the session, takes its
record along) and reach the QA export through ``export_record`` / ``export_files`` (``ui/export.py``).
"""

from __future__ import annotations

import html
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from ..engine import compare as C
from ..events import ChatRequest, Done, Error
from . import render
from .session import Session, Turn, request_session_id
from .words import THINK_TAGS

log = logging.getLogger(__name__)

REDRAW_EVERY_S = 0.2  # B's answer while it streams: at most this often (each redraw is a Gradio update)
WAIT_FOR_A_S = 0.05  # how often to look whether A's turn has ended
GIVE_UP_AFTER_CANCEL_S = 5.0  # A's request was cancelled but its turn never heard the end (its tab closed)


@dataclass
class Record:
    """One turn's comparison: B's answer and, once both ended, the metrics and the teacher-forced maps."""

    b: C.Side
    running: bool = True
    result: dict | None = None
    maps_a: list[np.ndarray] = field(default_factory=list)  # per context image: (n, rows, cols), A teacher-forced
    maps_b: list[np.ndarray] = field(default_factory=list)
    words: list[tuple[str, list[int]]] = field(default_factory=list)  # A's words: (text, token indices)


_RECORDS: "weakref.WeakKeyDictionary[Turn, Record]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def record_of(turn: Turn) -> Record | None:
    with _LOCK:
        return _RECORDS.get(turn)


def side_of_turn(turn: Turn) -> C.Side:
    """A's answer as the page folded it: token ids (from the Logprobs records), texts, phases."""
    ordered = sorted(turn.tokens)
    traces = [turn.tokens[i] for i in ordered]
    side = C.Side(reasoning=turn.reasoning, answer=turn.answer, error=turn.error)
    ids = [getattr(t, "token_id", -1) for t in traces]
    if ordered != list(range(len(ordered))) or any(i < 0 for i in ids):
        side.error = side.error or "the reply's token ids are not all known: nothing to teacher-force"
        return side
    side.token_ids, side.tokens, side.phases = ids, [t.text for t in traces], [t.phase for t in traces]
    return side


# ----------------------------------------------------------------------------- rendering


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if pct:
        return f"{100 * v:.1f} %"
    if isinstance(v, float):
        return f"{v:.3g}" if v and abs(v) < 1e-2 else f"{v:.3f}"
    return str(v)


def reply_html(label: str, tokens: list[str], text: str, diverge: int | None, running: bool,
               phases: list[str] | None = None) -> str:
    """A side's reply, token by token, the reasoning's tokens subdued and the think tags left out (as the chat shows
    them), and from the first token where the two differ marked."""
    if tokens:
        pieces = []
        for i, token in enumerate(tokens):
            if token.strip() in THINK_TAGS:
                continue
            cls = " ".join(c for c in ("compare-reasoning" if phases and i < len(phases) and
                                       phases[i] == "reasoning" else "",
                                       "compare-diverged" if diverge is not None and i >= diverge else "") if c)
            pieces.append(f"<span class='{cls}'>{html.escape(token)}</span>" if cls else html.escape(token))
        body = "".join(pieces)
    else:
        body = html.escape(text) or "<i>…</i>"
    state = " <i>(streaming)</i>" if running else ""
    return f"<div class='compare-side'><b>{html.escape(label)}</b>{state}<div class='compare-reply'>{body}</div></div>"


def metrics_html(result: dict | None, running: bool, labels: tuple[str, str]) -> str:
    if result is None:
        return "<p class='caption'>Measuring both models teacher-forced on A's tokens…</p>" if not running else \
            "<p class='caption'>The metrics follow when both answers are in.</p>"
    s = result["summary"]
    a, b = labels
    div = result["diverge_at"]
    parted = "identical" if s["identical"] else (
        f"differ from token {div + 1}: “{html.escape(result['diverge_tokens'][0])}” (A) against "
        f"“{html.escape(result['diverge_tokens'][1])}” (B)")
    rows = [("answers", parted)]
    if result.get("note"):
        rows.append(("teacher-forced metrics", html.escape(result["note"])))
    else:
        first = s.get("first_argmax_disagreement")
        rows += [
            ("argmax agreement (teacher-forced on A's tokens)", _fmt(s["argmax_agreement"], pct=True)
             + ("" if first is None else f", first disagreement at token {first + 1}")),
            (f"KL({a} ‖ {b}) per token, nats", f"mean {_fmt(s['kl_mean'])}, max {_fmt(s['kl_max'])} "
                                                 f"at token {s['kl_max_at'] + 1}"),
            ("focus difference per word", f"1 - cos {_fmt(s['focus_1_minus_cos'])}, peaks "
                                          f"{_fmt(s['peak_distance'])} patches apart, same peak "
                                          f"{_fmt(s['peak_agreement'], pct=True)}"),
            ("routing Jaccard (expert sets)", f"{_fmt(s['routing_jaccard'])}; per layer "
             + ", ".join(_fmt(v) for v in result["routing_per_layer"])),
        ]
    summary = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<div class='routing'><table class='compare-summary'>{summary}</table></div>"


def words_html(result: dict | None) -> str:
    """The per-word rows (A's words), the ones whose argmax differs marked."""
    words = ""
    if result is not None and result["per_word"]:
        body = "".join(
            f"<tr class='{'' if w['agree'] else 'compare-disagree'}'><td>{html.escape(w['word'].strip())}</td>"
            f"<td>{_fmt(w['agree'])}</td><td>{_fmt(w['kl'])}</td><td>{_fmt(w['focus_1_minus_cos'])}</td>"
            f"<td>{_fmt(w['peak_distance'])}</td><td>{_fmt(w['routing_jaccard'])}</td></tr>"
            for w in result["per_word"])
        words = ("<table class='compare-words'><caption>per word of A's reply</caption><tr><th>word</th>"
                 "<th>argmax agrees</th><th>KL</th><th>focus 1 - cos</th><th>peak distance</th><th>routing Jaccard</th>"
                 f"</tr>{body}</table>")
    return f"<div class='routing'>{words}</div>" if words else ""


# ----------------------------------------------------------------------------- the view


class CompareView:
    """The Compare tab of a page whose server runs a second engine."""

    def __init__(self, engine_a, engine_b):
        self.engine_a, self.engine_b = engine_a, engine_b
        ia, ib = engine_a.info(), engine_b.info()
        self.labels = (f"A: {ia.get('model_id')} {ia.get('quantize') or ''}".strip(),
                       f"B: {ib.get('model_id')} {ib.get('quantize') or ''}".strip())

    def layout(self, state: gr.State) -> None:
        """The tab (call inside the page's Tabs) and its own events."""
        with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab:
            gr.Markdown(f"**{self.labels[0]}** against **{self.labels[1]}**: every turn goes to both; the metrics "
                        "run both models over A's tokens.", elem_id="compare-models")
            with gr.Row(equal_height=False):
                self.answer_a = gr.HTML("", elem_id="compare-answer-a")
                self.answer_b = gr.HTML("", elem_id="compare-answer-b")
            self.metrics = gr.HTML("<p class='caption'>Send a turn: both models answer it.</p>",
                                   elem_id="compare-metrics")
            self.word = gr.Dropdown([("the whole answer", -1)], value=-1, label="Focus of the word",
                                    elem_id="compare-word")
            with gr.Row(equal_height=False):
                self.focus_a = gr.Image(type="pil", format="jpeg", label=f"focus, {self.labels[0]}", visible=False,
                                        interactive=False, height="32vh", elem_id="compare-focus-a")
                self.focus_b = gr.Image(type="pil", format="jpeg", label=f"focus, {self.labels[1]}", visible=False,
                                        interactive=False, height="32vh", elem_id="compare-focus-b")
            self.words = gr.HTML("", elem_id="compare-words")
        self.outputs = [self.answer_a, self.answer_b, self.metrics, self.word, self.focus_a, self.focus_b, self.words]
        self.word.input(self.pick_word, [self.word, state], [self.focus_a, self.focus_b], api_visibility="private",
                        show_progress="hidden")
        tab.select(self.redraw, [state], self.outputs, api_visibility="private", show_progress="hidden")

    def follow(self, event, state: gr.State) -> None:
        """Send every turn ``event`` starts to B too (beside the chat's stream, not after it)."""
        event.then(self.stream, [state], self.outputs, api_visibility="private", concurrency_limit=None,
                   show_progress="hidden")

    # ------------------------------------------------------------------ one turn
    def stream(self, session: Session, request: gr.Request = None):
        turns = session.turns
        if not turns or record_of(turns[-1]) is not None or not turns[-1].running:
            return  # the start refused the turn (nothing new), or it was already compared
        turn, handle_a = turns[-1], session.handle
        messages, options = session.engine_messages(), C.with_token_ids(turn.options)
        req = ChatRequest(messages, options, session_id="compare-" + request_session_id(request),
                          continue_from=list(getattr(turn, "continue_from", [])))
        record = Record(C.Side())
        with _LOCK:
            _RECORDS[turn] = record
        try:
            handle = self.engine_b.submit(req)
        except Exception as e:  # busy / refused: said in the tab, A's turn goes on
            record.b.error, record.running = str(e), False
            yield self._values(turn, record)
            return
        events, last = [], 0.0
        try:
            for e in handle.events():
                events.append(e)
                if turn.finish_reason == "cancelled":  # Stop pressed on A: B stops too
                    handle.cancel()
                now = time.perf_counter()
                if now - last >= REDRAW_EVERY_S or isinstance(e, (Done, Error)):
                    last = now
                    record.b = C.Side.of(events)
                    yield self._values(turn, record)
        finally:
            handle.cancel()  # a closed tab ends B's work too (nothing after Done)
        record.b = C.Side.of(events)
        cancelled_at = None
        while turn.running:  # A's events are folded into the turn by the chat's own stream
            if handle_a is not None and handle_a.cancelled:  # a closed tab may leave the turn unfinished
                cancelled_at = cancelled_at or time.perf_counter()
                if time.perf_counter() - cancelled_at > GIVE_UP_AFTER_CANCEL_S:
                    break
            time.sleep(WAIT_FOR_A_S)
        a = side_of_turn(turn)
        if turn.finish_reason == "cancelled" or turn.running:
            a.error = a.error or "the reply was stopped"
        record.words = [(w.text, w.tokens) for w in turn.words()]
        try:
            fa, fb, note = C.forced_pair(self.engine_a, self.engine_b, messages, a, record.b, options)
            record.result = C.compare_turn(a, record.b, fa, fb, record.words, note)
            if fa is not None and fb is not None:
                record.maps_a, record.maps_b = fa.images, fb.images
        except Exception as e:  # a failed measurement is said, the page goes on
            log.exception("compare: the teacher-forced pass failed")
            record.result = C.compare_turn(a, record.b, None, None, record.words, f"the measurement failed: {e}")
        record.running = False
        yield self._values(turn, record)

    # ------------------------------------------------------------------ drawing
    def _values(self, turn: Turn, record: Record, word: int = -1) -> list:
        a = side_of_turn(turn)
        diverge = record.result["diverge_at"] if record.result else None
        a_tokens = a.tokens or [turn.tokens[i].text for i in sorted(turn.tokens)]
        choices = [("the whole answer", -1)] + [(f"{k + 1}. {t.strip()}", k) for k, (t, _) in enumerate(record.words)]
        focus_a, focus_b = self._focus(turn, record, word)
        a_phases = a.phases or [turn.tokens[i].phase for i in sorted(turn.tokens)]
        return [reply_html(self.labels[0], a_tokens, turn.answer, diverge, turn.running, a_phases),
                reply_html(self.labels[1], record.b.tokens, record.b.error or record.b.answer, diverge,
                           record.running and record.result is None, record.b.phases),
                metrics_html(record.result, record.running, ("A", "B")),
                gr.update(choices=choices, value=word if word < len(record.words) else -1),
                focus_a, focus_b, words_html(record.result)]

    def _focus(self, turn: Turn, record: Record, word: int) -> tuple:
        hidden = gr.update(value=None, visible=False)
        if not record.maps_a or not record.maps_b:
            return hidden, hidden
        media = turn.media("image")
        n = record.maps_a[0].shape[0]
        if 0 <= word < len(record.words):
            tokens = [i for i in record.words[word][1] if i < n]
        else:  # the whole answer: its answer-phase tokens (else every token)
            tokens = [i for i in sorted(turn.tokens) if i < n and turn.tokens[i].phase == "answer"] or list(range(n))
        j = len(record.maps_a) - 1  # the newest image: the turn's own last one
        k = len(media) - len(record.maps_a) + j  # maps are matched to the media from the end (context cut)
        if not tokens or not 0 <= k < len(media) or media[k].image is None:
            return hidden, hidden
        image = media[k].image
        return (gr.update(value=render.overlay_heatmap(image, record.maps_a[j][tokens].mean(0)), visible=True),
                gr.update(value=render.overlay_heatmap(image, record.maps_b[j][tokens].mean(0)), visible=True))

    def pick_word(self, word, session: Session):
        turn = session.shown_turn()
        record = record_of(turn) if turn is not None else None
        if record is None:
            return gr.update(), gr.update()
        return self._focus(turn, record, int(word) if word is not None else -1)

    def redraw(self, session: Session):
        turn = session.shown_turn()
        record = record_of(turn) if turn is not None else None
        if record is None:
            return [gr.update()] * len(self.outputs)
        # the word clicked in the Focus tab (the same grouping: turn.words()), else the whole answer
        word = session.view.word if session.view.word is not None and not record.running else -1
        return self._values(turn, record, word)


# ----------------------------------------------------------------------------- export


def export_record(turn: Turn) -> dict | None:
    """What ``trace.json`` holds of a turn's comparison: B's answer and every metric (None: not compared)."""
    record = record_of(turn)
    if record is None:
        return None
    b = record.b
    return {"b": {"reasoning": b.reasoning, "answer": b.answer, "token_ids": b.token_ids, "tokens": b.tokens,
                  "error": b.error}, "metrics": record.result}


def export_files(turn: Turn, folder: str, colormap: str, opacity: float) -> dict[str, bytes]:
    """B's teacher-forced focus heatmap for each of A's words (next to A's own in the export's per-word PNGs)."""
    import io

    record = record_of(turn)
    if record is None or not record.maps_b:
        return {}
    media = turn.media("image")
    files = {}
    n = record.maps_b[0].shape[0]
    for j, maps in enumerate(record.maps_b):
        k = len(media) - len(record.maps_b) + j
        if not 0 <= k < len(media) or media[k].image is None:
            continue
        for w, (text, tokens) in enumerate(record.words):
            tokens = [i for i in tokens if i < n]
            if not tokens:
                continue
            buf = io.BytesIO()
            render.overlay_heatmap(media[k].image, maps[tokens].mean(0), colormap, opacity).save(buf, "PNG")
            slug = "".join(c for c in text.strip() if c.isalnum())[:24] or "word"
            files[f"{folder}/compare_b/focus_image{k + 1}_{w + 1:03d}_{slug}.png"] = buf.getvalue()
    return files
