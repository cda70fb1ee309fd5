"""Server CPU per token: a page turn against an API turn on the same prompt (issue 16, defect 4).

    python -m tools.page_cost [--repeats 3] [--max-tokens 128] [--example 0] [--no-thinking]
                              [--out bench-results/page_cost.json] [--server-root DIR]

    # today's committed code, while the working tree is being edited:
    git archive HEAD | tar -x -C /tmp/head && python -m tools.page_cost --server-root /tmp/head

Starts ``python app.py`` on the shipped demo model (127.0.0.1, a free port) and, after one warm-up of
each, alternates for ``--repeats`` rounds:
  (a) an API turn: the openai SDK, streaming, temperature 0, ``return_focus`` + ``return_routing`` on,
      ``stream_options.include_usage``, the example's image as a base64 data URL and its question;
  (b) a page turn: headless Chromium (Playwright) on ``/``: Clear, attach the same image, type the same
      question, temperature 0 and the same max new tokens and thinking in Generation settings, Send.
For each turn: the server process's CPU time (user + system, its children included) from the send
until the client has the whole reply, the generated tokens, the wall-clock tokens/s; for the page also
the browser's CPU and how often the panels changed (a MutationObserver on the Focus panel's heatmap,
the word chips, the routing view when it is in the page, and the chat).

A page turn has finished when Gradio's send event has delivered its last update (no element of the
page carries Gradio's ``generating`` status any more, after it was seen) and the engine has counted the
request as finished in ``/metrics`` (``vllm:request_success_total``). The page's tokens are read from
the Model tab (reasoning + answer tokens of the last answer) and its answer text from the chat; both are
compared with the API turn's (same greedy prompt, so the same tokens) and a mismatch is reported.

Target (issue 16): page CPU/token at most 1.5x the API's, panels updating at 4 Hz or more.
"""

from .run import main

__all__ = ["main"]
