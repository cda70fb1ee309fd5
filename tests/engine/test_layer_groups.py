"""``LayerGroups``: the decoder's layers as compiled runs for ``decode_step``. Its bookkeeping (which layers a run
takes, in what order its focus rows and routes come back) is checked here without a compiler: the runs' functions
go in uncompiled, and the step must give the eager step's logits, focus rows and routes; the compiled form is
checked against the model's own forward in test_batching.py."""

from __future__ import annotations

import pytest
import torch

from autoglm_app.modeling import static_decode as sd
from autoglm_app.modeling.small import build_small


@pytest.fixture(scope="module")
def mixed():
    """Seven layers: MoE, MoE, dense, MoE, MoE, MoE, MoE (runs of 2 and 4 around a dense layer)."""
    model, _ = build_small(seed=3, num_hidden_layers=7, moe_layers=[0, 1, 3, 4, 5, 6])
    return model, sd.fuse_weights(model)


def fill(kv: sd.StaticKV, rows: int, length: int) -> None:
    g = torch.Generator().manual_seed(1)
    for k, v in zip(kv.keys, kv.values):
        k[:rows, :, :length] = torch.randn(k[:rows, :, :length].shape, generator=g)
        v[:rows, :, :length] = torch.randn(v[:rows, :, :length].shape, generator=g)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_layer_groups_give_the_eager_steps_logits_focus_and_routes(mixed, size):
    model, fused = mixed
    calls = []

    def no_compile(fn):
        calls.append(fn)
        return fn

    kv_eager, kv_grouped = sd.StaticKV(model, 3, 64), sd.StaticKV(model, 3, 64)
    groups = sd.LayerGroups(model, fused, kv_grouped, no_compile, size)
    starts = [(a, b) for a, b, fn, _ in groups.spans if fn is not None]
    # runs split evenly, never across the dense layer 2
    expect = {1: [(0, 1), (1, 2), (3, 4), (4, 5), (5, 6), (6, 7)], 2: [(0, 2), (3, 5), (5, 7)],
              3: [(0, 2), (3, 5), (5, 7)], 4: [(0, 2), (3, 7)]}[size]
    assert starts == expect
    assert [(a, b) for a, b, fn, _ in groups.spans if fn is None] == [(2, 3)]
    assert len(calls) == len({b - a for a, b in expect})  # one function per run length
    tokens = torch.tensor([5, 9, 13])
    positions = torch.tensor([20, 7, 31])
    media = torch.tensor([[1, 2, 3, 4], [0, 1, 1, 1], [2, 4, 6, 8]])
    with torch.inference_mode():
        for kv in (kv_eager, kv_grouped):
            fill(kv, 3, 40)
        want = sd.decode_step(model, fused, kv_eager, tokens, positions, 40, media, True)
        got = sd.decode_step(model, fused, kv_grouped, tokens, positions, 40, media, True, groups=groups)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    focus_w, experts_w, weights_w = sd.split_telemetry(want[1].numpy(), 7, 4, 6, 2)
    focus_g, experts_g, weights_g = sd.split_telemetry(got[1].numpy(), 7, 4, 6, 2)
    assert (experts_g == experts_w).all()
    torch.testing.assert_close(torch.from_numpy(weights_g), torch.from_numpy(weights_w), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(focus_g), torch.from_numpy(focus_w), atol=1e-6, rtol=1e-5)
    for a, b in zip(kv_eager.keys + kv_eager.values, kv_grouped.keys + kv_grouped.values):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # each row's new key and value written in its slot
