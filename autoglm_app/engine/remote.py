"""RemoteEngine: the Engine's public surface over an existing OpenAI-compatible server (vLLM, SGLang, ...).

``--backend openai --base-url http://host:port/v1`` scales past one machine: the UI and the API keep
their event stream, and this class produces it by streaming ``/chat/completions`` with the ``openai``
SDK. Reasoning comes from ``reasoning_content`` / ``reasoning`` deltas when the server splits it
(vLLM / SGLang reasoning parsers), otherwise from ``<think>`` tags in the content (ThinkSplitter).
A chat template that opens the think block in the prompt (Qwen3 Thinking-2507, QwQ, GLM-4.7) makes the
raw output start inside the reasoning: this engine cannot render the remote template, so it asks the
remote server once per thinking switch (``prompt_opens_think``: vLLM's / SGLang's ``/tokenize`` with chat
messages, then ``/detokenize`` of the prompt's tail) and starts the splitter in the reasoning when the
rendered prompt ends with ``<think>``; a server without those routes cannot tell, and the content is split
as if the prompt had not opened the block (start that server with its reasoning parser instead).
Focus maps and routing statistics need the model's attention and routers, which only the in-process
engine has: ``info()`` says so (``"focus": False, "routing": False`` and a reason), and no Focus or
Routing event is ever emitted. Logprobs are asked of the server (OpenAI's ``logprobs`` / ``top_logprobs``)
and come back as Logprobs events without token ids or entropy, which the wire does not carry; a branch
(``continue_from``, token ids) needs the in-process engine.

Each request runs in its own thread (at most ``max_concurrency`` at a time against the server;
beyond that they wait, and past ``max_queue`` waiting ``submit`` raises EngineBusy), so the remote
server's own batching does the scheduling.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import threading
import time

import numpy as np
import soundfile as sf

from ..config import Limits
from .handle import RequestHandle, observing
from ..events import (
    Alternative,
    Answer,
    BadRequest,
    ChatRequest,
    Done,
    EngineBusy,
    Error,
    Logprobs,
    Message,
    Queued,
    Reasoning,
    Stats,
)
from .inputs import validate_request
from .stats import Timeline, timing_stats
from .thinksplit import ThinkSplitter

log = logging.getLogger(__name__)

NO_PROBES = ("focus maps and expert routing need the in-process engine (the model's attention and routers); "
             "this server forwards to a remote OpenAI-compatible server, which does not expose them")


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(samples: np.ndarray, rate: int = 16000) -> str:
    """16 kHz mono float samples -> base64 of a 16-bit PCM WAV file (what input_audio carries)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1, 1), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def to_openai_messages(messages: list[Message]) -> list[dict]:
    """Engine messages (images as PIL, audio 16 kHz mono float) -> OpenAI chat messages."""
    out = []
    for m in messages:
        if not m.images and not m.audios:
            out.append({"role": m.role, "content": m.text})
            continue
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(i)}} for i in m.images]
        parts += [{"type": "input_audio", "input_audio": {"data": wav_base64(a.samples), "format": "wav"}}
                  for a in m.audios]
        if m.text:
            parts.append({"type": "text", "text": m.text})
        out.append({"role": m.role, "content": parts})
    return out


class RemoteEngine:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 limits: Limits | None = None, max_concurrency: int = 8, timeout: float = 600.0, asr=None):
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.client = OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)
        self._model = model
        self.limits = limits or Limits()
        self.asr = asr  # a Transcriber: recordings become text before they are sent
        self._logprobs = True  # False once the server refused them (then asked without, with a log line)
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._max_concurrency = max_concurrency
        self._running = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting = 0
        self._live: set[RequestHandle] = set()
        self._closed = False
        self._api_key = api_key
        self._opens_think: dict[bool, bool | None] = {}  # thinking switch -> the remote template opens the block
        self.observers: list = []  # (request, event) callables, as on Engine: the metrics exporter

    # ------------------------------------------------------------------ public
    @property
    def ready(self) -> bool:
        return not self._closed

    @property
    def model(self) -> str:
        """The remote model name: as configured, else the first the server lists."""
        if self._model is None:
            self._model = self.client.models.list().data[0].id
        return self._model

    def info(self) -> dict:
        return {
            "model_id": self._model or self.base_url,
            "family": "remote",
            "backend": "openai",
            "base_url": self.base_url,
            "quantize": "remote",
            "device_map": None,
            "summary": f"forwarding to {self.base_url}",
            "attention": "remote",
            "context_limit": self.limits.context_limit,
            "focus": False,
            "routing": False,
            "reason": NO_PROBES,
            "hears_audio": self.asr is None,
            "can_transcribe": self.asr is not None,
        }

    def tokenize(self, prompt, add_special_tokens: bool = True, enable_thinking: bool = True) -> list[int]:
        """Not here: the tokenizer is the remote server's (the API answers 501)."""
        raise NotImplementedError(f"tokenizing needs the model's tokenizer, which is on the remote server: ask "
                                  f"{self.base_url.removesuffix('/v1')}/tokenize (vLLM and SGLang serve one)")

    def detokenize(self, ids: list[int]) -> str:
        """Not here: the tokenizer is the remote server's (the API answers 501)."""
        raise NotImplementedError(f"detokenizing needs the model's tokenizer, which is on the remote server: ask "
                                  f"{self.base_url.removesuffix('/v1')}/detokenize (vLLM and SGLang serve one)")

    def prompt_opens_think(self, enable_thinking: bool) -> bool | None:
        """Whether the remote chat template ends the prompt inside an open ``<think>`` block, asked once per
        thinking switch and kept: a one-message chat through the remote ``/tokenize`` (vLLM's and SGLang's,
        at the server's root), the last tokens through ``/detokenize``, and the family rule on the text (its
        last non-blank text is the open tag). None when the server cannot say (no such routes: OpenAI,
        llama.cpp, ...; or an error): the content is then split as if nothing had been opened."""
        if enable_thinking in self._opens_think:
            return self._opens_think[enable_thinking]
        import httpx

        root = self.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        answer: bool | None = None
        try:
            with httpx.Client(timeout=10.0, headers=headers) as http:
                r = http.post(root + "/tokenize", json={
                    "model": self.model, "messages": [{"role": "user", "content": "hi"}],
                    "add_generation_prompt": True, "chat_template_kwargs": {"enable_thinking": enable_thinking}})
                r.raise_for_status()
                tail = r.json()["tokens"][-16:]
                r = http.post(root + "/detokenize", json={"model": self.model, "tokens": tail})
                r.raise_for_status()
                answer = str(r.json()["prompt"]).rstrip().endswith("<think>")
        except Exception as e:  # noqa: BLE001 - not knowing is an answer too (None)
            log.info("the remote server at %s cannot say how its template ends (%s): the answer is split as "
                     "if the prompt had not opened a think block", root, e)
        self._opens_think[enable_thinking] = answer
        return answer

    def transcribe(self, audio) -> str:
        if self.asr is None:
            raise BadRequest("no speech-to-text model is configured: start the server with --asr-model")
        return self.asr.transcribe(audio)

    def submit(self, request: ChatRequest) -> RequestHandle:
        request = self._validate(request)
        with self._lock:
            if self._closed:
                raise EngineBusy("the engine is shutting down", retry_after=5.0)
            if self._waiting >= self.limits.max_queue:
                raise EngineBusy(f"the server is busy ({self._waiting} requests waiting): retry in a few seconds",
                                 retry_after=max(1.0, 0.5 * self._waiting))
            self._waiting += 1
            handle = RequestHandle(request, next(self._ids))
            handle.observe = observing(self.observers)
            self._live.add(handle)
        threading.Thread(target=self._serve, args=(handle,), name=f"remote-{handle.id}", daemon=True).start()
        return handle

    def run(self, request: ChatRequest) -> list:
        return list(self.submit(request).events())

    def queue_length(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        """Requests streaming from the remote server now."""
        return self._running

    @property
    def idle(self) -> bool:
        """No request in flight against the remote server and none waiting."""
        with self._lock:
            return not self._live

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live = list(self._live)
        for h in live:
            h.cancel()
        self.client.close()

    # ------------------------------------------------------------------ validation (as Engine does)
    def _validate(self, request: ChatRequest) -> ChatRequest:
        if request.continue_from:
            raise BadRequest("continuing a reply from chosen tokens needs the in-process engine: the remote "
                             "server's API takes no token ids")
        # the remote model gets a transcript when an ASR model is configured, the recording otherwise
        return validate_request(request, self.limits, hears_audio=self.asr is None,
                                transcribe=self.asr.transcribe if self.asr is not None else None)

    # ------------------------------------------------------------------ one request
    def _serve(self, h: RequestHandle) -> None:
        with self._lock:  # 1 = waiting for a free slot on the remote server
            h.last_position = 0 if self._running < self._max_concurrency else 1
        h.put(Queued(h.last_position))
        with self._slots:
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                if h.cancelled:
                    h.put(Done("cancelled"))
                    return
                if h.last_position != 0:
                    h.last_position = 0
                    h.put(Queued(0))
                stats = self._stream(h)
                h.put(stats)
                h.put(Done(stats.finish_reason))
            except Exception as e:  # noqa: BLE001 - every failure becomes the client's Error event
                h.put(_error_event(e, self.base_url))
            finally:
                with self._lock:
                    self._running -= 1
                    self._live.discard(h)

    def _stream(self, h: RequestHandle) -> Stats:
        req, o = h.request, h.request.options
        timeline = Timeline(time.perf_counter())
        extra = {"chat_template_kwargs": {"enable_thinking": o.enable_thinking}, "skip_special_tokens": False}
        if o.top_k:
            extra["top_k"] = o.top_k
        if o.repetition_penalty != 1.0:
            extra["repetition_penalty"] = o.repetition_penalty
        asked = {"logprobs": True, "top_logprobs": o.logprobs} if o.logprobs is not None and self._logprobs else {}

        def create(**more):
            return self.client.chat.completions.create(
                model=self.model, messages=to_openai_messages(req.messages), stream=True,
                stream_options={"include_usage": True}, temperature=o.temperature, top_p=o.top_p,
                max_tokens=o.max_new_tokens, seed=o.seed, stop=o.stop or None, user=req.session_id,
                extra_body=extra, **more)

        try:
            stream = create(**asked)
        except Exception as e:  # a server that refuses logprobs: the page asks for them on every turn
            import openai

            if not asked or not isinstance(e, openai.BadRequestError) or "logprob" not in str(e).lower():
                raise
            log.warning("the remote server refuses logprobs (%s); asking without them from now on", e)
            self._logprobs = False
            stream = create()
        index = itertools.count()  # the generated tokens' positions, as the server's logprobs list them
        opened = bool(self.prompt_opens_think(o.enable_thinking))
        splitter = ThinkSplitter(o.enable_thinking, opened=opened)
        server_splits = False  # reasoning deltas came: the server's parser splits, its content is the answer
        finish, usage = "length", None
        try:
            for chunk in stream:
                if h.cancelled:
                    finish = "cancelled"
                    break
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    d = choice.delta
                    extra_fields = d.model_extra or {}
                    reasoning = extra_fields.get("reasoning_content") or extra_fields.get("reasoning")
                    pieces = [("reasoning", reasoning)] if reasoning else []
                    if reasoning and not server_splits:
                        server_splits = True
                        if opened and splitter.state == "reasoning" and not splitter.pending:
                            splitter = ThinkSplitter(False)  # the content after the server's split is answer
                    pieces += splitter.feed(d.content) if d.content else []
                    now = time.perf_counter()
                    for phase, text in pieces:
                        timeline.piece(phase, now)
                        h.put(Reasoning(text) if phase == "reasoning" else Answer(text))
                    lp = getattr(choice, "logprobs", None)  # (a server may leave the field out)
                    entries = lp.content if lp is not None else None
                    if entries and o.logprobs is not None:
                        phase = pieces[-1][0] if pieces else splitter.phase
                        h.put_all([remote_logprob(next(index), e, phase) for e in entries])
                    if choice.finish_reason:
                        finish = "stop" if choice.finish_reason == "stop" else choice.finish_reason
        finally:
            stream.close()
        for phase, text in splitter.finish():
            h.put(Reasoning(text) if phase == "reasoning" else Answer(text))
        r_n, a_n = timeline.reasoning, timeline.answer  # chunks, until the final usage says tokens
        details = getattr(usage, "completion_tokens_details", None) if usage else None
        reasoning_tokens = getattr(details, "reasoning_tokens", None) or r_n
        completion = usage.completion_tokens if usage else r_n + a_n
        answer_tokens = max(completion - reasoning_tokens, 0) if usage else a_n
        return timing_stats(
            timeline, time.perf_counter(), reasoning_tokens=reasoning_tokens, answer_tokens=answer_tokens,
            completion_tokens=completion, prompt_tokens=usage.prompt_tokens if usage else 0,
            finish_reason=finish, attention="remote", peak_memory={},
        )


def remote_logprob(index: int, entry, phase: str) -> Logprobs:
    """One entry of a server's ``logprobs.content`` -> the engine's Logprobs (no token ids, no entropy: the wire
    has neither)."""
    return Logprobs(index, entry.token, -1, float(entry.logprob), None,
                    [Alternative(a.token, -1, float(a.logprob), bytes(a.bytes or b"")) for a in entry.top_logprobs or []],
                    phase, bytes(entry.bytes or b""))


def _error_event(e: Exception, base_url: str) -> Error:
    import openai

    if isinstance(e, openai.APIStatusError):
        kind = "bad_request" if e.status_code in (400, 404, 413, 422) else "busy" if e.status_code in (429, 503) \
            else "internal"
        return Error(f"the remote server at {base_url} answered {e.status_code}: {e.message}", kind=kind)
    if isinstance(e, openai.APIConnectionError):
        return Error(f"cannot reach the remote server at {base_url} ({e}): check --base-url and that it is up",
                     kind="busy")
    log.exception("remote request failed")
    return Error(f"internal error while streaming from {base_url} ({type(e).__name__}: {e})", kind="internal")
