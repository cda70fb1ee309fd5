"""One batched decode step for the transformers families, through their own decoder layers.

Every request in flight feeds one token, and the text model runs once for all of them: a ``SlotCache`` holds
preallocated keys and values (per layer: slots, kv heads, capacity, head dim) and stands in for transformers'
cache (the layers only call ``update(keys, values, layer_idx)``); each row writes its new key and value at its own
position and reads its own slot. The step passes what a shared cache position cannot say per row: the M-RoPE
positions (each row's length plus its prompt's ``rope_deltas``, the same three sections for a text token, as the
models' own decode computes them) and a 4-D additive mask (a row sees its own keys only), which the models'
``create_causal_mask`` hands through as it is.

Telemetry inside the step, for the rows that asked:

- focus: ``BatchFocus`` sits in the attention modules' ``focus_probe`` slot that ``probe_attention`` calls, and per
  layer turns the newest query of every row and its keys into the head-mean attention on that row's media keys
  (float32, the arithmetic of ``engine.probes.FocusProbe``), kept on the device until the step ends;
- routing: one forward hook per router for the step reads the family's ``(logits, weights, indices)``.

Why our own cache class rather than transformers' ``StaticCache``: that one writes every row at one shared
``cache_position``, and continuous batching needs each row at its own length.
"""

from __future__ import annotations

import contextlib

import torch

from .hf import HFFamily, _get


def batch_support(model, family) -> str | None:
    """None when ``model`` can decode through ``hf_step``, else why not (a sentence for the log)."""
    if not isinstance(family, HFFamily):
        return f"{type(model).__name__} is not a transformers family"
    text = text_model(model, family)
    if text is None:
        return f"no text model at {family.layers_path}"
    if "sliding_attention" in (getattr(text.config, "layer_types", None) or ()):
        return "it has sliding-window layers (one mask for all layers here)"
    impl = str(text.config._attn_implementation or "sdpa").removeprefix("probe_")
    if impl not in ("sdpa", "eager"):
        return f"its attention is {impl} (the step's per-row mask needs sdpa or eager)"
    return None


def text_model(model, family: HFFamily):
    """The decoder stack whose ``layers`` sit at the family's ``layers_path``."""
    return _get(model, family.layers_path.rsplit(".", 1)[0])


def rope_delta(model, family: HFFamily) -> int:
    """The M-RoPE offset of the prompt just prefilled (``rope_deltas``, which the prefill computed; 0 for a text
    prompt, whose positions are plain)."""
    owner = _get(model, family.rope_owner) if family.rope_owner else None
    delta = getattr(owner, "rope_deltas", None)
    return 0 if delta is None else int(delta.reshape(-1)[0])


class SlotCache:
    """Keys and values for ``slots`` sequences of up to ``capacity`` positions, per decoder layer on that layer's
    device; what transformers' attention layers see of a cache during ``hf_step``."""

    is_compileable = False

    def __init__(self, model, family: HFFamily, slots: int, capacity: int):
        text = text_model(model, family)
        cfg = text.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = model.get_input_embeddings().weight.dtype  # the activations' (a 4-bit weight's is not)
        self.slots, self.capacity = slots, capacity
        self.keys, self.values = [], []
        for layer in text.layers:
            device = next(layer.parameters()).device
            shape = (slots, heads, capacity, head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
        self._rows = self._pos = None
        self._seen = 0

    def load(self, slot: int, cache, length: int) -> None:
        """A prefill's DynamicCache (one sequence of ``length`` positions) into ``slot``."""
        if length > self.capacity:
            raise ValueError(f"{length} positions do not fit a slot of {self.capacity}")
        for i, layer in enumerate(cache.layers):
            self.keys[i][slot, :, :length].copy_(layer.keys[0, :, :length])
            self.values[i][slot, :, :length].copy_(layer.values[0, :, :length])

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])

    # ------------------------------------------------------------------ what the attention layers call
    def start(self, positions: torch.Tensor, keys_seen: int) -> None:
        """Rows 0..n-1 write at ``positions`` (n,) and read ``keys_seen`` positions in this step."""
        self._pos, self._seen = positions, keys_seen
        self._rows = torch.arange(positions.shape[0], device=positions.device)

    # what ``create_causal_mask`` asks when the step passes no mask (one row that sees all its keys): the query sits
    # after the row's keys, so the mask is plain causal, which sdpa then skips
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seen - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen, 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        rows, pos = self._rows.to(k.device), self._pos.to(k.device)
        k[rows, :, pos] = key_states[:, :, -1].to(k.dtype)
        v[rows, :, pos] = value_states[:, :, -1].to(v.dtype)
        n = rows.shape[0]
        return k[:n, :, : self._seen], v[:n, :, : self._seen]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen


class BatchFocus:
    """The focus rows of one batched step: per layer, every row's head-mean attention on its media keys.

    Inside the layers it keeps references only (each layer's newest queries, its keys, the mask); ``take`` does the
    arithmetic for all the layers on a device at once after the forward, one batched computation per step instead
    of one per layer (measured on the 40-layer GLM-4.1V scale config: per layer, the probes cost 15% of a lone
    request's decode rate)."""

    def __init__(self, media: torch.Tensor):
        self.media = media  # (n, M) cache positions of each row's image / audio keys (padded)
        self.rows: list[tuple] = []

    def __call__(self, layer: int, q, k, mask, probs, n_mem: int) -> None:
        if probs is not None:  # eager attention computed the rows already
            self.rows.append(("probs", probs[:, :, -1, :]))
        else:
            self.rows.append(("qk", q[:, :, -1, :], k, None if mask is None else mask[:, 0, -1]))

    def take(self) -> torch.Tensor:
        """(n, layers, M) on the first layer's device."""
        groups: dict[tuple, list[int]] = {}  # layers alike in kind, device and shapes are computed together
        for i, r in enumerate(self.rows):
            # (head counts only: every layer reads the same keys, and under torch.compile a symbolic size in a key
            # would be specialised, one graph per cache length)
            key = (r[0], r[1].device, r[1].shape[-2]) + ((r[2].shape[1], r[3] is None) if r[0] == "qk" else ())
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(self.rows)
        for key, ids in groups.items():
            recs = [self.rows[i] for i in ids]
            if key[0] == "probs":
                row = torch.stack([r[1] for r in recs]).float()  # (L, n, H, S)
            else:
                q = torch.stack([r[1] for r in recs]).float()  # (L, n, H, D)
                k = torch.stack([r[2] for r in recs]).float()  # (L, n, Hkv, S, D)
                L, n, H, D = q.shape
                hkv, S = k.shape[2], k.shape[3]
                scores = torch.matmul(q.view(L, n, hkv, H // hkv, D), k.transpose(-1, -2)) * D**-0.5
                if recs[0][3] is not None:
                    allowed = torch.stack([r[3] for r in recs]).to(scores.device)  # (L, n, S)
                    scores = scores.masked_fill(~allowed[:, :, None, None, :], float("-inf"))
                row = scores.softmax(-1).view(L, n, H, S)
            picked = row.mean(2).gather(2, self.media.to(row.device)[None].expand(len(ids), -1, -1))  # (L, n, M)
            for j, i in enumerate(ids):
                out[i] = picked[j]
        dev = out[0].device
        return torch.stack([o.to(dev) for o in out], 1)


class BatchRoutes:
    """The routers' choices of one batched step: (MoE layers, n, k) experts and gate weights.

    As a context (``with routes:``) its hooks sit on the routers for one eager step. ``attach()`` leaves them on
    for good, for a compiled step: torch.compile traces the hooks a module has when the graph is made (it does not
    guard on them, so hooks added or removed later are not seen by that graph); the model's own forwards (a
    prefill) then feed it too, so ``clear()`` comes before each step."""

    def __init__(self, routers: list, read_route):
        self.routers, self.read = routers, read_route
        self.experts: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self._hooks: list = []

    def _hook(self, module, args, output) -> None:
        experts, weights, _ = self.read(module, args, output)
        self.experts.append(experts)
        self.weights.append(weights.float())

    def attach(self) -> "BatchRoutes":
        if not self._hooks:
            self._hooks = [r.register_forward_hook(self._hook) for _, r in self.routers]
        return self

    def __enter__(self) -> "BatchRoutes":
        return self.attach()

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def clear(self) -> None:
        self.experts.clear()
        self.weights.clear()

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.experts[0].device
        return (torch.stack([e.to(dev) for e in self.experts]), torch.stack([w.to(dev) for w in self.weights]))


def hf_step(model, family: HFFamily, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor,
            rope_positions: torch.Tensor, keys_seen: int, attention_modules: list, focus: BatchFocus | None,
            routes: BatchRoutes | None, plain_causal: bool = False) -> torch.Tensor:
    """One token for each of n rows: ``tokens``, ``positions`` (where each row's key goes: its length) and
    ``rope_positions`` (its M-RoPE position), all (n,) -> (n, vocab) logits of the next position. ``focus`` and
    ``routes`` collect the telemetry while the layers run. ``plain_causal``: one row whose key goes at
    ``keys_seen - 1`` (no mask of our own is needed)."""
    text = text_model(model, family)
    n = tokens.shape[0]
    cache.start(positions, keys_seen)
    embeds = model.get_input_embeddings()(tokens[:, None])
    mask = None  # one row that sees every key read: the model's own causal mask (none, for sdpa: its fast path)
    if not plain_causal:
        allowed = torch.arange(keys_seen, device=tokens.device)[None, :] <= positions[:, None]  # (n, keys)
        mask = torch.zeros(n, 1, 1, keys_seen, dtype=embeds.dtype, device=tokens.device)
        mask.masked_fill_(~allowed[:, None, None, :], torch.finfo(embeds.dtype).min)
    position_ids = rope_positions.view(1, n, 1).expand(3, n, 1)
    for m in attention_modules:
        m.focus_probe = focus
    try:
        with routes if routes is not None else contextlib.nullcontext():
            hidden = text(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True).last_hidden_state
    finally:
        for m in attention_modules:
            m.focus_probe = None
    head = model.get_output_embeddings()
    return head(hidden[:, -1].to(head.weight.device))


def hf_step_telemetry(model, family: HFFamily, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor,
                      rope_positions: torch.Tensor, keys_seen: int, attention_modules: list, media: torch.Tensor,
                      routes: BatchRoutes | None):
    """``hf_step`` with every row's focus rows on ``media`` (n, M) and, when ``routes`` is attached, its routes, as
    tensors: (logits (n, vocab), focus (n, layers, M), experts (MoE layers, n, k) or None, weights or None). The
    form torch.compile takes: the telemetry's arithmetic inside the same graph as the layers."""
    focus = BatchFocus(media)
    logits = hf_step(model, family, cache, tokens, positions, rope_positions, keys_seen, attention_modules, focus,
                     None)
    experts = weights = None
    if routes is not None and routes.experts:
        experts, weights = routes.take()
    return logits, focus.take(), experts, weights
