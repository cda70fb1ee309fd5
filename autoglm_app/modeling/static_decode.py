"""AutoGLM's decode step over a static KV cache, for a batch of sequences of different lengths.

The model's own ``forward`` stays the reference (training, prefill, ``generate``); this is the
serving path for one new token per sequence, written the way gpt-fast writes it so that
``torch.compile`` can take it whole: fixed-size cache tensors (``StaticKV``), no Python branch on
tensor values, no host sync, and the probes computed in the step itself:

- focus: the new query's attention row is computed explicitly (for one query per sequence that costs
  what the fused kernel costs), so its head mean, gathered at the sequence's image / audio key
  positions, is one more small op per layer;
- routing: the router's top-k experts and renormalised gate weights per MoE layer, as tensors.

The step returns them in preallocated-shape tensors; the engine copies them to the host once per
step. Each row attends only to its own cache slot and its own positions, so a sequence's numbers do
not depend on which other sequences share the batch.

The experts of a row, three ways: ``experts_dispatch`` (eager: each chosen expert once, on the rows that
chose it, after a host read of the choices), ``experts_dense`` (every expert on every row under a gate that
is zero off the row's top-k: no data-dependent shape, so the whole step is one graph; what a small model's
compiled step runs) and ``experts_gathered`` (each row's chosen experts read by index inside a compiled graph:
what ``LayerGroups`` runs for a model whose experts do not fit a CPU's caches). Measured in
docs/PERFORMANCE.md; a GPU with many experts would want grouped NF4 matmuls (not built).

Not covered (the engine then uses the model's own forward per sequence): memory slots
(``memory_slots > 0``), whose state moves with every token.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modeling_autoglm import AutoGLMForConditionalGeneration, AutoGLMMoE, apply_rotary, rotary_cos_sin


def supports_static_decode(model) -> str | None:
    """None when ``model`` can decode through this step, else why not (a sentence for the log)."""
    if not isinstance(model, AutoGLMForConditionalGeneration):
        return f"{type(model).__name__} is not an AutoGLM model"
    if model.config.memory_slots:
        return "its memory slots change with every token"
    return None


class StaticKV:
    """Preallocated keys and values: per decoder layer a (slots, kv heads, capacity, head dim) pair on that
    layer's device, in its dtype. A slot holds one sequence; ``load`` copies a prefill's cache in."""

    def __init__(self, model: AutoGLMForConditionalGeneration, slots: int, capacity: int):
        cfg = model.config
        self.slots, self.capacity = slots, capacity
        self.keys, self.values = [], []
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight  # its device; the dtype is the activations' (a 4-bit weight's is not)
            dtype = model.model.embed_tokens.weight.dtype
            shape = (slots, cfg.num_key_value_heads, capacity, cfg.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=w.device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=w.device))

    @staticmethod
    def bytes_per_token(model: AutoGLMForConditionalGeneration, dtype: torch.dtype) -> int:
        cfg = model.config
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def load(self, slot: int, cache, length: int, row: int = 0) -> None:
        """Copy the last ``length`` positions of row ``row`` of a prefill's DynamicCache into ``slot`` (a batched
        prefill pads on the left, so a row's own positions are its last)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            layer = cache.layers[i]
            k[slot, :, :length] = layer.keys[row, :, -length:].to(k.dtype)
            v[slot, :, :length] = layer.values[row, :, -length:].to(v.dtype)

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot ``src``'s first ``length`` positions into slot ``dst`` (the batch stays packed at the front)."""
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


def fuse_weights(model: AutoGLMForConditionalGeneration) -> list[tuple | None]:
    """Per decoder layer, its projections as a few fused matrices, or None for a layer with 4-bit weights:
    (qkv (Q + 2 KV, C), qkv bias or None, gate_up (E, 2 I, C) or None, down (E, C, I) or None). The modules'
    own parameters are made views of these, so nothing is held twice and the model's forward is unchanged;
    the step then runs 5 matrix products per MoE layer instead of 4 + 3 E (what bounds a small model)."""
    out = []
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            if any(type(p.weight) is not nn.Parameter or p.weight.dtype not in PLAIN for p in projections):
                out.append(None)
                continue
            qkv = _fuse([p.weight for p in projections], 0)
            bias = _fuse([p.bias for p in projections], 0) if attn.q_proj.bias is not None else None
            for p, w, b in zip(projections, _split(qkv, projections), _split(bias, projections) if bias is not None
                               else (None,) * 3):
                p.weight = nn.Parameter(w, requires_grad=False)
                if b is not None:
                    p.bias = nn.Parameter(b, requires_grad=False)
            gate_up = down = None
            if isinstance(layer.mlp, AutoGLMMoE) and all(
                    type(x.weight) is nn.Parameter and x.weight.dtype in PLAIN
                    for e in layer.mlp.experts for x in (e.gate_proj, e.up_proj, e.down_proj)):
                experts = layer.mlp.experts
                gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
                down = torch.stack([e.down_proj.weight for e in experts])
                inner = experts[0].gate_proj.weight.shape[0]
                for i, e in enumerate(experts):
                    e.gate_proj.weight = nn.Parameter(gate_up[i, :inner], requires_grad=False)
                    e.up_proj.weight = nn.Parameter(gate_up[i, inner:], requires_grad=False)
                    e.down_proj.weight = nn.Parameter(down[i], requires_grad=False)
            out.append((qkv, bias, gate_up, down))
    return out


PLAIN = (torch.float32, torch.float16, torch.bfloat16)


def _fuse(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat([t.detach() for t in tensors], dim)


def _split(fused: torch.Tensor, projections) -> list[torch.Tensor]:
    sizes = [p.out_features for p in projections]
    return list(fused.split(sizes, 0))


def _qkv(attn, fw, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if fw is None:
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    qkv = F.linear(h, fw[0], fw[1])
    q_size, kv_size = attn.n_heads * attn.head_dim, attn.n_kv * attn.head_dim
    return qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]


def _expert(moe: AutoGLMMoE, fw, e: int, h: torch.Tensor) -> torch.Tensor:
    if fw is None or fw[2] is None:
        return moe.experts[e](h)
    gate, up = F.linear(h, fw[2][e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, fw[3][e])


def experts_dense(moe: AutoGLMMoE, fw, h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, weighted by the row's gate (zero off its top-k): no data-dependent shapes, so
    the whole step can be one graph (a GPU's CUDA graph); reads every expert's weights. With fused weights
    all experts are two matrix products."""
    gate = torch.zeros(h.shape[0], moe.num_experts, dtype=h.dtype, device=h.device)
    gate = gate.scatter(1, experts, weights.to(h.dtype))
    if fw is not None and fw[2] is not None:
        E, two_inner, C = fw[2].shape
        gu = F.linear(h, fw[2].reshape(E * two_inner, C)).view(-1, E, two_inner)
        g, u = gu.chunk(2, dim=-1)
        y = torch.einsum("nei,eci->nec", F.silu(g) * u, fw[3])  # (n, E, C)
        return (y * gate[:, :, None]).sum(1)
    out = torch.zeros_like(h)
    for e, expert in enumerate(moe.experts):
        out = out + expert(h) * gate[:, e : e + 1]
    return out


def experts_dispatch(moe: AutoGLMMoE, fw, h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each chosen expert once, on the rows that chose it: reads only the chosen experts' weights (what bounds a
    CPU on a model whose experts do not fit its caches), at the price of one host read of the choices per layer
    (free on a CPU, a sync on a GPU): the eager step's experts."""
    chosen = experts.cpu().numpy()
    w = weights.to(h.dtype)
    if h.shape[0] == 1:  # one row: its k experts in turn, no gather
        out = _expert(moe, fw, int(chosen[0, 0]), h) * w[:, :1]
        for j in range(1, chosen.shape[1]):
            out = out + _expert(moe, fw, int(chosen[0, j]), h) * w[:, j : j + 1]
        return out
    out = torch.zeros_like(h)
    for e in np.unique(chosen).tolist():
        row, slot = np.nonzero(chosen == e)
        if len(row) == h.shape[0]:  # every row chose it
            out = out + _expert(moe, fw, e, h) * w[torch.arange(len(row)), torch.from_numpy(slot)][:, None]
            continue
        r = torch.from_numpy(row).to(h.device)
        out.index_add_(0, r, _expert(moe, fw, e, h[r]) * w[r, torch.from_numpy(slot).to(h.device)][:, None])
    return out


def attend_step(layer, fw, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, media: torch.Tensor | None,
                probes: bool):
    """One decoder layer up to its experts, for n rows of one new token each: writes the rows' keys and
    values at ``positions`` of slots 0..n-1 and attends over the first ``allowed.shape[1]`` positions; a
    dense layer also runs its MLP. ``fw``: the layer's fused weights (``fuse_weights``) or None. Returns
    (x, h, focus (n, K) or None, experts (n, k), weights (n, k)): for an MoE layer ``h`` is the normed input
    of the experts (the caller adds their output to x); for a dense layer h, experts and weights are None."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q, k, v = _qkv(attn, fw, h)
    y, focus = _attention(q, k, v, cos, sin, allowed, keys, values, positions, media, probes,
                          attn.n_heads, attn.n_kv, attn.head_dim, attn.scale)
    x = x + attn.o_proj(y.to(x.dtype))
    h = layer.post_attention_layernorm(x)[:, 0]  # (n, C)
    if not isinstance(layer.mlp, AutoGLMMoE):
        return x + layer.mlp(h)[:, None], None, focus, None, None
    router = layer.mlp.router
    experts, weights = _route(router.classifier(h), router.top_k)
    return x, h, focus, experts, weights


def _attention(q, k, v, cos, sin, allowed, keys, values, positions, media, probes: bool, H: int, Hkv: int, D: int,
               scale: float):
    """The rows' new keys and values into their slots, then the new query's attention: (output (n, 1, H * D),
    focus (n, K) or None)."""
    n = q.shape[0]
    q = q.reshape(n, 1, H, D).transpose(1, 2)
    k = k.reshape(n, 1, Hkv, D).transpose(1, 2)
    v = v.reshape(n, 1, Hkv, D).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    rows = torch.arange(n, device=q.device)
    keys[rows, :, positions] = k[:, :, 0].to(keys.dtype)
    values[rows, :, positions] = v[:, :, 0].to(values.dtype)
    S = allowed.shape[1]
    ks, vs = keys[:n, :, :S], values[:n, :, :S]  # (n, Hkv, S, D)
    scores = (q.to(ks.dtype).reshape(n, Hkv, H // Hkv, D) @ ks.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))  # (n, Hkv, G, S)
    attn_probs = scores.softmax(-1)
    y = (attn_probs.to(vs.dtype) @ vs).reshape(n, 1, H * D)  # heads in (Hkv, G) order = the H order
    focus = attn_probs.mean(dim=(1, 2)).gather(1, media) if probes and media is not None else None
    return y, focus


def _route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k and renormalised gate weights (one token per row: its k distinct experts always fit
    under any capacity, nothing is dropped)."""
    weights, experts = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
    return experts, weights / weights.sum(dim=-1, keepdim=True)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """modeling_autoglm.RMSNorm.forward on plain tensors."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def experts_gathered(gate_up: torch.Tensor, down: torch.Tensor, h: torch.Tensor, experts: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """Each row's own top-k experts, read by index inside the graph: gate_up (E, 2 I, C) and down (E, C, I) are
    ``fuse_weights``' stacked matrices, h (n, C), experts / weights (n, k). Written as products summed over the
    last axis (not as a batched matrix product of gathered matrices), so the compiled kernel loads only the chosen
    experts' rows once, with no copy of them, no host read and no data-dependent shape; each row's sums are its
    own, whatever shares the batch. Eager, it would materialise the gathered weights: a compiled form only.
    On the 40-layer scale config (8 experts of 256 x 256, one thread of the 2-core CPU) one layer's experts took
    135-232 us at one row this way against 277-319 us for ``experts_dispatch`` and 573-615 us for
    ``experts_dense``; on the demo model (4 experts) the dense product wins from two rows up."""
    a = (gate_up[experts] * h[:, None, None, :]).sum(-1)  # (n, k, 2 I)
    g, u = a.chunk(2, dim=-1)
    y = (down[experts] * (F.silu(g) * u)[:, :, None, :]).sum(-1)  # (n, k, C)
    return (y * weights.to(h.dtype)[:, :, None]).sum(1)


def attend_core(x, cos, sin, allowed, keys, values, positions, media, probes: bool, ln1, qkv_w, qkv_b, o_w, ln2,
                gate_w, gate_b, gate_up, down, spec: tuple):
    """A whole fused MoE layer on plain tensors (spec: heads, kv heads, head dim, scale, eps, top-k): attention as
    ``attend_step``, then the router and the chosen experts (``experts_gathered``) -> (x, focus, experts,
    weights). No module in its arguments, so one compiled graph serves every layer of its shape (a module argument
    is guarded by identity: one graph per layer), and the experts run inside it (between graphs they cost a host
    read of the choices and eight eager products per layer). ``group_core`` strings several together."""
    H, Hkv, D, scale, eps, top_k = spec
    qkv = F.linear(_rms(x, ln1, eps), qkv_w, qkv_b)
    q_size, kv_size = H * D, Hkv * D
    y, focus = _attention(qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :],
                          cos, sin, allowed, keys, values, positions, media, probes, H, Hkv, D, scale)
    x = x + F.linear(y.to(x.dtype), o_w)
    h = _rms(x, ln2, eps)[:, 0]
    experts, weights = _route(F.linear(h, gate_w, gate_b), top_k)
    return x + experts_gathered(gate_up, down, h, experts, weights)[:, None], focus, experts, weights


def _core_spec(layer, fw) -> tuple | None:
    """A layer's constants for ``attend_core`` (heads, kv heads, head dim, scale, eps, top-k), or None when the
    layer cannot run there (not a fused MoE layer, an output bias, a router with 4-bit weights)."""
    attn, mlp = layer.self_attn, layer.mlp
    if not (fw is not None and fw[2] is not None and isinstance(mlp, AutoGLMMoE) and attn.o_proj.bias is None
            and type(mlp.router.classifier.weight) is nn.Parameter):
        return None
    return (attn.n_heads, attn.n_kv, attn.head_dim, attn.scale, layer.input_layernorm.eps, mlp.router.top_k)


def _core_tensors(layer, fw, kv: StaticKV, i: int) -> tuple:
    """Layer i's cache and weights in ``group_core``'s order (11 a layer)."""
    attn, mlp = layer.self_attn, layer.mlp
    return (kv.keys[i], kv.values[i], layer.input_layernorm.weight, fw[0], fw[1], attn.o_proj.weight,
            layer.post_attention_layernorm.weight, mlp.router.classifier.weight, mlp.router.classifier.bias,
            fw[2], fw[3])


def group_core(spec: tuple, count: int):
    """``count`` consecutive fused MoE layers of one shape as one function (for torch.compile): (x, cos, sin,
    allowed, positions, media, probes, *tensors), 11 tensors a layer (``_core_tensors``) -> (x, focus (n, count, K)
    or None, experts (n, count, k), weights (n, count, k)).

    ``spec`` is bound in a closure: torch.compile takes a closure's values as constants, where arguments would be
    traced as symbols (and every call would then evaluate some 90 symbolic guards on them, a NaN check on each
    float among them: 0.73 ms a layer call with them against 0.54 ms without, on the 40-layer scale config).
    Several layers to a graph because each compiled call costs about 0.25 ms of dynamo, AOT and C++-wrapper work
    on the CPU whatever its size; all the layers in one graph would not be worth its compile (the 40 unrolled
    layers of the scale config took over 6 minutes for the first of their shapes)."""
    def group(x, cos, sin, allowed, positions, media, probes: bool, *tensors):
        focus, experts, weights = [], [], []
        for j in range(count):
            t = tensors[11 * j : 11 * j + 11]
            x, f, e, w = attend_core(x, cos, sin, allowed, t[0], t[1], positions, media, probes, *t[2:], spec)
            focus.append(f)
            experts.append(e)
            weights.append(w)
        f = torch.stack(focus, 1) if focus[0] is not None else None
        return x, f, torch.stack(experts, 1), torch.stack(weights, 1)

    return group


def mark_dynamic_once(seen: set, key, *sizes: tuple[torch.Tensor | None, int]) -> None:
    """Mark each (tensor, dim) of ``sizes`` dynamic for torch.compile, the first time ``key`` is seen only: a marked
    tensor is guarded on carrying the mark, so marking every call's inputs would make every call recompile."""
    if key in seen:
        return
    seen.add(key)
    for tensor, dim in sizes:
        if tensor is not None:
            torch._dynamo.mark_dynamic(tensor, dim)


class LayerGroups:
    """The decoder's layers as spans for ``decode_step``: runs of up to ``size`` consecutive fused MoE layers of one
    shape on one device, each one call of ``compile_fn(group_core(...))`` (one compiled function per shape and run
    length), and any other layer alone through ``attend_step``. Runs are split evenly (11 layers at size 4: 4, 4,
    3), so a model of one layer shape compiles at most two functions."""

    def __init__(self, model: AutoGLMForConditionalGeneration, fused: list, kv: StaticKV, compile_fn, size: int):
        layers = model.model.layers
        specs = [_core_spec(layer, fw) for layer, fw in zip(layers, fused)]
        self.spans: list[tuple[int, int, object, tuple]] = []  # (start, stop, compiled fn or None, tensors)
        cores: dict[tuple, object] = {}
        self._marked: set[int] = set()
        i = 0
        while i < len(layers):
            if specs[i] is None:
                self.spans.append((i, i + 1, None, ()))
                i += 1
                continue
            j = i + 1
            while j < len(layers) and specs[j] == specs[i] and kv.keys[j].device == kv.keys[i].device:
                j += 1
            parts = -(-(j - i) // size)
            bounds = [i + (j - i) * p // parts for p in range(parts + 1)]
            for start, stop in zip(bounds, bounds[1:]):
                key = (specs[i], stop - start)
                if key not in cores:
                    cores[key] = compile_fn(group_core(*key))
                tensors = tuple(t for k in range(start, stop) for t in _core_tensors(layers[k], fused[k], kv, k))
                self.spans.append((start, stop, cores[key], tensors))
            i = j

    def run(self, fn, tensors: tuple, x, cos, sin, allowed, positions, media, probes):
        """One span's compiled call. At each function's first call its cache length and media keys are marked
        dynamic, so torch.compile does not first make a graph for those exact sizes (it marks a size dynamic only
        once it has seen it change: one compile of the span's layers fewer at warm-up)."""
        mark_dynamic_once(self._marked, id(fn), (allowed, 1), (media, 1))
        return fn(x, cos, sin, allowed, positions, media, probes, *tensors)


def head_step(model: AutoGLMForConditionalGeneration, x: torch.Tensor) -> torch.Tensor:
    """Final norm and output head -> (n, V) float32 logits."""
    x = model.model.norm(x)
    return model.lm_head(x[:, 0].to(model.lm_head.weight.device)).float()


def decode_step(model: AutoGLMForConditionalGeneration, fused: list, kv: StaticKV, tokens: torch.Tensor,
                positions: torch.Tensor, keys_seen: int, media: torch.Tensor | None, probes: bool,
                head_fn=head_step, experts_fn=experts_dispatch, logprob_k: int = 0,
                greedy: tuple[torch.Tensor, torch.Tensor] | None = None, groups: LayerGroups | None = None):
    """One new token for each of the first ``n = len(tokens)`` slots.

    tokens, positions: (n,) long; row i's token goes to position ``positions[i]`` of slot i and attends
    to the slot's positions ``0 .. positions[i]``. ``keys_seen`` (>= max(positions) + 1) is how much of
    the capacity the step reads. media: (n, K) long key positions of each row's images / audio (padding
    repeats a valid index) or None. ``fused``: ``fuse_weights(model)``. ``groups``: a ``LayerGroups``
    whose compiled runs of layers take their spans (experts included); every other layer goes through
    ``attend_step`` and then ``experts_fn`` (``experts_dispatch`` or ``experts_dense``). ``head_fn``: a compiled
    form of ``head_step`` (the plain function by default).

    Returns (logits (n, V) float32, telemetry (n, layers * K + 2 * moe layers * k) float32 or None): per row,
    the focus rows (layers, K) when ``media`` is given, then the routed experts and their gate weights
    (moe layers, k) each (``split_telemetry`` takes them apart); with ``logprob_k``, last, each row's
    ``logprob_pack`` (the compiled step computes it inside its graph, where it costs next to nothing); with
    ``greedy`` (banned ids, stop ids), after that, each row's ``greedy_pack``.
    """
    backbone = model.model
    x = backbone.embed_tokens(tokens)[:, None]  # (n, 1, C)
    cos, sin = rotary_cos_sin(positions[:, None], backbone.rotary_dim, model.config.rope_theta, x.dtype)
    allowed = torch.arange(keys_seen, device=tokens.device)[None] <= positions[:, None]  # (n, S)
    on_device: dict = {}  # the step's small inputs, moved once per device
    focus, routed, gates = [], [], []  # each (n, layers of a span, ...)
    spans = groups.spans if groups is not None else [(i, i + 1, None, ()) for i in range(len(backbone.layers))]
    for start, _, fn, tensors in spans:
        dev = kv.keys[start].device
        if dev not in on_device:
            on_device[dev] = tuple(t.to(dev) if t is not None else None for t in (cos, sin, allowed, positions, media))
        c, s, a, p, m = on_device[dev]
        if fn is not None:  # a compiled run of layers, experts included
            x, f, e, w = groups.run(fn, tensors, x.to(dev), c, s, a, p, m, probes)
        else:
            layer, fw = backbone.layers[start], fused[start]
            x, h, f, e, w = attend_step(layer, fw, x.to(dev), c, s, a, kv.keys[start], kv.values[start], p, m, probes)
            if h is not None:  # an MoE layer's experts
                x = x + experts_fn(layer.mlp, fw, h, e, w)[:, None]
            f, e, w = (None if t is None else t[:, None] for t in (f, e, w))
        if e is not None and probes:
            routed.append(e)
            gates.append(w)
        if f is not None:
            focus.append(f)
    logits = head_fn(model, x)
    out = logits.device
    parts = [torch.cat([f.to(out).float() for f in focus], 1)] if focus else []
    if routed:
        parts += [torch.cat([e.to(out) for e in routed], 1).float(), torch.cat([w.to(out) for w in gates], 1)]
    if logprob_k:
        parts.append(logprob_pack(logits, min(logprob_k, logits.shape[-1])))
    if greedy is not None:
        parts.append(greedy_pack(logits, *greedy))
    # all the step's telemetry in one tensor: one device-to-host copy (expert ids are exact in float32)
    telemetry = torch.cat([p.flatten(1) for p in parts], 1) if parts else None
    return logits, telemetry


def decode_step_span(model: AutoGLMForConditionalGeneration, fused: list, kv: StaticKV, tokens: torch.Tensor,
                     positions: torch.Tensor, span: torch.Tensor, media: torch.Tensor | None, probes: bool, **kwargs):
    """``decode_step`` with ``keys_seen`` given as ``len(span)`` (any 1-D tensor of that many elements): for
    torch.compile, which can be told before its first call that a tensor's size is dynamic, not an int's."""
    return decode_step(model, fused, kv, tokens, positions, span.shape[0], media, probes, **kwargs)


def logprob_pack(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(n, V) logits -> (n, 2 + 2k) float32: the log-normaliser, the entropy (nats) of the softmax, the k largest
    log-probabilities and their token ids (exact in float32 below 2**24, far above any vocabulary)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    lp = x - lse
    entropy = -(lp.exp() * lp).nan_to_num(0.0).sum(-1, keepdim=True)  # exp(-inf) * -inf = nan: those terms are 0
    top = lp.topk(k, dim=-1)
    return torch.cat([lse, entropy, top.values, top.indices.float()], dim=-1)


def greedy_pack(logits: torch.Tensor, banned: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """(n, V) logits -> (n, 4) float32: each row's argmax with the banned ids masked, and with the stop ids masked
    too (a request before its ``min_new_tokens``), as token ids (exact in float32), then the raw logits of those two
    tokens (a logprobs record's value): what ``Sampler.pick`` picks at temperature 0, so a greedy row needs no op
    of its own on the host."""
    x = logits.float()
    masked = x.index_fill(-1, banned, float("-inf"))
    held = masked.index_fill(-1, stop, float("-inf"))
    picks = torch.stack([masked.argmax(-1), held.argmax(-1)], dim=-1)
    return torch.cat([picks.float(), x.gather(1, picks)], dim=-1)


def split_telemetry(telemetry: np.ndarray, layers: int, width: int, moe_layers: int, top_k: int):
    """A step's telemetry on the host (n, ...) -> (focus (n, layers, width) or None, experts (n, moe layers, k)
    int64 or None, weights (n, moe layers, k) or None), as views."""
    at, focus = 0, None
    n = telemetry.shape[0]
    if width:
        focus = telemetry[:, : layers * width].reshape(n, layers, width)
        at = layers * width
    if not moe_layers or telemetry.shape[1] == at:
        return focus, None, None
    size = moe_layers * top_k
    experts = telemetry[:, at : at + size].reshape(n, moe_layers, top_k).astype(np.int64)
    weights = telemetry[:, at + size : at + 2 * size].reshape(n, moe_layers, top_k)
    return focus, experts, weights
