"""Sampling: one request's logits -> its next token id, and token ids -> text deltas.

``sample`` is the rule (repetition penalty, greedy at temperature 0, else temperature, top-k and
top-p); ``Sampler`` holds what one request needs around it (banned ids, the stop ids kept out
before ``min_new_tokens``, the ids seen so far, the seeded generator) and, when the request asks
for them, the chosen token's log-probability, the top alternatives and the entropy
(``logprob_rows``, computed where the logits are). ``IncrementalDecoder`` turns the token stream
into text without ever splitting a multi-byte character.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..events import Options
from ..modeling.static_decode import logprob_pack


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


def request_generator(seed: int | None) -> torch.Generator:
    """The request's own random stream: seeded by the client, else fresh from torch's entropy."""
    return torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**63))


class RowLogprobs(NamedTuple):
    """One position's distribution in brief (host numpy): what ``Sampler.pick`` needs to report a token."""

    lse: float  # log of the sum of exp(logits): logprob(t) = logits[t] - lse
    entropy: float  # nats
    top_ids: np.ndarray  # (k,) most likely first
    top_logprobs: np.ndarray  # (k,)


def logprob_rows(logits: torch.Tensor, k: int) -> list[RowLogprobs]:
    """logits (n, V), any device and dtype -> per row the log-normaliser, the entropy and the k most likely
    tokens with their log-probabilities: the model's own distribution (float32 log-softmax of the raw
    logits). Computed where the logits are (on a GPU: one kernel per statistic for all rows), and only
    these small tensors come to the host."""
    return unpack_logprobs(logprob_pack(logits, min(k, logits.shape[-1])).cpu().numpy())


def unpack_logprobs(packed: np.ndarray) -> list[RowLogprobs]:
    """``logprob_pack``'s rows on the host (n, 2 + 2k) -> one RowLogprobs each (views, not copies)."""
    k = (packed.shape[1] - 2) // 2
    ids = packed[:, 2 + k:].astype(np.int64)
    return [RowLogprobs(float(row[0]), float(row[1]), ids[i], row[2:2 + k]) for i, row in enumerate(packed)]


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    entropy: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class Sampler:
    """One request's token picker: ``pick(logits)`` for the next token, ``accept(token)`` once it is kept;
    ``last`` is the picked token's TokenLogprob when the request asked for logprobs (else None).

    ``forced``: tokens the reply already starts with (``ChatRequest.continue_from``); they count as kept, so
    the new tokens are numbered after them, while ``min_new_tokens`` and ``max_new_tokens`` count new ones."""

    def __init__(self, opts: Options, prompt_ids: torch.Tensor, banned_ids: list[int], stop_ids: list[int],
                 forced: int = 0):
        self.opts = opts
        self.banned = torch.tensor(banned_ids, dtype=torch.long)  # index tensors made once, not per token
        self.stop = torch.tensor(stop_ids, dtype=torch.long)
        self.seen = prompt_ids.cpu()  # (T,) what the repetition penalty lowers
        self.forced = forced
        self.kept = forced  # tokens of the reply so far
        self.gen = request_generator(opts.seed)
        self.last: TokenLogprob | None = None

    @property
    def new_tokens(self) -> int:
        return self.kept - self.forced

    @property
    def greedy(self) -> bool:
        """The next token is the argmax of the masked logits (temperature 0, no repetition penalty): what
        ``pick_greedy`` does for several requests' rows at once."""
        return self.opts.temperature <= 0 and self.opts.repetition_penalty == 1.0

    def pick(self, logits: torch.Tensor, stats: RowLogprobs | None = None) -> int:
        """logits (V,) of the newest position, any device and dtype -> the next token id. ``stats``: this row's
        ``logprob_rows`` when the caller computed them for a whole batch (else computed here when asked)."""
        want = self.opts.logprobs is not None
        if want and stats is None:
            stats = logprob_rows(logits[None], self.opts.logprobs)[0]
        logits = logits.float().cpu()
        # the penalty rewrites logits in place (the chosen one too): keep the raw row to read the chosen value
        raw = logits.clone() if want and self.opts.repetition_penalty != 1.0 else logits
        logits[self.banned] = float("-inf")  # (a banned id is never chosen, so raw[token] stays the model's)
        if self.holds_stop:  # end-of-text waits until the minimum length
            logits[self.stop] = float("-inf")
        token = sample(logits, self.opts, self.seen, self.gen)
        return self.took(token, float(raw[token]) if want else 0.0, stats)

    @property
    def holds_stop(self) -> bool:
        return self.new_tokens < self.opts.min_new_tokens

    def took(self, token: int, raw_logit: float, stats: RowLogprobs | None) -> int:
        """Record the token picked for this row (by ``pick``, by ``static_decode.greedy_pack`` inside a batched step or by
        ``pick_greedy``) with its raw logit: its logprob record, when the request asked."""
        if self.opts.logprobs is not None:
            k = self.opts.logprobs
            self.last = TokenLogprob(token, raw_logit - stats.lse, stats.entropy, stats.top_ids[:k],
                                     stats.top_logprobs[:k])
        return token

    def accept(self, token: int) -> None:
        self.kept += 1
        if self.opts.repetition_penalty != 1.0:  # only the penalty reads what was seen
            self.seen = torch.cat([self.seen, torch.tensor([token])])


def pick_greedy(logits: torch.Tensor, rows: list[int], samplers: list[Sampler], stats: list) -> list[int]:
    """The greedy rows of a batched step at once: logits (n, V) float on the host; ``rows`` the rows whose
    ``samplers`` are ``greedy``; ``stats`` each row's RowLogprobs or None. The same masks and the same argmax as
    ``Sampler.pick`` row by row (the same tokens, ties to the lowest id), in four ops for the batch instead of
    about five a row: at eight rows a step that was a quarter of the worker's host time."""
    masked = logits[rows].float()  # a copy: the raw rows stay for the logprob records
    masked[:, samplers[0].banned] = float("-inf")  # (every request of one engine bans the same ids)
    held = [j for j, s in enumerate(samplers) if s.holds_stop]
    if held:
        masked[torch.tensor(held)[:, None], samplers[0].stop[None, :]] = float("-inf")
    picks = masked.argmax(-1)
    raw = logits[rows].float().gather(1, picks[:, None])[:, 0].tolist()  # the chosen tokens' raw logits
    tokens = picks.tolist()
    for row, s, token, value in zip(rows, samplers, tokens, raw):
        s.took(token, value, stats[row])
    return tokens


class IncrementalDecoder:
    """Token ids -> text deltas, never splitting a multi-byte character."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._decode = self._plain_decode(tokenizer)
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        after = self._decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    @staticmethod
    def _plain_decode(tokenizer):
        """The Rust tokenizer's own decode where transformers' adds nothing to it (a fast tokenizer that does not
        clean up spaces): the same text, without the wrapper's conversions (3.3 against 0.65 us a call, twice
        a token); else the tokenizer's decode."""
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode") and getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                           True) is False:
            return backend.decode
        return tokenizer.decode
