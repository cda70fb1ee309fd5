"""What every batched decoder shares (``decoding.StaticDecoder``, ``hf_decoding.HFBatchDecoder``): the slot
arithmetic, each row's media keys, and handing each row's token and telemetry to its request."""

from __future__ import annotations

import time

import torch

from .generation import Generation
from .sampling import pick_greedy

DEFAULT_MAX_BATCH = 8  # the most slots chosen automatically
KEYS_BUCKET = 128  # the step reads the cache in multiples of this many positions (fewer shapes to compile)


def choose_max_batch(slot_bytes: int, device: torch.device, requested: int) -> int:
    """``requested`` when given (> 0); else up to DEFAULT_MAX_BATCH slots in a quarter of the memory the device
    has free (a GPU: what the allocator reports free after the load; the CPU: what the OS reports available),
    never fewer than 1."""
    if requested > 0:
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(1, min(DEFAULT_MAX_BATCH, int(free * 0.25 // max(slot_bytes, 1))))


def kv_bytes_per_token(model) -> int:
    """Keys and values of one position in every layer (from the text config), in the activations' dtype."""
    cfg = getattr(model.config, "text_config", None) or model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = model.get_input_embeddings().weight.dtype
    return 2 * cfg.num_hidden_layers * heads * head_dim * dtype.itemsize


def accept_rows(gens: list[Generation], logits: torch.Tensor, stats: list, picks: dict[int, int], focus_h, widths,
                experts_h, weights_h) -> list:
    """Each row's token (its greedy pick, else its sampler's) handed to its request with that row's telemetry:
    ``focus_h`` (n, layers, M) cut to the row's own ``widths[i]`` keys, ``experts_h`` / ``weights_h`` (n, MoE layers,
    k). The finish reasons (None: goes on), or the exception a row raised."""
    now = time.perf_counter()
    out = []
    for i, g in enumerate(gens):
        g.cache_tokens += 1
        try:
            token = picks[i] if i in picks else g.sampler.pick(logits[i], stats[i])
            f = focus_h[i, :, : widths[i]] if focus_h is not None and g.focus is not None and widths[i] else None
            r = (experts_h[i], weights_h[i]) if experts_h is not None and g.routing is not None else None
            out.append(g.accept(token, now, f, r))
        except Exception as e:  # a failure stays with its request
            out.append(e)
    return out


class MediaRows:
    """(n, K) the cache positions of each row's image / audio keys, padded by repeating a valid one (None when no
    row asks for focus), and each row's own K; kept while the batch is the same requests."""

    def __init__(self, device: torch.device):
        self.device = device
        self._key, self._value = None, (None, [])

    def __call__(self, gens: list[Generation]) -> tuple[torch.Tensor | None, list[int]]:
        key = list(gens)  # the objects themselves, held: an id can be reused by a later request
        if self._key is not None and len(key) == len(self._key) and all(a is b for a, b in zip(key, self._key)):
            return self._value
        rows = [g.media_keys for g in gens]
        widths = [0 if m is None else m.numel() for m in rows]
        media = None
        if max(widths):
            media = torch.zeros(len(gens), max(2, max(widths)), dtype=torch.long)  # (2: see StaticDecoder._media)
            for i, m in enumerate(rows):
                if widths[i]:
                    media[i, : widths[i]] = m
                    media[i, widths[i]:] = m[0]
            media = media.to(self.device)
        self._key, self._value = key, (media, widths)
        return self._value


def greedy_picks(gens: list[Generation], logits: torch.Tensor, greedy_h, stats: list) -> dict[int, int]:
    """Row -> token for the greedy rows: the graph's own picks (``greedy_pack``'s columns, ``greedy_h``) when the
    step made them, else all of them in one argmax (``pick_greedy``) when there are several; the other rows
    are picked one by one by their samplers."""
    greedy = [i for i, g in enumerate(gens) if g.sampler.greedy]
    if greedy_h is not None:
        picks = {}
        for i in greedy:
            s = gens[i].sampler
            token, raw = greedy_h[i, int(s.holds_stop)::2].tolist()  # (the pick, its raw logit)
            picks[i] = s.took(int(token), raw, stats[i])
        return picks
    if len(greedy) > 1:
        return dict(zip(greedy, pick_greedy(logits, greedy, [gens[i].sampler for i in greedy], stats)))
    return {}
