"""What the decode loop leaves to the reader, and what it does for several rows at once, gives what the direct
computation gives: a Focus cut and aggregated when it is read; routing counts snapshot at most every
``COUNTS_EVERY_S`` with the final counts still on the request's newest Routing event; the greedy rows of a batch
picked in one argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_app.engine import generation
from autoglm_app.engine.sampling import Sampler, pick_greedy, logprob_rows
from autoglm_app.events import Focus, Options, Routing, Stats, aggregate_layers, newest_counted
from autoglm_app.ui.turn import Turn
from tests.engine.test_engine import ask, scene, tone


@pytest.mark.parametrize("rule", [("mean", None), ("mean", (1, 3)), ("max", None)])
def test_a_focus_read_lazily_is_the_cut_and_aggregated_row(rule):
    rng = np.random.default_rng(0)
    layers, shapes, frames = 4, [(3, 5), (2, 2)], [7]
    row = rng.random((layers, 15 + 4 + 7)).astype(np.float32)
    event = Focus(3, " x", "answer", rows=row, spans=(shapes, frames), rule=rule)
    want_images = [row[:, :15].reshape(layers, 3, 5), row[:, 15:19].reshape(layers, 2, 2)]
    want_audio = row[:, 19:]
    mass = event.mass  # read first: the one-sum path where it applies
    for got, want in zip(event.per_layer_images, want_images, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(event.per_layer_audios[0], want_audio)
    for got, want in zip(event.images + event.audios, want_images + [want_audio], strict=True):
        np.testing.assert_allclose(got, aggregate_layers(want, *rule), rtol=1e-6)
    assert mass == pytest.approx(sum(float(m.sum()) for m in event.images + event.audios), rel=1e-5)
    given = Focus(0, "a", "answer", [np.ones((2, 2))], [])  # maps given (a recorded stream): kept as they are
    assert given.per_layer_images == [] and given.mass == 4.0


def routing_events(engine, request) -> list:
    return [e for e in engine.run(request)]


def test_counts_are_snapshot_at_most_so_often_and_the_newest_event_ends_with_the_final_ones(engine, monkeypatch):
    """Every token delivered on its own, counts allowed only at forced deliveries: the events in between carry
    none, and the request's last Routing event (its end came by a stop id or by length) has the counts a snapshot
    on every token gives, which the page's turn and the metrics read."""
    request = ask(images=[scene()], audios=[tone(0.5)], max_new_tokens=24, temperature=0.0, focus=True,
                  routing=True)
    monkeypatch.setattr(generation, "DELIVER_EVERY_S", 0.0)
    monkeypatch.setattr(generation, "COUNTS_EVERY_S", 0.0)
    every = routing_events(engine, request)
    monkeypatch.setattr(generation, "COUNTS_EVERY_S", 1e9)
    sparse = routing_events(engine, request)
    re, rs = ([e for e in events if isinstance(e, Routing)] for events in (every, sparse))
    assert len(re) == len(rs) > 3
    assert all(e.counts is not None for e in re)
    assert rs[0].counts is not None and any(e.counts is None for e in rs[1:-1])
    final, want = rs[-1].counts, re[-1].counts
    assert final is not None and final.tokens == want.tokens
    for name in ("prefill", "decode", "dropped"):
        np.testing.assert_array_equal(getattr(final, name), getattr(want, name))
    for w in want.windows:
        np.testing.assert_array_equal(final.windows[w], want.windows[w])
    turn = Turn(text="q", options=request.options)
    for e in sparse:
        turn.apply(e)
        if isinstance(e, Routing) and e is not rs[-1]:  # mid-stream: the newest counts it has, never none
            assert turn.load is not None
    assert turn.load == rs[-1].load and turn.load["tokens"] == re[-1].load["tokens"]
    assert next(e for e in sparse if isinstance(e, Stats)).completion_tokens == len(rs)


def test_newest_counted_prefers_the_newest_event_once_it_has_counts():
    old = Routing(0, "a", "answer", [], {"tokens": 1})
    new = Routing(1, "b", "answer", [], None)
    assert newest_counted(new, old) is old and new.load is None
    new.counts = {"tokens": 2}
    assert newest_counted(new, old) is new and new.load == {"tokens": 2}
    assert newest_counted(None, None) is None


def test_greedy_rows_picked_together_are_the_rows_picked_one_by_one():
    torch.manual_seed(0)
    V = 50
    logits = torch.randn(5, V)
    logits[2, 7] = logits[2].max() + 5  # a banned id on top: never chosen
    logits[3, 9] = logits[3].max() + 5  # a stop id on top: held back while the minimum length is not reached
    logits[4, :] = 1.0  # a tie: the lowest id, as argmax picks it
    banned, stop = [7, 8], [9]
    prompt = torch.tensor([1, 2, 3])

    def samplers():
        return [Sampler(Options(temperature=0.0, min_new_tokens=4 if i == 3 else 0, logprobs=2 if i % 2 else None),
                        prompt, banned, stop) for i in range(5)]

    stats = logprob_rows(logits, 2)
    one_by_one = samplers()
    want = [s.pick(logits[i].clone(), stats[i]) for i, s in enumerate(one_by_one)]
    together = samplers()
    got = pick_greedy(logits, list(range(5)), together, stats)
    assert got == want and 7 not in got and got[3] != 9 and got[4] == 0
    for a, b in zip(together, one_by_one):
        assert (a.last is None) == (b.last is None)
        if a.last is not None:
            assert a.last.token_id == b.last.token_id and a.last.logprob == pytest.approx(b.last.logprob)


def test_the_steps_greedy_pack_is_what_the_sampler_picks():
    """The one-graph step's in-graph picks (``greedy_pack``: banned ids masked, and the stop ids too before the
    minimum length) against ``Sampler.pick`` on the same rows."""
    from autoglm_app.modeling.static_decode import greedy_pack

    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    logits[1, 3] = logits[2, 5] = 50.0  # a banned and a stop id on top
    banned, stop = [3, 4], [5]
    pack = greedy_pack(logits, torch.tensor(banned), torch.tensor(stop))
    np.testing.assert_array_equal(pack[:, 2:].numpy(), logits.gather(1, pack[:, :2].long()).numpy())  # raw logits
    pack = pack[:, :2].long()
    for i in range(6):
        for held in (0, 1):
            s = Sampler(Options(temperature=0.0, min_new_tokens=held), torch.tensor([1]), banned, stop)
            assert int(pack[i, held]) == s.pick(logits[i].clone())
    assert int(pack[2, 0]) == 5 and int(pack[2, 1]) != 5 and 3 not in pack[:, 0].tolist()
