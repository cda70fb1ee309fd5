"""The page's conversation model (issue 16): versions as a tree, focus maps bound to the media they belong
to across turns, each-turn-alone vs multi-turn, the session store, the settings' range checks."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from autoglm_app.events import Answer, Done, Focus, LayerRoute, Routing
from autoglm_app.ui.export import build_trace, write_trace_zip
from autoglm_app.ui.inputs import Controls, InputError, make_options
from autoglm_app.ui.panels import window_html
from autoglm_app.ui.session import Session, SessionStore, Turn


def done(session: Session, answer: str = "ok", n_maps: int | None = None) -> Turn:
    """Finish the newest turn with one token whose focus has ``n_maps`` image maps (default: all of them)."""
    turn = session.turns[-1]
    n = len(turn.media("image")) if n_maps is None else n_maps
    maps = [np.full((2, 2), 0.1 * (k + 1), np.float32) for k in range(n)]
    turn.apply(Answer(answer))
    turn.apply(Focus(0, answer, "answer", maps, []))
    turn.apply(Done("stop"))
    return turn


def image(color: str) -> Image.Image:
    return Image.new("RGB", (8, 8), color)


def test_each_turn_alone_sends_only_the_newest_turn_and_binds_its_own_image():
    s = Session()  # default: each turn alone
    s.start(Turn("one", images=[image("red")]))
    done(s)
    s.start(Turn("two", images=[image("blue")]))
    assert [m.text for m in s.engine_messages()] == ["two"]
    turn = done(s)
    assert [m.label for m in turn.media("image")] == ["image 1"] and turn.media("image")[0].own
    assert np.allclose(turn.focus_map([0], "image", 0), 0.1)


def test_multi_turn_binds_each_map_to_its_image_oldest_first_and_a_text_follow_up_keeps_them():
    s = Session(multi_turn=True)
    s.start(Turn("one", images=[image("red")]))
    done(s)
    s.start(Turn("two", images=[image("blue")]))
    assert [m.role for m in s.engine_messages()] == ["user", "assistant", "user"]
    turn = done(s)
    labels = [m.label for m in turn.media("image")]
    assert labels == ["turn 1 · image 1", "image 1"]
    assert np.allclose(turn.focus_map([0], "image", 1), 0.2)  # its own image is the second map
    s.start(Turn("and now?"))
    follow = done(s)
    assert [m.label for m in follow.media("image")] == ["turn 1 · image 1", "turn 2 · image 1"]
    assert follow.focus_map([0], "image", 1) is not None


def test_maps_match_from_the_end_when_the_engine_dropped_the_oldest_turns():
    s = Session(multi_turn=True)
    for color in ("red", "green"):
        s.start(Turn(color, images=[image(color)]))
        done(s)
    s.start(Turn("third", images=[image("blue")]))
    turn = done(s, n_maps=2)  # the engine left turn 1 out: maps for turn 2's image and this one's
    assert turn.dropped_media("image") == 1
    assert turn.focus_map([0], "image", 0) is None
    assert np.allclose(turn.focus_map([0], "image", 2), 0.2)


def test_regenerate_and_edit_keep_earlier_versions_browsable():
    s = Session()
    s.start(Turn("q1"))
    done(s, "a1")
    s.start(Turn("q2"))
    done(s, "a2")
    s.start_version(s.turns[-1].again(), 1)  # regenerate turn 2
    done(s, "a2 again")
    assert s.versions(1) == (1, 2) and s.turns[-1].answer == "a2 again"
    s.start_version(s.turns[0].again(text="q1 edited"), 0)  # edit turn 1: turn 2 stays with the old version
    done(s, "a1'")
    assert [t.text for t in s.turns] == ["q1 edited"] and s.versions(0) == (1, 2)
    s.choose(0, 0)
    assert [t.answer for t in s.turns] == ["a1", "a2 again"]
    undo = s.start_version(Turn("refused"), 2)
    s.discard(undo)
    assert [t.answer for t in s.turns] == ["a1", "a2 again"]


def test_the_store_finds_a_session_by_its_key_and_forgets_the_least_recent():
    store = SessionStore(max_sessions=2)
    a, b, c = Session(), Session(), Session()
    key = store.put(a)
    store.put(b)
    assert store.get(key) is a and len(key) >= 20
    store.put(c)  # b is now the least recently used
    assert store.get(b.key) is None and store.get(key) is a and store.get("guess") is None


@pytest.mark.parametrize("args, words", [
    (dict(seed=-7), "Seed -7"),
    (dict(seed=2.5), "Seed 2.5"),
    (dict(typed=json.dumps({"Temperature": 9})), "Temperature 9"),
    (dict(stop="a\nb\nc\nd\ne"), "5 stop sequences"),
])
def test_out_of_range_settings_name_the_value_and_send_nothing(args, words):
    base = dict(thinking=True, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=-1)
    with pytest.raises(InputError, match=words):
        make_options(**{**base, **args})


def test_controls_carry_top_k_repetition_penalty_stop_and_the_context_mode():
    c = Controls(False, 0.0, 1.0, 8, 3, 5, 1.2, "END\nSTOP", "Be brief.", "multi-turn", "")
    o = c.options()
    assert (o.top_k, o.repetition_penalty, o.stop, o.seed) == (5, 1.2, ["END", "STOP"], 3)
    assert c.multi_turn(Session()) and not Controls(context_mode=None).multi_turn(Session())


def test_export_names_each_turns_context_and_writes_routed_experts(tmp_path):
    s = Session(multi_turn=True)
    s.start(Turn("one", images=[image("red")]))
    done(s)
    s.start(Turn("two", images=[image("blue")]))
    turn = done(s)
    load = {"layers": [0, 1], "experts": 4, "top_k": 2}
    turn.apply(Routing(0, "ok", "answer", [LayerRoute(0, [1, 2], [0.6, 0.4]), LayerRoute(1, [3, 0], [0.5, 0.5])],
                       load))
    trace = build_trace(s, {"model_id": "m"})
    ctx = trace["turns"][1]["context"]["images"]
    assert [c["label"] for c in ctx] == ["turn 1 · image 1", "image 1"]
    assert ctx[0]["file"] == "turn01/input_image1.png" and ctx[1]["file"] == "turn02/input_image1.png"
    with zipfile.ZipFile(write_trace_zip(s, {"model_id": "m"}, tmp_path)) as zf:
        names = set(zf.namelist())
        assert {"turn02/focus_image1_answer.png", "turn02/focus_image2_answer.png"} <= names
        routed = np.load(io.BytesIO(zf.read("turn02/routed_experts.npy")))
    assert routed.dtype == np.int16 and routed.tolist() == [[[1, 2], [3, 0]]]


def test_the_routing_windows_line_reads_the_engines_figures():
    load = {"balancedness": {"10": [0.5, 0.7], "100": [0.6, 0.6], "1000": [0.6, 0.6]},
            "dead_fraction": {"10": [0.25, 0.25], "100": [0.0, 0.0], "1000": [0.0, 0.0]},
            "window_tokens": {"10": 10, "100": 40, "1000": 40}, "diversity": [0.8, 0.9],
            "phase_tokens": {"reasoning": 30, "answer": 10}}
    line = window_html(load)
    assert "last 10 (10 tokens): balancedness 0.60, dead experts 25%" in line
    assert "diversity exp(H)/N 0.85" in line and "30 reasoning, 10 answer" in line
    assert window_html({}) == ""
