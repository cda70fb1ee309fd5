"""One simulated user (an httpx pool, a gradio_client session, its own random mix) and the pool of good requests."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from autoglm_app.config import DEFAULT_MODEL_NAME as MODEL_NAME

from .answers import Malformed, Outcome, classify_refusal, completion_signature, error_object_ok, read_sse, \
    ui_problem, ui_signature
from .options import BAD_KINDS, DISCONNECT_KINDS, GOOD_KINDS, POOL_TASKS, LoadConfig
from .target import Target


# ----------------------------------------------------------------------------- the request pool


@dataclass
class PoolItem:
    index: int
    task: str
    question: str
    truth: str  # the ShapesWorld answer (for information only)
    thinking: bool
    png: bytes | None
    image_path: str | None = None
    api_ref: tuple | None = None  # (reasoning, answer, finish) from a lone non-streamed request
    ui_ref: list | None = None  # the UI's assistant messages for a lone /chat

    def content(self) -> list | str:
        if self.png is None:
            return self.question
        url = "data:image/png;base64," + base64.b64encode(self.png).decode()
        return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": self.question}]


def make_pool(n: int, seed: int, image_dir: Path) -> list[PoolItem]:
    from training.shapesworld import make_qa, random_scene, render

    rng = random.Random(seed)
    pool = []
    for i in range(n):
        task = POOL_TASKS[i % len(POOL_TASKS)]
        scene = random_scene(rng, rng.choice((128, 160, 192, 224)))
        qa = make_qa(scene, rng, task)
        png = path = None
        if task != "identity":  # identity questions go text-only: the text path is exercised too
            buf = io.BytesIO()
            render(scene).save(buf, "PNG")
            png = buf.getvalue()
            path = str(image_dir / f"scene{i}.png")
            Path(path).write_bytes(png)
        pool.append(PoolItem(i, task, qa.question, qa.answer, thinking=(i % 2 == 0), png=png, image_path=path))
    return pool


def body_for(item: PoolItem, stream: bool, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": item.content()}], "temperature": 0.0,
            "seed": 0, "max_tokens": max_tokens, "enable_thinking": item.thinking, "stream": stream}
    body.update(extra)
    return body


# ----------------------------------------------------------------------------- one client


class Budget:
    def __init__(self, limit: int | None, deadline: float):
        self.limit, self.deadline = limit, deadline
        self.used = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if time.monotonic() >= self.deadline or (self.limit is not None and self.used >= self.limit):
                return False
            self.used += 1
            return True


class Client:
    """One simulated user: an httpx connection pool, a gradio_client session, its own random mix."""

    def __init__(self, index: int, cfg: LoadConfig, target: Target, pool: list[PoolItem], ui: bool):
        import httpx

        self.index, self.cfg, self.target, self.pool = index, cfg, target, pool
        self.rng = random.Random(cfg.seed * 1009 + index)
        self.http = httpx.Client(base_url=target.url, timeout=cfg.request_timeout, trust_env=False)
        self.ui = None
        if ui:
            from gradio_client import Client as GradioClient

            self.ui = GradioClient(target.url, verbose=False, download_files=False, analytics_enabled=False,
                                   httpx_kwargs={"timeout": cfg.request_timeout, "trust_env": False})

    def close(self) -> None:
        self.http.close()
        if self.ui is not None and hasattr(self.ui, "close"):
            try:
                self.ui.close()
            except Exception:  # closing is best effort
                pass

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.target.api_key}"} if self.target.api_key else {}

    def pick(self) -> str:
        cfg, r = self.cfg, self.rng.random()
        if r < cfg.bad:
            return self.rng.choice(self.bad_kinds())
        if r < cfg.bad + cfg.disconnect:
            return self.rng.choice(DISCONNECT_KINDS)
        if self.ui is not None and self.rng.random() < cfg.ui:
            return "ui_chat"
        return "api_json" if self.rng.random() < cfg.json_share else "api_stream"

    def bad_kinds(self) -> list[str]:
        return [k for k in BAD_KINDS if (k != "bad_key" or self.target.api_key) and (k != "ui_empty" or self.ui)]

    def run(self, kind: str) -> Outcome:
        import httpx

        t0 = time.perf_counter()
        try:
            if kind in GOOD_KINDS:
                item = self.rng.choice(self.pool)
                out = getattr(self, kind)(item, t0)
            elif kind in DISCONNECT_KINDS:
                out = self.disconnect(kind, t0)
            else:
                out = self.bad(kind)
        except httpx.TimeoutException as e:
            out = Outcome(kind, "server_error", detail=f"timeout: {type(e).__name__}")
        except (httpx.HTTPError, OSError) as e:
            out = Outcome(kind, "server_error", detail=f"connection: {type(e).__name__}: {e}")
        except Malformed as e:
            out = Outcome(kind, "server_error", detail=f"malformed: {e}")
        out.latency_s = time.perf_counter() - t0
        out.client = self.index
        return out

    # ------------------------------------------------------------------ good requests
    def good_body(self, item: PoolItem, stream: bool) -> dict:
        extra = {"user": f"load-client-{self.index}"} if self.cfg.api_user else {}
        return body_for(item, stream, self.cfg.max_tokens, **extra)

    def api_stream(self, item: PoolItem, t0: float) -> Outcome:
        body = self.good_body(item, True)
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=self.headers) as resp:
            if resp.status_code != 200:
                return classify_refusal("api_stream", resp, resp.read())
            r = read_sse(resp, t0)
        if r.errors:
            return Outcome("api_stream", "server_error", 200, detail=f"error event in a good stream: {r.errors[0]}")
        if not (r.role and r.done and r.finish in ("stop", "length")):
            raise Malformed(f"incomplete stream: role={r.role} finish={r.finish} done={r.done}")
        return self.judge("api_stream", item, r.signature(), r.ttft_s)

    def api_json(self, item: PoolItem, t0: float) -> Outcome:
        resp = self.http.post("/v1/chat/completions", json=self.good_body(item, False), headers=self.headers)
        if resp.status_code != 200:
            return classify_refusal("api_json", resp, resp.content)
        return self.judge("api_json", item, completion_signature(resp))

    def ui_answer(self, item: PoolItem) -> list:
        """/clear, then /chat with the pool item; the assistant side of the history."""
        from gradio_client import handle_file

        self.ui.predict(api_name="/clear")
        files = [handle_file(item.image_path)] if item.image_path else []
        history = self.ui.predict(item.question, files, None, item.thinking, 0.0, 0.9, self.cfg.max_tokens, 0,
                                  api_name="/chat")
        return ui_signature(history)

    def ui_chat(self, item: PoolItem, t0: float) -> Outcome:
        from gradio_client.exceptions import AppError

        try:
            sig = self.ui_answer(item)
        except AppError as e:
            return Outcome("ui_chat", "server_error", detail=f"UI error: {str(e)[:200]}")
        except Exception as e:  # gradio_client wraps transport failures in many types
            return Outcome("ui_chat", "server_error", detail=f"UI failure: {type(e).__name__}: {str(e)[:200]}")
        problem = ui_problem(sig)
        if problem and "busy" in problem.lower():
            return Outcome("ui_chat", "busy", retry_after=1.0, detail=problem[:120])
        if problem:
            return Outcome("ui_chat", "server_error", detail=f"UI answer: {problem[:200]}")
        ok = item.ui_ref is None or sig == item.ui_ref
        return Outcome("ui_chat", "ok_correct" if ok else "ok_mismatch",
                       detail="" if ok else f"pool {item.index}: {sig} != {item.ui_ref}")

    def judge(self, kind: str, item: PoolItem, sig: tuple, ttft: float | None = None) -> Outcome:
        ok = item.api_ref is None or tuple(sig) == tuple(item.api_ref)
        return Outcome(kind, "ok_correct" if ok else "ok_mismatch", 200, ttft_s=ttft,
                       detail="" if ok else f"pool {item.index}: {sig!r} != {item.api_ref!r}")

    # ------------------------------------------------------------------ bad requests
    def bad(self, kind: str) -> Outcome:
        if kind == "ui_empty":
            return self.ui_empty()
        item = self.rng.choice(self.pool)
        headers = dict(self.headers)
        body: dict | None = body_for(item, self.rng.random() < 0.5, self.cfg.max_tokens)
        raw: bytes | None = None
        if kind == "bad_json":
            raw = json.dumps(body).encode()[: self.rng.randint(5, 60)]
        elif kind == "bad_base64":
            body["messages"][0]["content"] = [{"type": "image_url",
                                               "image_url": {"url": "data:image/png;base64,@@not*base64@@"}},
                                              {"type": "text", "text": item.question}]
        elif kind == "bad_part":
            body["messages"][0]["content"] = [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                              {"type": "text", "text": item.question}]
        elif kind == "bad_temperature":
            body["temperature"] = self.rng.choice((-1.0, 7.5, 1e9))
        elif kind == "bad_n":
            body["n"] = 2
        elif kind == "bad_max_tokens":
            body["max_tokens"] = self.rng.choice((0, -5))
        elif kind == "bad_long_prompt":
            body = body_for(item, False, self.cfg.max_tokens)
            body["messages"][0]["content"] = "red circle " * (self.target.context_limit // 2 + 200)
        elif kind == "bad_model":
            body["model"] = "no-such-model"
        elif kind == "bad_key":
            headers = {"Authorization": "Bearer wrong-" + os.urandom(4).hex()}
        payload = raw if raw is not None else json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
        with self.http.stream("POST", "/v1/chat/completions", content=payload, headers=headers) as resp:
            if resp.status_code != 200:
                return classify_refusal(kind, resp, resp.read())
            if "text/event-stream" in resp.headers.get("content-type", ""):
                # refused only once the engine looked at it (e.g. the context check): an error event is right
                r = read_sse(resp, time.perf_counter())
                if r.errors and all(error_object_ok({"error": e}) for e in r.errors) and r.done:
                    if all(e.get("type") == "invalid_request_error" for e in r.errors):
                        return Outcome(kind, "bad_request_rejected", 200, detail="error event in the stream")
                    return Outcome(kind, "server_error", 200, detail=f"bad request failed in the stream: {r.errors[0]}")
                return Outcome(kind, "bad_request_accepted", 200, detail="streamed an answer")
            resp.read()
        return Outcome(kind, "bad_request_accepted", 200, detail="answered 200")

    def ui_empty(self) -> Outcome:
        from gradio_client.exceptions import AppError

        try:
            self.ui.predict("   ", [], None, True, 0.0, 0.9, self.cfg.max_tokens, 0, api_name="/chat")
        except AppError as e:
            if "Traceback" in str(e):
                return Outcome("ui_empty", "server_error", detail=f"UI error with a traceback: {str(e)[:200]}")
            return Outcome("ui_empty", "bad_request_rejected", detail=str(e)[:80])
        except Exception as e:
            return Outcome("ui_empty", "server_error", detail=f"UI failure: {type(e).__name__}: {str(e)[:200]}")
        return Outcome("ui_empty", "bad_request_accepted", detail="an empty turn was answered")

    # ------------------------------------------------------------------ disconnects
    def disconnect(self, kind: str, t0: float) -> Outcome:
        item = self.rng.choice(self.pool)
        body = body_for(item, True, self.cfg.max_tokens)
        if kind == "disconnect_raw":
            # send the whole request, then hang up without reading a byte
            payload = json.dumps(body).encode()
            u = urlsplit(self.target.url)
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\n")
            if self.target.api_key:
                head += f"Authorization: Bearer {self.target.api_key}\r\n"
            with socket.create_connection((u.hostname, u.port or 80), timeout=10) as s:
                s.sendall(head.encode() + b"\r\n" + payload)
                time.sleep(self.rng.uniform(0.0, 0.2))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            return Outcome(kind, "disconnect_done")
        stop = "first_chunk" if kind == "disconnect_first_chunk" else "first_token"
        with self.http.stream("POST", "/v1/chat/completions", json=body, headers=self.headers) as resp:
            if resp.status_code != 200:
                return classify_refusal(kind, resp, resp.read())
            r = read_sse(resp, t0, stop=stop)
            # leaving the block closes the connection mid-stream
        if r.errors:
            return Outcome(kind, "server_error", 200, detail=f"error event: {r.errors[0]}")
        return Outcome(kind, "disconnect_done", 200, ttft_s=r.ttft_s)
