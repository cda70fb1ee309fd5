"""The generation loop: prefill once, then decode one token at a time.

One place produces a token (``Generation.run``); the probes ride along on the
forward passes, and every token turns into Reasoning/Answer deltas plus Focus and
Routing records through ``emit``.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from ..events import (
    Answer,
    BadRequest,
    ChatRequest,
    Event,
    Focus,
    LayerRoute,
    Message,
    Notice,
    Options,
    Reasoning,
    Routing,
    Stats,
)
from ..families.base import ModelFamily
from .probes import FocusProbe, RoutingProbe, aggregate
from .thinksplit import ThinkSplitter

# ----------------------------------------------------------------------------- sampling


def sample(logits: torch.Tensor, opts: Options, seen: torch.Tensor, gen: torch.Generator) -> int:
    """logits (V,) float32 on CPU -> next token id."""
    if opts.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / opts.repetition_penalty, picked * opts.repetition_penalty)
    if opts.temperature <= 0:
        return int(logits.argmax())
    logits = logits / opts.temperature
    if opts.top_k > 0:
        kth = torch.topk(logits, min(opts.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if 0 < opts.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > opts.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


class IncrementalDecoder:
    """Token ids -> text deltas, never splitting a multi-byte character."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


# ----------------------------------------------------------------------------- context


def fit_context(family: ModelFamily, processor, messages: list[Message], opts: Options,
                limit: int) -> tuple[list[Message], int, int]:
    """Drop the oldest turns until prompt + max_new_tokens fits; never the current turn.

    Returns (messages, prompt tokens, turns dropped). A current turn that alone is too
    long is the client's to fix, so it is a BadRequest.
    """
    budget = limit - opts.max_new_tokens
    system = [m for m in messages if m.role == "system"][:1]
    turns = [m for m in messages if m.role != "system"]
    dropped = 0
    while True:
        n = family.count_tokens(processor, system + turns, opts.enable_thinking)
        if n <= budget:
            return system + turns, n, dropped
        # the oldest user turn and everything up to the next user turn go together
        nxt = next((i for i in range(1, len(turns)) if turns[i].role == "user"), None)
        if nxt is None:
            raise BadRequest(
                f"this turn needs {n} prompt tokens plus {opts.max_new_tokens} new tokens, over the "
                f"{limit}-token context: shorten the text, send fewer images or a shorter recording, "
                "or lower max_new_tokens"
            )
        turns = turns[nxt:]
        dropped += 1


# ----------------------------------------------------------------------------- one request


@dataclass
class Runtime:
    """What the loop needs from the loaded model."""

    model: torch.nn.Module
    processor: object
    family: ModelFamily
    context_limit: int = 8192


class Generation:
    def __init__(self, rt: Runtime, request: ChatRequest, emit: Callable[[Event], None],
                 cancelled: Callable[[], bool], memory_state=None):
        self.rt, self.req, self.emit, self.cancelled = rt, request, emit, cancelled
        self.memory_state = memory_state

    @torch.inference_mode()
    def run(self) -> Stats:
        rt, opts = self.rt, self.req.options
        model, processor, family = rt.model, rt.processor, rt.family
        t0 = time.perf_counter()
        messages, _, dropped = fit_context(family, processor, self.req.messages, opts, rt.context_limit)
        if dropped:
            self.emit(Notice(f"the conversation was too long for the {rt.context_limit}-token context: "
                             f"the oldest {dropped} turn(s) were left out of this answer"))
        prep = family.prepare(processor, messages, opts.enable_thinking)
        device = model.get_input_embeddings().weight.device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prep.inputs.items()}
        prompt_len = int(inputs["input_ids"].shape[1])

        rule, layers = family.default_focus(model)
        rule, layers = opts.focus_aggregation or rule, opts.focus_layers or layers
        aggregate(np.zeros((family.num_layers(model), 1)), rule, layers)  # validate before any work

        gen = torch.Generator().manual_seed(opts.seed if opts.seed is not None else int(torch.seed() % 2**63))
        splitter = ThinkSplitter(opts.enable_thinking, family.think_open, family.think_close, family.answer_tags)
        decoder = IncrementalDecoder(processor.tokenizer)
        stop_ids = family.stop_ids(processor)
        banned = family.banned_ids(processor)
        use_focus = opts.focus and bool(prep.image_spans or prep.audio_spans)
        focus = FocusProbe(family.attention_modules(model), prep.image_spans, prep.audio_spans)
        routers = family.routers(model)
        E, k = family.num_experts(model)
        routing = RoutingProbe(routers, E, k, family.read_route)
        routing.modality = torch.from_numpy(prep.modality)
        for dev in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(dev)

        generated: list[int] = []
        seen = inputs["input_ids"][0].cpu()
        counts = {"reasoning": 0, "answer": 0}
        t_first = t_think = None
        text_answer = ""
        finish = "length"
        cache = DynamicCache()
        try:
            if use_focus:
                focus.__enter__()
            if opts.routing and routers:
                routing.__enter__()
            family.begin(model)
            out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1,
                        **family.forward_kwargs(self.memory_state))
            while True:
                if self.cancelled():
                    finish = "cancelled"
                    break
                logits = out.logits[0, -1].float().cpu()
                logits[banned] = float("-inf")
                if len(generated) < opts.min_new_tokens:
                    logits[list(stop_ids)] = float("-inf")
                token = sample(logits, opts, seen, gen)
                now = time.perf_counter()
                t_first = t_first or now
                if token in stop_ids:
                    finish = "stop"
                    break
                generated.append(token)
                if opts.repetition_penalty != 1.0:  # only the penalty reads what was seen
                    seen = torch.cat([seen, torch.tensor([token])])
                delta = decoder.push(token)
                pieces = splitter.feed(delta)
                phase = pieces[-1][0] if pieces else splitter.phase
                counts[phase] += 1
                if phase == "answer" and t_think is None and counts["reasoning"]:
                    t_think = now
                self._emit_pieces(pieces)
                text_answer += "".join(t for p, t in pieces if p == "answer")
                idx = len(generated) - 1
                if use_focus:
                    self._emit_focus(focus, idx, delta, phase, rule, layers)
                if routing._handles:
                    route = routing.collect()
                    self.emit(Routing(idx, delta, phase, [LayerRoute(*r) for r in route], routing.frozen()))
                if any(s and s in text_answer for s in opts.stop):
                    finish = "stop"
                    break
                if len(generated) >= opts.max_new_tokens:
                    finish = "length"
                    break
                routing.phase = "decode"
                routing.modality = None  # decode tokens are text
                out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                            use_cache=True, logits_to_keep=1,
                            **family.forward_kwargs(getattr(out, "memory_state", None)))
            self._emit_pieces(splitter.finish())
            self.memory_state = getattr(out, "memory_state", None)
        finally:
            focus.__exit__()
            routing.__exit__()
        t_end = time.perf_counter()
        t_first = t_first or t_end
        reasoning_end = t_think or t_end
        r_n, a_n = counts["reasoning"], counts["answer"]
        return Stats(
            ttft_s=t_first - t0,
            think_s=(t_think - t0) if t_think else None,
            reasoning_tokens=r_n,
            answer_tokens=a_n,
            reasoning_tps=r_n / max(reasoning_end - t_first, 1e-9) if r_n > 1 else 0.0,
            answer_tps=a_n / max(t_end - reasoning_end, 1e-9) if a_n > 1 else 0.0,
            tokens_per_second=(len(generated) - 1) / max(t_end - t_first, 1e-9) if len(generated) > 1 else 0.0,
            prompt_tokens=prompt_len,
            completion_tokens=len(generated),
            queue_s=0.0,
            total_s=t_end - t0,
            peak_memory=peak_memory(),
            finish_reason=finish,
            attention=(focus.mode if use_focus else "sdpa"),
        )

    def _emit_pieces(self, pieces) -> None:
        for phase, text in pieces:
            self.emit(Reasoning(text) if phase == "reasoning" else Answer(text))

    def _emit_focus(self, focus: FocusProbe, idx: int, token: str, phase: str, rule: str, layers) -> None:
        per_layer = focus.take()
        if per_layer.size == 0:
            return
        images, audios = focus.split(per_layer)
        self.emit(Focus(
            index=idx, token=token, phase=phase,
            images=[aggregate(m, rule, layers) for m in images],
            audios=[aggregate(m, rule, layers) for m in audios],
            per_layer_images=images, per_layer_audios=audios,
        ))


def peak_memory() -> dict[str, int]:
    out = {f"cuda:{d}": int(torch.cuda.max_memory_allocated(d)) for d in range(torch.cuda.device_count())}
    out["cpu"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # peak RSS of the process
    return out
