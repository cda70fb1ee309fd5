"""The page's pure parts: synthetic event streams folded into a session, then rendered and exported.

No server and no model: events are built by hand, so thinking, focus and routing
are all exercised deterministically.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from autoglm_app.events import (
    Answer,
    Audio,
    BadRequest,
    Done,
    EngineBusy,
    Error,
    Focus,
    LayerRoute,
    Notice,
    Options,
    Queued,
    Reasoning,
    Routing,
    Stats,
)
from autoglm_app.ui import render
from autoglm_app.ui.layout import build_page
from autoglm_app.ui.panels import clamp_layers
from autoglm_app.ui.export import build_trace, write_trace_zip
from autoglm_app.ui.session import Session, Turn, stream_turn
from autoglm_app.ui.words import merge_words

LAYERS, ROWS, COLS, FRAMES = 3, 4, 4, 10


def focus_map(hot: tuple[int, int]) -> np.ndarray:
    """(layers, rows, cols) with all attention on one cell, growing with the layer."""
    m = np.full((LAYERS, ROWS, COLS), 0.001, np.float32)
    for layer in range(LAYERS):
        m[layer, hot[0], hot[1]] = 0.1 * (layer + 1)
    return m


def load(decode: int) -> dict:
    return {"layers": [0, 1], "experts": 4, "top_k": 2, "tokens": {"prefill": 20, "decode": decode},
            "prefill": [[10, 10, 10, 10], [20, 5, 10, 5]], "decode": [[decode, decode, 0, 0], [0, decode, decode, 0]],
            "total": [[10 + decode, 10 + decode, 10, 10], [20, 5 + decode, 10 + decode, 5]],
            "by_modality": {"text": [[4, 4, 2, 2], [6, 2, 2, 2]], "image": [[6, 6, 8, 8], [14, 3, 8, 3]],
                            "audio": [[0, 0, 0, 0], [0, 0, 0, 0]]},
            "dropped": [0, 1], "cv": [0.1, 0.4], "entropy": [0.99, 0.8]}


def token_events(index: int, token: str, phase: str, hot: tuple[int, int]) -> list:
    per_layer = focus_map(hot)
    audio = np.zeros((LAYERS, FRAMES), np.float32)
    audio[:, index % FRAMES] = 0.2
    return [
        Focus(index, token, phase, images=[per_layer.mean(0)], audios=[audio.mean(0)],
              per_layer_images=[per_layer], per_layer_audios=[audio]),
        Routing(index, token, phase, [LayerRoute(0, [index % 4, (index + 1) % 4], [0.6, 0.4]),
                                      LayerRoute(1, [2, 3], [0.55, 0.45])], load(index + 1)),
    ]


def stats(finish: str = "stop") -> Stats:
    return Stats(ttft_s=0.1, think_s=0.4, reasoning_tokens=2, answer_tokens=3, reasoning_tps=20.0, answer_tps=30.0,
                 tokens_per_second=25.0, prompt_tokens=40, completion_tokens=5, queue_s=0.0, total_s=0.6,
                 peak_memory={"cpu": 2**30}, finish_reason=finish, attention="sdpa+probe")


def thinking_turn_events() -> list:
    """Queued, reasoning with its probes, then an answer of three words, stats, done."""
    events = [Queued(1), Queued(0)]
    events += [Reasoning("Look at the")] + token_events(0, "Look", "reasoning", (0, 0))
    events += [Reasoning(" shapes.")] + token_events(1, " shapes.", "reasoning", (0, 1))
    events += [Answer("The")] + token_events(2, "The", "answer", (1, 1))
    events += [Answer(" cir")] + token_events(3, " cir", "answer", (2, 2))
    events += [Answer("cle.")] + token_events(4, "cle.", "answer", (3, 3))
    return events + [stats(), Done("stop")]


def new_turn() -> Turn:
    image = Image.new("RGB", (64, 48), (200, 200, 200))
    audio = Audio(np.sin(np.linspace(0, 200, 16000)).astype(np.float32), 16000)
    return Turn(text="What is in the image?", images=[image], image_paths=["/tmp/x.png"], audio=audio,
                audio_path="/tmp/x.wav", options=Options(max_new_tokens=8))


def folded(events: list) -> Turn:
    turn = new_turn()
    for e in events:
        turn.apply(e)
    return turn


# ----------------------------------------------------------------------------- chat history


def test_thinking_message_is_pending_while_reasoning_streams():
    turn = new_turn()
    for e in thinking_turn_events()[:5]:
        turn.apply(e)
    thinking = [m for m in turn.chat_messages() if m.get("metadata", {}).get("title") == "Thinking"]
    assert len(thinking) == 1
    assert thinking[0]["metadata"]["status"] == "pending"
    assert "Look at the" in thinking[0]["content"]
    assert not [m for m in turn.chat_messages() if m["role"] == "assistant" and "metadata" not in m]


def test_finished_turn_has_user_parts_then_done_thinking_with_duration_then_answer():
    history = folded(thinking_turn_events()).chat_messages()
    assert [m["role"] for m in history] == ["user", "user", "user", "assistant", "assistant"]
    assert history[0]["content"] == "What is in the image?"
    assert history[1]["content"] == {"path": "/tmp/x.png"} and history[2]["content"] == {"path": "/tmp/x.wav"}
    meta = history[3]["metadata"]
    assert meta["title"] == "Thinking" and meta["status"] == "done" and meta["duration"] == pytest.approx(0.4)
    assert history[3]["content"] == "Look at the shapes."
    assert history[4] == {"role": "assistant", "content": "The circle."}


def test_no_thinking_message_when_the_model_emits_no_reasoning():
    turn = folded([Queued(0), Answer("Hi"), stats(), Done("stop")])
    assert [m.get("metadata") for m in turn.chat_messages() if m["role"] == "assistant"] == [None]


def test_queue_position_shows_while_waiting_and_goes_once_running():
    turn = folded([Queued(2)])
    waiting = [m for m in turn.chat_messages() if m.get("metadata", {}).get("title") == "In queue"]
    assert waiting and "2 requests ahead" in waiting[0]["content"]
    turn.apply(Queued(0))
    assert not [m for m in turn.chat_messages() if m.get("metadata", {}).get("title") == "In queue"]


def test_notice_stop_and_error_read_as_messages():
    turn = folded([Queued(0), Notice("the oldest 1 turn(s) were left out"), Answer("The"), stats("cancelled"),
                   Done("cancelled")])
    contents = [m["content"] for m in turn.chat_messages()]
    assert "the oldest 1 turn(s) were left out" in contents
    assert contents[-1] == "The\n\n*(stopped)*"
    failed = folded([Queued(0), Answer("x"), Error("internal error while generating (ValueError: boom)")])
    last = failed.chat_messages()[-1]["content"]
    assert last.startswith("**Error:** Internal error while generating") and "Traceback" not in last
    assert not failed.running and not failed.ok


# ----------------------------------------------------------------------------- words and focus


def test_merge_words_joins_pieces_and_splits_on_spaces_phases_and_cjk():
    tokens = [(0, "<think>", "reasoning"), (1, "Hmm", "reasoning"), (2, " The", "answer"), (3, " cir", "answer"),
              (4, "cle", "answer"), (5, ",", "answer"), (6, "", "answer"), (7, " red", "answer"), (8, "\n", "answer"),
              (9, "我", "answer"), (10, "是", "answer"), (11, "。", "answer")]
    words = merge_words(tokens)
    assert [(w.text.strip(), w.phase) for w in words] == [
        ("Hmm", "reasoning"), ("The", "answer"), ("circle,", "answer"), ("red", "answer"), ("我", "answer"),
        ("是。", "answer")]
    assert words[2].tokens == [3, 4, 5, 6]


def test_word_chips_mark_the_selected_word():
    words = merge_words([(0, "The", "answer"), (1, " cat", "answer")])
    assert render.word_chips(words, 1) == [("The ", "answer"), ("cat ", "selected")]


def test_word_focus_is_the_mean_of_its_tokens_maps():
    turn = folded(thinking_turn_events())
    circle = [w for w in turn.words() if w.text.strip() == "circle."][0]
    heat = turn.focus_map(circle.tokens, "image", 0)
    expected = (focus_map((2, 2)).mean(0) + focus_map((3, 3)).mean(0)) / 2
    np.testing.assert_allclose(heat, expected, rtol=1e-5)


def test_layer_reaggregation_uses_per_layer_maps_and_the_range():
    turn = folded(thinking_turn_events())
    top = turn.focus_map([2], "image", 0, "max", (2, 3))
    assert top[1, 1] == pytest.approx(0.3, rel=1e-3)  # stored as float16
    first = turn.focus_map([2], "image", 0, "mean", (0, 1))
    assert first[1, 1] == pytest.approx(0.1, rel=1e-3)
    with pytest.raises(ValueError, match="outside"):  # the contract's rule is strict: the page clamps first
        turn.focus_map([2], "image", 0, "mean", (5, 9))
    with pytest.raises(ValueError, match="median"):
        turn.focus_map([2], "image", 0, "median", (0, 1))


def test_the_page_clamps_the_layer_sliders_to_the_models_layers():
    assert clamp_layers((5, 9), LAYERS) == (2, 3)  # past the top: the top layer
    assert clamp_layers((-4, 0), LAYERS) == (0, 1)  # below the bottom: the first layer
    assert clamp_layers((1, 1), LAYERS) == (1, 2)  # an empty range: one layer
    assert clamp_layers((0, 7), LAYERS) == (0, 3)
    assert clamp_layers(None, LAYERS) is None


def test_selection_follows_the_newest_token_live_then_the_whole_answer_then_a_clicked_word():
    session = Session()
    session.start(new_turn())
    turn = session.turns[-1]
    for e in thinking_turn_events()[:-2]:
        turn.apply(e)
    assert session.selection(turn)[0] == [4] and "live" in session.selection(turn)[1]
    turn.apply(stats())
    turn.apply(Done("stop"))
    assert session.selection(turn)[0] == [2, 3, 4]
    session.view.word = 3
    assert session.selection(turn) == ([3, 4], "“circle.”")


def test_overlay_heatmap_keeps_the_size_and_follows_the_map():
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    left = np.zeros((4, 4)); left[:, 0] = 1
    right = np.zeros((4, 4)); right[:, 3] = 1
    a = render.overlay_heatmap(image, left, "inferno", 0.8)
    b = render.overlay_heatmap(image, right, "inferno", 0.8)
    assert a.size == image.size
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    flat = render.overlay_heatmap(image, np.ones((4, 4)), "inferno", 0.0)
    assert np.array_equal(np.asarray(flat), np.asarray(image))  # opacity 0 = the picture


@pytest.mark.parametrize("name", render.COLORMAPS)
def test_lut_colorize_equals_matplotlibs_colormap(name):
    from matplotlib import colormaps

    values = np.concatenate([np.linspace(0, 1, 1001), [-0.5, 1.5, 0.999999, 1 / 256, 255 / 256]])
    expected = (colormaps[name](np.clip(values, 0, 1))[:, :3] * 255).astype(np.int16)
    assert np.abs(render.colorize(values, name).astype(np.int16) - expected).max() <= 1  # within 1/255
    u8 = np.arange(256, dtype=np.uint8)
    assert np.abs(render.colorize(u8, name).astype(np.int16)
                  - (colormaps[name](u8 / 255.0)[:, :3] * 255).astype(np.int16)).max() <= 1
    assert render.colormap_lut(name) is render.colormap_lut(name)  # built once


def test_overlay_heatmap_of_a_photo_is_bounded_and_fast():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8))
    heat = rng.random((45, 60)).astype(np.float32)  # 2,700 patches
    out = render.overlay_heatmap(photo, heat, "inferno", 0.6)
    assert max(out.size) == render.DISPLAY_MAX_SIDE and out.size == (448, 252) and out.mode == "RGB"
    best = min(_timed(lambda: render.overlay_heatmap(photo, heat, "viridis", 0.6)) for _ in range(5))
    assert best < 0.05, best  # ~2 ms measured (the shrunk photo is cached)
    hot = np.zeros((45, 60)); hot[0, 0] = 1
    pixels = np.asarray(render.overlay_heatmap(Image.new("RGB", (1920, 1080), (0, 0, 0)), hot, "inferno", 1.0))
    assert pixels[:5, :5].mean() > pixels[-5:, -5:].mean() + 100  # the hot patch lands top left


def _timed(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_max_caption_never_states_a_share_over_100_percent():
    mean_map = np.full((4, 4), 0.05)  # a distribution: 80 % of the attention on the image
    max_map = np.full((4, 4), 0.0765)  # max over layers: sums to 122 %
    caption = render.focus_caption_html("“cat”", [render.focus_share_caption(mean_map, "image 1")], True, False,
                                        aggregation="max")
    assert "80% of the attention on image 1" in caption and "max over layers" in caption
    assert "1.0" not in caption and "122" not in caption
    old_style = render.focus_caption_html("“cat”", [f"{float(np.sum(max_map)):.0%} of the attention on image 1"],
                                          True, False, aggregation="max")
    assert "122" not in old_style and "attention on image 1" in old_style  # the safety net drops the number
    assert render.focus_share_caption(np.full((4, 4), 0.2), "image 1").startswith("100%")  # clamped
    assert render.focus_share_caption(None, "image 1") == ""
    for text in (caption, old_style):
        import re

        assert all(float(p) <= 100 for p in re.findall(r"(\d+)%", text))


def test_audio_focus_image_draws_a_waveform_figure():
    img = render.audio_focus_image(np.zeros(1600, np.int16), 16000, np.arange(10.0), title="focus")
    assert img.mode == "RGB" and img.width > 300 and img.height > 100


# ----------------------------------------------------------------------------- routing and model panel


def test_routing_heatmap_shows_load_balance_and_the_tokens_experts():
    html = render.routing_heatmap_html(load(3), "total", [(0, [1, 2], [0.7, 0.3])], "“cat”")
    assert html.count("<tr>") == 3  # header + 2 layers
    assert html.count('class="chosen"') == 2 and "0.70" in html
    assert "0.40" in html and "0.80" in html and "decode 3" in html  # cv, entropy, token counts
    prefill = render.routing_heatmap_html(load(3), "prefill")
    assert ">20<" in prefill and 'class="chosen"' not in prefill
    assert "placeholder" in render.routing_heatmap_html(None)


def test_modality_split_and_token_routes_html():
    split = render.modality_split_html(load(2))
    assert split.count("<tr>") == 5 and "image: 20" in split
    routes = render.token_routes_html([(0, [3, 1], [0.6, 0.4])], "“cat”")
    assert "E3" in routes and "0.60" in routes


def test_model_markdown_lists_devices_memory_and_last_speed():
    info = {"model_id": "m", "family": "autoglm", "quantize": "int4", "device_map": {"a": 0, "b": 1, "c": 1},
            "summary": "module params", "attention": "sdpa", "context_limit": 4096}
    md = render.model_markdown(info, {"cuda:0": 3 * 2**30, "cuda:1": 2**30}, stats())
    assert "| cuda:1 | 2 | 1.0 GiB |" in md and "int4" in md and "module params" in md
    assert "| time to first token | 0.10 s |" in md and "| time to end of thinking | 0.40 s |" in md
    assert "No answer yet" in render.model_markdown(info, {"cpu": 1}, None)


def test_model_markdown_for_a_remote_backend_shows_backend_and_base_url_not_devices():
    info = {"model_id": "glm-4.5v", "backend": "openai", "base_url": "http://gpu-box:8000/v1", "context_limit": 8192,
            "summary": "forwarding to http://gpu-box:8000/v1", "focus": False, "routing": False,
            "reason": "focus maps and expert routing need the in-process engine", "hears_audio": False,
            "can_transcribe": True}
    md = render.model_markdown(info, {}, stats())
    assert "| backend | openai" in md and "`http://gpu-box:8000/v1`" in md and "transcribed to text" in md
    assert "need the in-process engine" in md and "| time to first token | 0.10 s |" in md
    assert "Devices" not in md and "Modules" not in md
    note = render.unavailable_html("Expert routing", info["reason"])
    assert "Expert routing needs the in-process engine" in note and "Focus maps and expert routing need" in note


# ----------------------------------------------------------------------------- export


def test_export_zip_holds_trace_json_inputs_and_heatmaps(tmp_path):
    session = Session()
    session.start(folded(thinking_turn_events()))
    path = write_trace_zip(session, {"model_id": "autoglm-test", "quantize": "fp32"}, tmp_path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        trace = json.loads(zf.read("trace.json"))
    turn = trace["turns"][0]
    assert trace["model"]["model_id"] == "autoglm-test"
    assert turn["prompt"]["text"] == "What is in the image?" and turn["answer"] == "The circle."
    assert turn["reasoning"] == "Look at the shapes." and turn["settings"]["max_new_tokens"] == 8
    assert turn["stats"]["ttft_s"] == 0.1 and turn["routing_load"]["experts"] == 4
    assert len(turn["tokens"]) == 5 and np.asarray(turn["tokens"][2]["focus"]["images"][0]).shape == (4, 4)
    assert turn["tokens"][2]["routing"][1] == {"layer": 1, "experts": [2, 3], "weights": [0.55, 0.45]}
    assert {"turn01/input_image1.png", "turn01/input_audio.wav", "turn01/focus_image1_answer.png",
            "turn01/focus_audio1_answer.png"} <= set(names)
    assert sum(n.startswith("turn01/focus_image1_word") for n in names) == len(turn["words"]) == 4


def test_build_trace_of_an_empty_session_has_no_turns():
    assert build_trace(Session(), {"model_id": "m"})["turns"] == []


# ----------------------------------------------------------------------------- talking to an engine


class FakeHandle:
    def __init__(self, events):
        self._events, self.cancelled = events, False

    def cancel(self):
        self.cancelled = True

    def events(self):
        finished = False
        try:
            for e in self._events:
                yield e
            finished = True
        finally:
            if not finished:
                self.cancel()


class FakeEngine:
    def __init__(self, events=None, raises=None):
        self.events, self.raises, self.requests, self.handles = events or [], raises, [], []

    def submit(self, request):
        self.requests.append(request)
        if self.raises:
            raise self.raises
        self.handles.append(FakeHandle(self.events))
        return self.handles[-1]


def test_stream_turn_folds_events_and_sends_earlier_good_turns_as_history():
    session = Session(multi_turn=True)
    engine = FakeEngine(thinking_turn_events())
    session.start(Turn(text="first"))
    list(stream_turn(engine, session, "s1"))
    session.start(Turn(text="second"))
    yields = list(stream_turn(engine, session, "s1"))
    assert yields[-1] is True and session.turns[-1].answer == "The circle."
    request = engine.requests[-1]
    assert request.session_id == "s1"
    assert [(m.role, m.text) for m in request.messages] == [("user", "first"), ("assistant", "The circle."),
                                                           ("user", "second")]
    assert session.handle is None


def test_stream_turn_turns_busy_and_bad_request_into_readable_errors():
    for exc, expected in [(EngineBusy("the server is busy (3 requests waiting)", 2.5), "try again in about 3 s"),
                          (BadRequest("the recording is 45.0 s long"), "The recording is 45.0 s long")]:
        session = Session()
        session.start(Turn(text="hi"))
        list(stream_turn(FakeEngine(raises=exc), session, "s"))
        assert expected in session.turns[-1].error and not session.turns[-1].running


def test_closing_the_stream_early_cancels_the_request():
    session = Session()
    engine = FakeEngine(thinking_turn_events())
    session.start(Turn(text="hi"))
    stream = stream_turn(engine, session, "s")
    next(stream)
    assert session.busy
    stream.close()
    assert engine.handles[-1].cancelled and session.turns[-1].finish_reason == "cancelled"


def test_session_cancel_stops_the_running_handle():
    session = Session()
    handle = FakeHandle([])
    session.handle = handle
    assert session.cancel() and handle.cancelled
    session.handle = None
    assert not session.cancel()


def test_sessions_do_not_share_state():
    import copy

    template = Session()
    a, b = copy.deepcopy(template), copy.deepcopy(template)
    a.start(Turn(text="a"))
    assert b.turns == [] and template.turns == []


# ----------------------------------------------------------------------------- the page's panel handlers


class InfoOnlyEngine:
    def info(self) -> dict:
        return {"model_id": "m", "family": "autoglm", "quantize": "fp32", "device_map": None, "summary": "",
                "attention": "sdpa", "context_limit": 1024}


def two_image_turn() -> Turn:
    turn = Turn(text="Compare", images=[Image.new("RGB", (32, 32), "white"), Image.new("RGB", (32, 32), "black")],
                image_paths=["/tmp/a.png", "/tmp/b.png"])
    first, second = focus_map((0, 0)), focus_map((3, 3))
    for i, token in enumerate(["Left", " right"]):
        turn.apply(Answer(token))
        turn.apply(Focus(i, token, "answer", images=[first.mean(0), second.mean(0)], audios=[],
                         per_layer_images=[first, second], per_layer_audios=[]))
    turn.apply(Done("stop"))
    return turn


def test_panels_pick_the_image_the_word_and_the_layer_aggregation():
    from autoglm_app.config import Settings

    _, studio = build_page(InfoOnlyEngine(), Settings(model="small"))
    page = studio.page
    session = Session()
    session.start(two_image_turn())

    def shown(update: dict) -> np.ndarray:
        return np.asarray(update[page.focus_image]["value"])

    first = studio.panels.all(session)
    assert first[page.image_pick]["visible"] and [c[0] for c in first[page.image_pick]["choices"]] == ["image 1", "image 2"]
    assert first[page.layer_to]["maximum"] == LAYERS
    second = studio.change_view(-1, 1, None, "inferno", 0.55, "default", 0, LAYERS, "total", 0, 1, 0, 1, session)
    assert session.view.image == 1 and not np.array_equal(shown(first), shown(second))
    studio.select_word(session, type("Evt", (), {"index": 1})())
    assert session.view.word == 1 and ("right ", "selected") in studio.panels.all(session)[page.words]
    top_layer = studio.change_view(-1, 1, None, "inferno", 0.55, "max", LAYERS - 1, LAYERS, "total", 0, 1, 0, 1, session)
    assert session.view.layers == (LAYERS - 1, LAYERS) and "Focus of" in top_layer[page.focus_caption]
    # slider values past the model's layers show the top layer's map, as the clamped range does
    beyond = studio.change_view(-1, 1, None, "inferno", 0.55, "max", LAYERS + 3, LAYERS + 5, "total", 0, 1, 0, 1, session)
    assert "32% of the attention on image 2" in top_layer[page.focus_caption]  # layer 2: 0.3 + 15 x 0.001
    assert beyond[page.focus_caption] == top_layer[page.focus_caption]
    bottom = studio.change_view(-1, 1, None, "inferno", 0.55, "max", 0, 1, "total", 0, 1, 0, 1, session)
    assert "11% of the attention on image 2" in bottom[page.focus_caption]  # layer 0: 0.1 + 15 x 0.001 (float16)
