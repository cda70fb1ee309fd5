"""Compare two models on one turn: the answers, and their next-token distributions, focus and routing
measured teacher-forced on the first model's tokens.

Model A answered the turn with tokens t_0 .. t_{n-1} (``generated_ids``: the ``Logprobs`` records carry the
ids). ``teacher_forced`` runs a model's forward over A's prompt and those tokens, on that model's worker
(``Engine.call``: the probes plug into the modules, so nothing else may run a forward meanwhile): the prefill of
the prompt gives the distribution of t_0, one forward of t_0 .. t_{n-2} over the cache gives the others. Both
sides are teacher-forced (A too), so the two distributions at position i come from the same kind of forward
over the same ids, and the comparison measures the models, not incremental against full forwards. The probes
are the engine's own: a ``RoutingProbe`` kept in its prefill phase records every position's top-k experts
(``prompt_experts``), and ``FocusRows`` (a ``FocusProbe`` that keeps every query's row instead of the newest)
gives each token's focus, the attention of the position that predicted it, as generation reports it.

``compare_turn`` turns the two answers and the two passes into plain data (JSON-ready): identical or not and the
first token where the answers part; per token, argmax agreement and KL(A || B) of the next-token distributions,
1 - cosine of the focus maps and the distance between their peaks (grid cells: patches for an image, frames for
a recording), the Jaccard index of the expert sets per MoE layer; per word (groups of token indices the caller
gives: the page's words) the same for the word's mean map; and a summary row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from ..events import Answer, Error, Event, Focus, Logprobs, Message, Options, Reasoning
from .generation import fit_context, prompt_tokens
from .probes import FocusProbe, RoutingProbe
from .runtime import Runtime

# ----------------------------------------------------------------------------- one side's answer


@dataclass
class Side:
    """One model's answer to the turn, from its event stream."""

    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # each token's own text, in order
    phases: list[str] = field(default_factory=list)  # each token's phase ("reasoning" / "answer")
    reasoning: str = ""
    answer: str = ""
    error: str | None = None

    @classmethod
    def of(cls, events: list[Event]) -> "Side":
        side = cls()
        records: dict[int, Logprobs] = {}
        for e in events:
            if isinstance(e, Logprobs):
                records[e.index] = e
            elif isinstance(e, Reasoning):
                side.reasoning += e.text
            elif isinstance(e, Answer):
                side.answer += e.text
            elif isinstance(e, Error):
                side.error = e.message
        ordered = [records[i] for i in sorted(records)]
        side.token_ids = [r.token_id for r in ordered]
        side.tokens = [r.token for r in ordered]
        side.phases = [r.phase for r in ordered]
        return side


def with_token_ids(options: Options) -> Options:
    """The turn's options, asking for the Logprobs records that carry each generated token's id (alternatives
    as the caller asked, none otherwise)."""
    from dataclasses import replace

    return options if options.logprobs is not None else replace(options, logprobs=0)


# ----------------------------------------------------------------------------- focus of every query


class FocusRows(FocusProbe):
    """A FocusProbe that keeps, for a forward of T tokens, the attention row of every query (not only the
    newest) on the media keys: ``take_rows()`` -> (T, layers, K). Computed layer by layer as the forward goes
    (T rows x all keys would be the whole attention matrix at once), in float32 like FocusProbe."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.picked: dict[int, torch.Tensor] = {}  # layer -> (T, K)
        # the prompt's forward needs only its newest query's row (it predicts the first token); all of them
        # would be the prompt's whole attention matrix
        self.last_only = False

    def __call__(self, layer: int, q, k, mask, probs, n_mem: int) -> None:
        if self.positions.numel() == 0:
            return
        if self.last_only:
            q = q[:, :, -1:]
            mask = mask[:, :, -1:] if mask is not None else None
            probs = probs[:, :, -1:] if probs is not None else None
        keys = self._key_index(q.device if probs is None else probs.device, n_mem)
        if probs is not None:  # eager attention: the rows are there
            rows = probs[0].float()  # (H, T, S)
        else:
            q0, k0 = q[0].float(), k[0].float()  # (H, T, D), (Hkv, S, D)
            H, T, D = q0.shape
            hkv, S = k0.shape[0], k0.shape[1]
            scores = (q0.view(hkv, H // hkv, T, D) @ k0.transpose(1, 2)[:, None]).view(H, T, S) * D**-0.5
            if mask is not None:
                allowed = mask[0, 0, -T:].to(scores.device)
            else:  # plain causal: query t sees every key up to its own position (memory slots first)
                allowed = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(diagonal=S - T)
            rows = scores.masked_fill(~allowed[None], float("-inf")).softmax(-1)
        self.picked[layer] = rows.mean(0).index_select(1, keys).cpu()  # (T, K)

    def take_rows(self) -> np.ndarray:
        layers = sorted(self.picked)
        out = torch.stack([self.picked[i] for i in layers], dim=1).numpy() if layers else np.zeros((0, 0, 0))
        self.picked.clear()
        return out


# ----------------------------------------------------------------------------- the teacher-forced pass


@dataclass
class Forced:
    """One model's teacher-forced pass over a prompt and n given tokens: row i is the distribution, focus and
    route of the position that predicts token i."""

    logprobs: np.ndarray  # (n, V) float32: log-softmax of the raw logits
    images: list[np.ndarray]  # per context image: (n, rows, cols), the model's own layer aggregation
    audios: list[np.ndarray]  # per recording: (n, frames)
    routes: np.ndarray | None  # (n, MoE layers, k) expert ids; None for a dense model
    prompt_tokens: int


@torch.inference_mode()
def teacher_forced(rt: Runtime, messages: list[Message], options: Options, tokens: list[int]) -> Forced:
    """Prefill the prompt the engine would (same context fitting), then feed ``tokens[:-1]`` in one forward over
    the cache. Run it where nothing else uses the model (``Engine.call``). The recurrent memory of a model with
    memory slots starts empty, as a first turn's does, and the continuation reads it as the prompt left it
    (generation updates it every step): both sides alike, so the comparison stays fair."""
    if not tokens:
        raise ValueError("no tokens to teacher-force: the first model's answer was empty")
    prep, _ = fit_context(rt.family, rt.processor, messages, options, rt.context_limit)
    inputs = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in prep.inputs.items()}
    n_prompt = prompt_tokens(prep)
    focus_on = bool(prep.image_spans or prep.audio_spans)
    rows = FocusRows(rt.attention_modules, prep.image_spans, prep.audio_spans) if focus_on else None
    # kept in its prefill phase throughout: it then records every position's experts (prompt_experts)
    routing = RoutingProbe(rt.routers, rt.num_experts, rt.top_k, rt.family.read_route) if rt.routers else None
    probes = [p for p in (rows, routing) if p is not None]
    cache = DynamicCache()
    memory = None
    if rows is not None:
        rows.last_only = True
    rt.family.begin(rt.model)
    for p in probes:
        p.__enter__()
    try:
        out = rt.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1,
                       **rt.family.forward_kwargs(memory))
        logits = [out.logits[0, -1:].float()]
        focus = [rows.take_rows()[-1:]] if rows is not None else []  # the prompt's newest query predicts t_0
        if routing is not None:
            routing.collect()
        if rows is not None:
            rows.last_only = False
        if len(tokens) > 1:
            # as the engine's decode step feeds a token (generation.decode_step: ids and the cache, no mask), only
            # several at once
            rest = torch.tensor([tokens[:-1]], device=rt.device)
            out = rt.model(input_ids=rest, past_key_values=cache, use_cache=True, logits_to_keep=rest.shape[1],
                           **rt.family.forward_kwargs(getattr(out, "memory_state", None)))
            logits.append(out.logits[0].float())
            if rows is not None:
                focus.append(rows.take_rows())
            if routing is not None:
                routing.collect()
    finally:
        for p in probes:
            p.__exit__(None, None, None)
    logprobs = torch.log_softmax(torch.cat(logits), dim=-1).cpu().numpy()
    images, audios = [], []
    if focus:
        per_token = np.concatenate(focus)  # (n, layers, K)
        rule = rt.focus_rule(options)
        cut = [Focus(0, "", "answer", rows=t, spans=rows.shapes, rule=rule) for t in per_token]  # cut as a token's is
        images = [np.stack([c.images[j] for c in cut]) for j in range(len(prep.image_spans))]
        audios = [np.stack([c.audios[j] for c in cut]) for j in range(len(prep.audio_spans))]
    routes = None
    if routing is not None and routing.prompt_experts is not None:
        routes = routing.prompt_experts[n_prompt - 1 : n_prompt - 1 + len(tokens)].astype(np.int64)
    return Forced(logprobs, images, audios, routes, n_prompt)


def forced_pass(engine, messages: list[Message], options: Options, tokens: list[int]) -> Forced:
    """``teacher_forced`` on ``engine``'s model, on its worker thread between two decode steps."""
    return engine.call(lambda: teacher_forced(engine.rt, messages, options, tokens))


# ----------------------------------------------------------------------------- metrics


def same_vocabulary(engine_a, engine_b) -> str | None:
    """None when B can be teacher-forced on A's token ids (the same tokenizer vocabulary), else why not."""
    tok_a = getattr(engine_a.rt.processor, "tokenizer", engine_a.rt.processor)
    tok_b = getattr(engine_b.rt.processor, "tokenizer", engine_b.rt.processor)
    if tok_a.get_vocab() != tok_b.get_vocab():
        return "the two models have different tokenizers: only the answers are compared"
    return None


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (the shorter one's length when one is a prefix of the
    other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def kl_divergence(lp_a: np.ndarray, lp_b: np.ndarray) -> np.ndarray:
    """Per row KL(A || B) in nats from log-probabilities (n, V): sum p_a (log p_a - log p_b). A token A gives
    no mass adds nothing (0 * log 0 = 0); one B gives none where A gives some is infinite, as it should be."""
    p_a = np.exp(lp_a.astype(np.float64))
    with np.errstate(invalid="ignore"):
        terms = np.where(p_a > 0, p_a * (lp_a.astype(np.float64) - lp_b.astype(np.float64)), 0.0)
    return np.maximum(terms.sum(-1), 0.0)  # rounding can leave -1e-17 for equal rows


def _on_grid(m: np.ndarray, shape: tuple) -> np.ndarray:
    """Map ``m`` onto ``shape`` (bilinear) when the two models see the media on different grids."""
    if m.shape == shape:
        return m
    t = torch.from_numpy(np.ascontiguousarray(m, np.float32))
    mode = "bilinear" if m.ndim == 2 else "linear"
    return torch.nn.functional.interpolate(t[None, None], size=shape, mode=mode, align_corners=False)[0, 0].numpy()


def map_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(1 - cosine similarity, distance between the two peaks in grid cells) of two focus maps of one medium."""
    b = _on_grid(b, a.shape)
    fa, fb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    cos = float(fa @ fb / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    pa = np.array(np.unravel_index(int(a.argmax()), a.shape))
    pb = np.array(np.unravel_index(int(b.argmax()), b.shape))
    return max(0.0, 1.0 - cos), float(np.linalg.norm(pa - pb))


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, L, k) expert ids on both sides -> (n, L) Jaccard index of the two expert sets per token and layer."""
    hits = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)  # |A ∩ B| (the k experts of a side are distinct)
    return hits / (a.shape[-1] + b.shape[-1] - hits)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _focus_rows(fa: Forced, fb: Forced, groups: list[list[int]]) -> list[dict]:
    """Per group of token indices: the mean map of the group on each side, per medium, compared."""
    rows = []
    pairs = [(x, y) for x, y in zip(fa.images, fb.images)] + [(x, y) for x, y in zip(fa.audios, fb.audios)]
    for g in groups:
        diffs = [map_difference(x[g].mean(0), y[g].mean(0)) for x, y in pairs]
        if diffs:
            rows.append({"tokens": g, "focus_1_minus_cos": _mean(d[0] for d in diffs),
                         "peak_distance": _mean(d[1] for d in diffs)})
        else:
            rows.append({"tokens": g, "focus_1_minus_cos": None, "peak_distance": None})
    return rows


def compare_turn(a: Side, b: Side, fa: Forced | None, fb: Forced | None, words: list[tuple[str, list[int]]] | None = None,
                 note: str | None = None) -> dict:
    """The two answers and (when B could be teacher-forced) the two passes -> the comparison as plain data.
    ``words``: (text, token indices) groups of A's tokens (the page's clickable words); one per token when
    None. ``note`` says why there are no teacher-forced figures."""
    diverge = first_difference(a.token_ids, b.token_ids)
    out = {
        "identical": diverge is None and a.answer == b.answer and a.reasoning == b.reasoning,
        "diverge_at": diverge,
        "diverge_tokens": None if diverge is None else [
            a.tokens[diverge] if diverge < len(a.tokens) else "(end)",
            b.tokens[diverge] if diverge < len(b.tokens) else "(end)"],
        "tokens_a": len(a.token_ids), "tokens_b": len(b.token_ids),
        "note": note,
    }
    summary = {"identical": out["identical"], "diverge_at": diverge, "argmax_agreement": None, "kl_mean": None,
               "kl_max": None, "focus_1_minus_cos": None, "peak_distance": None, "peak_agreement": None,
               "routing_jaccard": None}
    if fa is None or fb is None or fa.logprobs.shape != fb.logprobs.shape:
        if fa is not None and fb is not None and note is None:
            out["note"] = "the two models' vocabularies differ in size: only the answers are compared"
        out.update(per_token=[], per_word=[], routing_per_layer=[], summary=summary)
        return out
    n = fa.logprobs.shape[0]
    arg_a, arg_b = fa.logprobs.argmax(-1), fb.logprobs.argmax(-1)
    kl = kl_divergence(fa.logprobs, fb.logprobs)
    jac = jaccard(fa.routes, fb.routes) if fa.routes is not None and fb.routes is not None \
        and fa.routes.shape == fb.routes.shape else None
    tok_focus = _focus_rows(fa, fb, [[i] for i in range(n)])
    per_token = []
    for i in range(n):
        per_token.append({
            "index": i, "token": a.tokens[i] if i < len(a.tokens) else "", "token_id": int(a.token_ids[i]),
            "argmax_a": int(arg_a[i]), "argmax_b": int(arg_b[i]), "agree": bool(arg_a[i] == arg_b[i]),
            "kl": float(kl[i]), "logprob_a": float(fa.logprobs[i, a.token_ids[i]]),
            "logprob_b": float(fb.logprobs[i, a.token_ids[i]]),
            "focus_1_minus_cos": tok_focus[i]["focus_1_minus_cos"], "peak_distance": tok_focus[i]["peak_distance"],
            "routing_jaccard": float(jac[i].mean()) if jac is not None else None,
        })
    groups = words if words is not None else [(t["token"], [t["index"]]) for t in per_token]
    groups = [(text, [i for i in idx if i < n]) for text, idx in groups]
    groups = [(text, idx) for text, idx in groups if idx]
    per_word = []
    for (text, idx), f in zip(groups, _focus_rows(fa, fb, [idx for _, idx in groups])):
        per_word.append({"word": text, **f, "agree": all(per_token[i]["agree"] for i in idx),
                         "kl": float(np.mean(kl[idx])),
                         "routing_jaccard": float(jac[idx].mean()) if jac is not None else None})
    peaks = [w["peak_distance"] for w in per_word if w["peak_distance"] is not None]
    disagree = np.flatnonzero(arg_a != arg_b)
    summary.update(
        argmax_agreement=float((arg_a == arg_b).mean()), first_argmax_disagreement=int(disagree[0]) if disagree.size else None,
        kl_mean=float(kl.mean()), kl_max=float(kl.max()), kl_max_at=int(kl.argmax()),
        focus_1_minus_cos=_mean(w["focus_1_minus_cos"] for w in per_word), peak_distance=_mean(peaks),
        peak_agreement=float(np.mean([p == 0 for p in peaks])) if peaks else None,
        routing_jaccard=float(jac.mean()) if jac is not None else None,
    )
    out.update(per_token=per_token, per_word=per_word,
               routing_per_layer=[float(v) for v in jac.mean(0)] if jac is not None else [], summary=summary)
    return out


def forced_pair(engine_a, engine_b, messages: list[Message], a: Side, b: Side,
                options: Options) -> tuple[Forced | None, Forced | None, str | None]:
    """Both answers are in: teacher-force both models on A's tokens (each on its own worker), or say why not."""
    note = a.error or b.error or same_vocabulary(engine_a, engine_b)
    if note is None and not a.token_ids:
        note = "the first model's answer has no tokens to teacher-force"
    if note is not None:
        return None, None, note
    return forced_pass(engine_a, messages, options, a.token_ids), forced_pass(engine_b, messages, options,
                                                                               a.token_ids), None


def compare_engines(engine_a, engine_b, messages: list[Message], a: Side, b: Side, options: Options,
                    words: list[tuple[str, list[int]]] | None = None) -> dict:
    """``forced_pair`` then ``compare_turn``."""
    fa, fb, note = forced_pair(engine_a, engine_b, messages, a, b, options)
    return compare_turn(a, b, fa, fb, words, note)
