"""The page's budget for per-layer focus detail (issue 18, ui/traces.py): what gives way first, that the
shown maps stay, that the Focus caption and the QA export say what was dropped, and that the count is
exact (ndarray.nbytes) through New chat, the session store's eviction and sessions Gradio let go of.

Turns are driven through ``stream_turn`` with a scripted handle, as the page does, on 8-layer 16 x 16 maps.
"""

from __future__ import annotations

import gc
import json
import zipfile
from collections import deque

import numpy as np
import pytest
from PIL import Image

from autoglm_app.config import Settings
from autoglm_app.events import Answer, Done, Focus
from autoglm_app.ui.export import write_trace_zip
from autoglm_app.ui.layout import build_page
from autoglm_app.ui.session import Session, SessionStore, Turn, stream_turn
from autoglm_app.ui.traces import RECORD_BYTES, MiB, Coarse, TraceBudget

L, R, C = 8, 16, 16
FULL = L * R * C * 2  # bytes of one token's float16 stack
COARSE = L * R * C + 2 * L * 4  # uint8 plus a float32 offset and scale per layer
SHOWN = R * C * 4 + RECORD_BYTES  # its shown (aggregated) float32 map and its record: counted, never give way
UNIT = FULL + SHOWN


def stack(i: int) -> np.ndarray:
    """(layers, rows, cols) attention of token i: mostly on one cell that moves with i, deeper layers sharper."""
    m = np.full((L, R, C), 0.0005, np.float32)
    for layer in range(L):
        m[layer, i % R, (3 * i) % C] = 0.05 * (layer + 1)
    return m


def focus(i: int) -> Focus:
    m = stack(i)
    return Focus(i, f" w{i}", "answer", images=[m.mean(0)], audios=[], per_layer_images=[m])


class Handle:
    """Plays its events; ``live`` ones wait for the test to push each next event (a turn still streaming)."""

    def __init__(self, events: list, live: bool = False):
        self.queue, self.live, self.cancelled = deque(events), live, False

    def cancel(self):
        self.cancelled = True

    def events(self):
        while self.queue or self.live:
            yield self.queue.popleft()


def image() -> Image.Image:
    return Image.new("RGB", (32, 32), "white")


def finished_turn(session: Session, tokens: int) -> Turn:
    session.start(Turn("where?", images=[image()]))
    events = [e for i in range(tokens) for e in (Answer(f" w{i}"), focus(i))] + [Done("stop")]
    list(stream_turn(None, session, "s", handle=Handle(events)))
    return session.turns[-1]


class Live:
    """A turn streaming through ``stream_turn``, one token per ``push``."""

    def __init__(self, session: Session):
        session.start(Turn("and now?", images=[image()]))
        self.turn, self.handle, self.n = session.turns[-1], Handle([], live=True), 0
        self.stream = stream_turn(None, session, "s", chat_every=0.0, handle=self.handle)

    def push(self) -> None:
        self.handle.queue.append(focus(self.n))
        self.n += 1
        next(self.stream)


def all_turns(session: Session) -> list[Turn]:
    out, todo = [], list(session.root.children)
    while todo:
        t = todo.pop(0)
        out.append(t)
        todo += t.children
    return out


def actual_bytes(*sessions: Session) -> int:
    """What the sessions really hold in per-layer stacks, from the arrays themselves."""
    return sum(m.nbytes for s in sessions for t in all_turns(s) for tr in t.tokens.values()
               for m in tr.per_layer_images + tr.per_layer_audios)


def actual_kept(*sessions: Session) -> int:
    """The shown maps' bytes, from the arrays, and a record per token with a Focus event."""
    tokens = [tr for s in sessions for t in all_turns(s) for tr in t.tokens.values()]
    return sum(m.nbytes for tr in tokens for m in tr.images + tr.audios) + RECORD_BYTES * len(tokens)


def budget_of(total_bytes: int, share: float = 0.25) -> TraceBudget:
    return TraceBudget(total_bytes / MiB, session_share=share)


def levels(turn: Turn) -> list[str]:
    return [turn.tokens[i].detail for i in sorted(turn.tokens)]


# ----------------------------------------------------------------------------- the order


def test_detail_gives_way_oldest_turn_of_the_least_recently_used_session_first_coarsened_then_dropped():
    budget = budget_of(12 * UNIT + FULL // 2, share=1.0)  # only the server-wide budget binds here
    a, b, c = Session(), Session(), Session()
    for s in (a, b):
        budget.join(s)
        finished_turn(s, 3)
        finished_turn(s, 3)
    assert budget.held == 12 * FULL == actual_bytes(a, b) and budget.kept == 12 * SHOWN == actual_kept(a, b)
    # the documented order over the finished turns: A before B (least recently used), each session's turns
    # oldest first, within a turn every token coarsened oldest first, then dropped oldest first
    order = [(t, i, step) for s in (a, b) for t in s.turns for step in ("coarse", "dropped") for i in range(3)]
    budget.join(c)
    live = Live(c)
    for _ in range(40):  # until the streaming turn's first token gives way
        live.push()
        done = {(t, i, "coarse") for s in (a, b) for t in s.turns for i in range(3)
                if t.tokens[i].detail in ("coarse", "dropped")}
        done |= {(t, i, "dropped") for s in (a, b) for t in s.turns for i in range(3) if t.tokens[i].detail == "dropped"}
        assert done == set(order[:len(done)]), "detail gave way out of the documented order"
        if len(done) < len(order):  # the streaming turn is coarsened only after every finished turn
            assert set(levels(live.turn)) == {"full"}
        assert budget.held + budget.kept <= budget.limit
        assert budget.held == actual_bytes(a, b, c) and budget.kept == actual_kept(a, b, c)
        if levels(live.turn)[0] != "full":
            break
    assert len(done) == len(order)  # every finished turn's detail is gone ...
    assert levels(live.turn)[0] == "coarse" and levels(live.turn)[-1] == "full"  # ... then the stream's oldest
    for s in (a, b):  # every token keeps its shown map
        assert all(t.tokens[i].images for t in s.turns for i in range(3))


def test_a_reloaded_session_is_the_most_recently_used_so_the_other_gives_way_first():
    store = SessionStore(traces=budget_of(12 * UNIT + FULL // 2, share=1.0))
    a, b, c = Session(), Session(), Session()
    for s in (a, b, c):
        store.put(s)
    for s in (a, b):
        finished_turn(s, 3)
        finished_turn(s, 3)
    assert store.get(a.key) is a  # a page reload of A
    live = Live(c)
    live.push()
    assert levels(b.turns[0])[0] == "coarse" and all(set(levels(t)) == {"full"} for t in a.turns)


def test_one_session_over_its_quarter_gives_way_alone_its_finished_turn_before_its_streaming_one():
    budget = budget_of(32 * UNIT)  # a session may hold 8 tokens' maps with their full detail
    a, b = Session(), Session()
    for s in (a, b):
        budget.join(s)
    other = finished_turn(b, 3)
    old = finished_turn(a, 3)
    live = Live(a)
    for _ in range(5):  # 8 tokens: within the share
        live.push()
    assert set(levels(old)) == {"full"}
    live.push()  # 9: A's finished turn gives way first
    assert levels(old)[0] != "full" and set(levels(live.turn)) == {"full"}
    for _ in range(3):
        live.push()
    assert set(levels(old)) == {"dropped"} and levels(live.turn)[0] == "coarse" and levels(live.turn)[-1] == "full"
    assert set(levels(other)) == {"full"}  # B, within its share and the server's budget, keeps everything
    assert budget.session_held(a) + actual_kept(a) <= budget.session_limit
    assert budget.held == actual_bytes(a, b) and budget.kept == actual_kept(a, b)
    assert old.detail.limit_mb == budget.limit_mb and old.detail.dropped == 3


# ----------------------------------------------------------------------------- what the page shows


class InfoOnlyEngine:
    def info(self) -> dict:
        return {"model_id": "m", "family": "autoglm", "quantize": "fp32", "device_map": None, "summary": "",
                "attention": "sdpa", "context_limit": 1024}


def page_with_budget(total_bytes: int):
    _, studio = build_page(InfoOnlyEngine(), Settings(model="small", trace_memory_mb=total_bytes / MiB))
    session = Session()
    studio.sessions.put(session)  # as the page's load event does
    return studio, session


def view(studio, session: Session, turn: int, aggregation: str) -> dict:
    return studio.change_view(turn, None, None, "inferno", 0.55, aggregation, 0, L, "total", 0, 1, 0, 1, session)


def test_a_per_layer_view_of_a_dropped_turn_says_so_and_shows_the_default_map():
    studio, session = page_with_budget(32 * UNIT)  # this session: 8 tokens' maps and full detail
    first = finished_turn(session, 4)
    second = finished_turn(session, 8)
    assert set(levels(first)) == {"dropped"} and "coarse" in levels(second)
    assert studio.traces.limit_mb == pytest.approx(32 * UNIT / MiB)
    tokens = sorted(first.tokens)
    for rule in ("mean", "max"):  # the shown maps stay: the view falls back to the model's own map
        np.testing.assert_array_equal(first.focus_map(tokens, "image", 0, rule, (0, L)),
                                      first.focus_map(tokens, "image", 0))
    page = studio.page
    default = view(studio, session, 0, "default")
    mean = view(studio, session, 0, "mean")
    caption = mean[page.focus_caption]
    assert (f"per-layer detail of this turn was dropped to stay within --trace-memory-mb "
            f"{studio.traces.limit_mb:g}; showing the model&#x27;s default map") in caption
    assert "drawn: mean over layers" not in caption  # what is drawn is the default map, and it says so
    np.testing.assert_array_equal(np.asarray(mean[page.focus_image]["value"]),
                                  np.asarray(default[page.focus_image]["value"]))
    assert "dropped" not in default[page.focus_caption]  # the default view needs no per-layer detail
    maxed = view(studio, session, 0, "max")[page.focus_caption]
    assert "showing the model" in maxed and "max over layers" not in maxed


def test_a_per_layer_view_of_coarsened_detail_says_so_and_stays_close_to_the_whole_map():
    studio, session = page_with_budget(32 * UNIT)
    finished_turn(session, 4)
    second = finished_turn(session, 8)
    coarse = [i for i in sorted(second.tokens) if second.tokens[i].detail == "coarse"]
    assert coarse and all(second.tokens[i].detail in ("coarse", "full") for i in second.tokens)
    i = coarse[0]
    np.testing.assert_allclose(second.focus_map([i], "image", 0, "max", (2, 5)), stack(i)[2:5].max(0), atol=2e-3)
    np.testing.assert_allclose(second.focus_map([i], "image", 0, "mean", (0, L)), stack(i).mean(0), atol=1e-3)
    caption = view(studio, session, 1, "mean")[studio.page.focus_caption]
    assert "coarsened to 8 bits to stay within --trace-memory-mb" in caption
    assert "drawn: mean over layers" in caption  # still re-aggregated from the (8-bit) detail


def test_the_export_after_a_drop_loads_and_says_what_was_dropped(tmp_path):
    studio, session = page_with_budget(32 * UNIT)
    finished_turn(session, 4)
    finished_turn(session, 8)
    path = write_trace_zip(session, {"model_id": "m"}, tmp_path)
    with zipfile.ZipFile(path) as zf:
        trace = json.loads(zf.read("trace.json"))
        names = zf.namelist()
    assert trace["trace_memory"]["budget_mb"] == pytest.approx(studio.traces.limit_mb)
    assert trace["trace_memory"]["turns_coarsened_or_dropped"] == [1, 2]
    first, second = trace["turns"]
    assert first["per_layer_detail"]["dropped"] == 4 and first["per_layer_detail"]["whole"] == 0
    assert "--trace-memory-mb" in first["per_layer_detail"]["note"]
    assert [t["focus"]["per_layer"] for t in first["tokens"]] == ["dropped"] * 4
    assert second["per_layer_detail"]["coarsened"] > 0 and second["per_layer_detail"]["whole"] > 0
    assert all(t["focus"]["images"] for t in first["tokens"])  # the shown maps are exported in full
    assert "turn01/focus_image1_answer.png" in names and "turn01/focus_image1_word000_w0.png" in names


# ----------------------------------------------------------------------------- the count


def test_the_count_returns_to_the_right_total_when_the_store_evicts_a_session():
    budget = budget_of(1000 * UNIT)
    store = SessionStore(max_sessions=2, traces=budget)
    a, b, c = Session(), Session(), Session()
    store.put(a)
    store.put(b)
    finished_turn(a, 3)
    finished_turn(b, 2)
    assert budget.held == 5 * FULL == actual_bytes(a, b)
    store.put(c)  # the least recently used, A, leaves the store: its detail goes
    finished_turn(c, 1)
    assert store.get(a.key) is None and budget.session_held(a) == 0
    assert budget.held == 3 * FULL == actual_bytes(a, b, c)
    assert all(t.images for t in a.turns[0].tokens.values())  # A's open tab still shows its maps ...
    assert budget.kept == 6 * SHOWN == actual_kept(a, b, c)  # ... which are still counted
    finished_turn(a, 1)  # if it sends again, that turn is counted as any other
    assert budget.held == 4 * FULL == actual_bytes(a, b, c) and budget.kept == actual_kept(a, b, c)
    del a
    gc.collect()  # Gradio let go of A's tab
    assert budget.summary()["kept_bytes"] == 3 * SHOWN == actual_kept(b, c)
    assert budget.held == 3 * FULL == actual_bytes(b, c)


def test_the_count_returns_to_the_right_total_on_new_chat_and_after_an_idle_session_expires():
    budget = budget_of(1000 * UNIT)
    store = SessionStore(traces=budget)
    a, b = Session(), Session()
    store.put(a)
    store.put(b)
    finished_turn(a, 3)
    finished_turn(b, 2)
    live = Live(a)
    live.push()
    a.clear()  # New chat while a reply streams: the old turns leave the count, and a late token is not counted
    assert (budget.held, budget.kept) == (2 * FULL, 2 * SHOWN) == (actual_bytes(a, b), actual_kept(a, b))
    live.push()
    assert (budget.held, budget.kept) == (2 * FULL, 2 * SHOWN) and live.turn.tokens[1].per_layer_images == []
    finished_turn(a, 2)  # the new chat is counted
    assert (budget.held, budget.kept) == (4 * FULL, 4 * SHOWN) == (actual_bytes(a, b), actual_kept(a, b))
    store.idle_s = 0.0
    assert store.get(b.key) is None  # every session expired: the detail goes, the open tabs' shown maps stay
    assert (budget.held, budget.kept) == (0, 4 * SHOWN) == (actual_bytes(a, b), actual_kept(a, b))


def test_a_session_gradio_let_go_of_leaves_the_count():
    budget = budget_of(1000 * UNIT)
    a, b = Session(), Session()
    budget.join(a)
    budget.join(b)
    finished_turn(a, 3)
    finished_turn(b, 1)
    del a
    gc.collect()
    summary = budget.summary()
    assert (summary["detail_bytes"], summary["kept_bytes"]) == (FULL, SHOWN) == (actual_bytes(b), actual_kept(b))
    assert summary["sessions"] == 1


def test_a_session_copied_from_the_pages_template_shares_the_one_budget():
    import copy

    budget = budget_of(1000 * UNIT)
    template = Session()
    budget.join(template)
    copied = copy.deepcopy(template)
    assert copied.traces is budget


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("stack_", [np.zeros((0, 4, 4)), np.zeros((3, 0)), np.array(2.0), np.full((2, 3), np.nan),
                                    np.array([[-1.0, 1.0], [np.inf, 0.5]]), np.ones((2, 2, 2))])
def test_coarsening_odd_maps_never_crashes_and_keeps_their_shape(stack_):
    coarse = Coarse.of(stack_)
    restored = coarse.restore()
    assert restored.dtype == np.float32 and restored.size == np.asarray(stack_).size
    if np.isfinite(stack_).all() and stack_.size:
        np.testing.assert_allclose(restored.reshape(np.shape(stack_)), stack_, atol=np.ptp(stack_) / 500 + 1e-7)


def test_focus_events_with_odd_per_layer_maps_are_counted_and_never_crash_the_turn():
    budget = budget_of(16 * UNIT)
    s = Session()
    budget.join(s)
    s.start(Turn("q", images=[image()]))
    odd = [Focus(0, "a", "answer", [np.ones((R, C))], [], per_layer_images=[np.zeros((0, 4, 4))]),
           Focus(1, "b", "answer", [np.ones((R, C))], [], per_layer_images=[np.ones((L, R, C))],
                 per_layer_audios=[np.ones((L, 7))]),
           Focus(2, "c", "answer", [np.ones((R, C))], [], per_layer_images=[np.full((L, R, C), np.nan)]),
           Focus(1, "b", "answer", [np.ones((R, C))], [], per_layer_images=[np.ones((L, R, C))])]  # the same again
    for _ in range(3):
        odd += [focus(i) for i in range(3, 8)]
    list(stream_turn(None, s, "s", handle=Handle(odd + [Done("stop")])))
    assert budget.held == actual_bytes(s) and budget.kept == actual_kept(s)
    assert budget.held + budget.kept <= budget.session_limit
    turn = s.turns[-1]
    assert turn.tokens[0].detail == "full" and turn.tokens[0].held == 0  # nothing to count, nothing to drop
    for rule in ("mean", "max"):
        assert turn.focus_map(sorted(turn.tokens)[1:], "image", 0, rule, (0, 1)) is not None


def test_the_trace_memory_benchmark_drives_the_page_code_and_stays_within_its_budget(tmp_path):
    from tools.trace_memory.run import main

    out = tmp_path / "trace_memory.json"
    result = main(["--turns", "3", "--tokens", "60", "--sessions", "2", "--layers", "4", "--grid", "16",
                   "--trace-memory-mb", "1", "--sample-every", "20", "--out", str(out)])
    counts = result["counts"]
    assert counts["detail_bytes"] + counts["kept_bytes"] <= counts["limit_bytes"] == MiB
    assert counts["tokens_dropped_total"] > 0 and counts["tokens_whole"] > 0
    assert json.loads(out.read_text())["summary"]["budget_mib"] == 1
