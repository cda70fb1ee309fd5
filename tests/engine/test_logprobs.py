"""Per-token logprobs, alternatives and entropy, and a reply continued from a chosen token (a branch).

The reference is a direct forward of the model over the prompt and the reply so far, and the float32
log-softmax of its last logits: the engine's figures must equal it for every token, alone and batched.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from autoglm_app.engine.generation import fit_context, with_reply_start
from autoglm_app.events import Answer, BadRequest, Done, Error, Logprobs, Reasoning, Stats
from tests.engine.test_batching import demo_engine, run_together, solo  # noqa: F401 (demo_engine: a fixture)
from tests.engine.test_engine import ask, scene
from tests.helpers import make_engine


def logprobs_of(events) -> list[Logprobs]:
    return [e for e in events if isinstance(e, Logprobs)]


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, (Reasoning, Answer)))


@torch.inference_mode()
def reference(engine, request, reply: list[int]) -> torch.Tensor:
    """(len(reply) + 1, V) float32 log-softmax of the next-token logits after the prompt and each reply prefix."""
    rt = engine.rt
    req = engine._validate(request)
    prep, _ = fit_context(rt.family, rt.processor, req.messages, req.options, rt.context_limit, len(reply))
    inputs = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in prep.inputs.items()}
    T = inputs["input_ids"].shape[1]
    if reply:
        inputs = with_reply_start(inputs, reply, rt.model.get_input_embeddings().num_embeddings)
    rt.family.begin(rt.model)
    logits = rt.model(**inputs, use_cache=False, **rt.family.forward_kwargs(None)).logits[0]
    return torch.log_softmax(logits[T - 1:].float(), dim=-1)


def assert_matches_reference(engine, request, events, start: int = 0, forced: list[int] | None = None) -> None:
    forced = forced or []
    lps = logprobs_of(events)
    assert lps, "no Logprobs events"
    ids = forced + [e.token_id for e in lps]
    ref = reference(engine, request, ids[:-1])
    for e in lps:
        row = ref[e.index]
        assert e.index >= start
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        top = row.topk(len(e.top))
        assert [a.token_id for a in e.top] == top.indices.tolist() or \
            np.allclose([a.logprob for a in e.top], top.values.numpy(), atol=1e-4)  # ties may swap places
        np.testing.assert_allclose([a.logprob for a in e.top], top.values.numpy(), atol=1e-4)
        p = row.exp()
        assert e.entropy == pytest.approx(float(-(p * row).nan_to_num().sum()), abs=1e-3)


def test_logprobs_equal_a_direct_log_softmax_and_greedy_top1_is_the_emitted_token(demo_engine):
    request = ask(images=[scene()], temperature=0, max_new_tokens=10, logprobs=5, enable_thinking=True)
    events = list(demo_engine.submit(request).events(timeout=120))
    assert isinstance(events[-1], Done)
    lps = logprobs_of(events)
    assert [e.index for e in lps] == list(range(len(lps)))
    assert all(len(e.top) == 5 for e in lps)
    for e in lps:
        assert e.top[0].token_id == e.token_id  # greedy: the most likely token is the one emitted
        assert e.logprob <= 0 and e.entropy >= 0
        assert e.token == demo_engine.rt.processor.tokenizer.decode([e.token_id], skip_special_tokens=False)
    assert {e.phase for e in lps} <= {"reasoning", "answer"}
    assert_matches_reference(demo_engine, request, events)


def test_sampled_tokens_have_their_own_logprob_and_batched_equals_alone(demo_engine):
    requests = [ask(images=[scene()], temperature=3.0, top_p=1.0, seed=s, max_new_tokens=12, min_new_tokens=12,
                    logprobs=3, session=f"s{s}") for s in (1, 2, 3)]
    requests.append(ask("Who are you?", temperature=0, max_new_tokens=8, session="plain"))  # asks for none
    alone = [solo(demo_engine, r) for r in requests]
    together = run_together(demo_engine, requests)
    for b, a, r in zip(together, alone, requests):
        assert text_of(b) == text_of(a)
        lb, la = logprobs_of(b), logprobs_of(a)
        assert len(lb) == len(la)
        for x, y in zip(lb, la):
            assert (x.index, x.token_id, [t.token_id for t in x.top]) == (y.index, y.token_id,
                                                                            [t.token_id for t in y.top])
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        if r.options.logprobs is None:
            assert not lb
        else:
            assert len(lb) == 12
            assert_matches_reference(demo_engine, r, b)
    # at temperature 3 some sampled token is not the most likely one; its logprob is still its own
    assert any(e.top[0].token_id != e.token_id for ev in together[:3] for e in logprobs_of(ev))


def test_a_branch_continues_from_the_chosen_alternative_and_numbers_its_tokens_after_it(demo_engine):
    base = ask(images=[scene()], temperature=0, max_new_tokens=10, logprobs=4, enable_thinking=False)
    original = list(demo_engine.submit(base).events(timeout=120))
    lps = logprobs_of(original)
    j = min(3, len(lps) - 1)
    alt = lps[j].top[1]  # the second most likely token at position j
    forced = [e.token_id for e in lps[:j]] + [alt.token_id]
    branch_req = dataclasses.replace(base, continue_from=forced, options=dataclasses.replace(base.options,
                                                                                             max_new_tokens=6))
    branch = list(demo_engine.submit(branch_req).events(timeout=120))
    assert isinstance(branch[-1], Done), branch[-1]
    blps = logprobs_of(branch)
    assert blps and blps[0].index == j + 1  # numbered after the reply's start
    stats = next(e for e in branch if isinstance(e, Stats))
    assert stats.completion_tokens == len(blps) <= 6  # max_new_tokens counts the new tokens only
    # the branch's text is the whole reply: its start, then the new tokens (one decode of all the ids)
    tok = demo_engine.rt.processor.tokenizer
    assert text_of(branch) == tok.decode(forced + [e.token_id for e in blps], skip_special_tokens=False)
    assert_matches_reference(demo_engine, base, branch, start=j + 1, forced=forced)
    # the original is untouched by the branch (nothing is shared between the two requests)
    again = list(demo_engine.submit(base).events(timeout=120))
    assert [e.token_id for e in logprobs_of(again)] == [e.token_id for e in lps]


@pytest.mark.parametrize("change, says", [
    ({"logprobs": 21}, "top_logprobs"), ({"logprobs": -1}, "top_logprobs"), ({"logprobs": True}, "top_logprobs"),
])
def test_bad_logprobs_options_are_refused(demo_engine, change, says):
    request = ask(**change)
    with pytest.raises(BadRequest, match=says):
        demo_engine.submit(request)


def test_a_bad_reply_start_is_refused_and_the_engine_keeps_serving(demo_engine):
    with pytest.raises(BadRequest, match="continue_from"):
        demo_engine.submit(dataclasses.replace(ask(), continue_from=[-3]))
    events = list(demo_engine.submit(dataclasses.replace(ask(), continue_from=[10 ** 9])).events(timeout=60))
    assert isinstance(events[-1], Error) and "vocabulary" in events[-1].message
    events = list(demo_engine.submit(ask(max_new_tokens=3)).events(timeout=60))
    assert isinstance(events[-1], Done)


@pytest.mark.parametrize("form", ["compiled, one graph", "compiled in layer groups, chosen experts"])
def test_the_compiled_steps_logprobs_equal_the_reference(small, monkeypatch, form):
    """The one-graph form computes the logprobs inside its graph (its telemetry's last columns); the layer-group
    form outside it, as the eager step does: both equal the direct log-softmax, batched with others."""
    from autoglm_app.engine import decoding

    if form != "compiled, one graph":
        monkeypatch.setattr(decoding, "DENSE_EXPERTS_BYTES", 0)
    engine = make_engine(*small, max_batch=3, compile="on")
    try:
        engine.decoder.use(form)
        requests = [ask(images=[scene()], temperature=0, max_new_tokens=8, min_new_tokens=8, logprobs=k,
                        session=f"c{k}") for k in (20, 3)]
        requests.append(ask("Say something.", temperature=0, max_new_tokens=8, session="none"))
        together = run_together(engine, requests)
        for events, r in zip(together, requests):
            assert isinstance(events[-1], Done)
            if r.options.logprobs is None:
                assert not logprobs_of(events)
                continue
            assert all(len(e.top) == r.options.logprobs for e in logprobs_of(events))
            assert_matches_reference(engine, r, events)
            assert text_of(events) == text_of(solo(engine, r))
    finally:
        engine.close()
