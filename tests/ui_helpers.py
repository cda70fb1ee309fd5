"""A scripted stand-in for the engine, whose events a test chooses, and the page served alone on loopback.

Used by the gradio_client tests and the browser tests of the page.
"""

from __future__ import annotations

import threading
import time

from autoglm_app.events import Answer, Done, EngineBusy, LayerRoute, Queued, Reasoning, Routing, Stats

def stats(finish: str) -> Stats:
    return Stats(ttft_s=0.05, think_s=0.2, reasoning_tokens=2, answer_tokens=2, reasoning_tps=10.0, answer_tps=10.0,
                 tokens_per_second=10.0, prompt_tokens=10, completion_tokens=4, queue_s=0.0, total_s=0.4,
                 peak_memory={"cpu": 1}, finish_reason=finish, attention="sdpa+probe")


def routing(index: int, token: str, phase: str) -> Routing:
    load = {"layers": [0], "experts": 2, "top_k": 1, "tokens": {"prefill": 3, "decode": index},
            "prefill": [[2, 1]], "decode": [[index, 0]], "total": [[2 + index, 1]],
            "by_modality": {"text": [[2 + index, 1]], "image": [[0, 0]], "audio": [[0, 0]]},
            "dropped": [0], "cv": [0.5], "entropy": [0.9]}
    return Routing(index, token, phase, [LayerRoute(0, [0], [1.0])], load)


THINKING_SCRIPT = [Queued(0), Reasoning("Let me look."), routing(0, "Let", "reasoning"),
                   Reasoning(" Three shapes."), routing(1, " Three", "reasoning"),
                   Answer("There are"), routing(2, "There", "answer"), Answer(" three shapes."),
                   routing(3, " three", "answer"), stats("stop"), Done("stop")]


class ScriptedHandle:
    """Plays a script, then (endless) answers a word every 20 ms until cancelled, like the engine."""

    def __init__(self, script: list, endless: bool, delay: float):
        self.script, self.endless, self.delay = script, endless, delay
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def events(self):
        finished = False
        try:
            for event in self.script:
                time.sleep(self.delay)
                yield event
            n = 0
            while self.endless and not self.cancelled and n < 3000:
                yield Answer(f" word{n}")
                yield routing(n, f" word{n}", "answer")
                n += 1
                time.sleep(0.02)
            if self.endless:
                yield stats("cancelled")
                yield Done("cancelled")
            finished = True
        finally:
            if not finished:
                self.cancel()


class ScriptedEngine:
    """Stands in for Engine (submit, info) with events the test chooses."""

    def __init__(self):
        self.script: list = THINKING_SCRIPT
        self.endless = False
        self.delay = 0.05
        self.busy = False
        self.handles: list[ScriptedHandle] = []

    def submit(self, request) -> ScriptedHandle:
        if self.busy:
            raise EngineBusy("the server is busy (16 requests waiting): retry in a few seconds", retry_after=2.0)
        self.handles.append(ScriptedHandle(self.script, self.endless, self.delay))
        return self.handles[-1]

    def info(self) -> dict:
        return {"model_id": "scripted", "family": "autoglm", "quantize": "fp32", "device_map": None,
                "summary": "module  params", "attention": "sdpa", "context_limit": 2048}


def serve_ui(engine):
    """The page alone (no /v1 API) on a free loopback port."""
    from fastapi import FastAPI

    from autoglm_app.config import Settings
    from autoglm_app.server import serve_in_thread
    from autoglm_app.ui.layout import mount_ui

    return serve_in_thread(mount_ui(FastAPI(), engine, Settings(model="small")))


def page_settings(thinking=False, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=1, top_k=0,
                  repetition_penalty=1.0, stop="", system="", context_mode="each turn alone", typed="") -> list:
    """The generation settings in the order the page's Send / Regenerate handlers take them."""
    return [thinking, temperature, top_p, max_new_tokens, seed, top_k, repetition_penalty, stop, system, context_mode,
            typed]


def page_send(studio, session, text: str = "", files=(), recording=None, request=None, **settings):
    """Call the page's Send handler as Gradio would; returns the generator (list() it to run the turn)."""
    return studio.send({"text": text, "files": list(files)}, recording, *page_settings(**settings), session, request)


def page_regenerate(studio, session, request=None, **settings):
    return studio.regenerate(*page_settings(**settings), session, request)
