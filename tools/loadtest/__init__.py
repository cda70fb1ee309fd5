"""Load test: concurrent clients mixing UI and API traffic, bad requests and mid-stream disconnects.

    python -m tools.loadtest [--clients 16] [--duration 120] [--bad 0.1] [--disconnect 0.1]
                             [--ui 0.25] [--max-requests N] [--seed 0] [--max-tokens 48]
                             [--spawn | --url http://127.0.0.1:8000 [--pid PID] [--api-key KEY]]
                             [--out bench-results/load.json]

Loopback only, bounded in count (``--max-requests``) and time (``--duration``, plus a per-request
timeout). Without ``--url`` the app (UI + API, the demo model) is started on a free 127.0.0.1 port:
in this process (default) or as a ``python app.py`` child process (``--spawn``, so the resident
memory measured is the server's alone). The server started here requires an API key, so wrong
keys can be tried.

What each client thread does, until the deadline or the shared request budget runs out:

* good requests, answered at temperature 0 with a fixed seed from a fixed pool of ShapesWorld
  questions (an image and a question such as "How many shapes are there?"; thinking on and off):
  ``api_stream`` (SSE), ``api_json`` (non-streamed), ``ui_chat`` (the page's ``/chat`` endpoint
  through gradio_client, after ``/clear``). "Answered correctly" means well formed, complete, and
  identical (reasoning, answer, finish reason) to the reference the same pool item got when run
  alone during warm-up — the demo model answers about half of ShapesWorld questions right, so the
  scene's truth is not the yardstick; determinism under load is.
* bad requests that must be refused with a 4xx OpenAI error object: malformed JSON, undecodable
  base64 image, unknown content part, temperature out of range, ``n=2``, ``max_tokens=0``, a prompt
  over the context, an unknown model, a wrong API key (when a key is known), and an empty UI turn
  (a readable gradio error).
* disconnects: a raw socket that sends a streaming request and closes at once, and SSE streams
  closed after the first chunk or after the first token.

Every outcome is one of ``ok_correct``, ``ok_mismatch`` (well formed, not the reference),
``bad_request_rejected``, ``bad_request_accepted``, ``busy`` (429/503 with Retry-After; the
client backs off, bounded), ``disconnect_done`` and ``server_error`` (a 5xx other than busy, a
connection failure, a timeout, a malformed answer or an error event inside a good stream).
Time to first token (first reasoning or answer delta) is measured on good streams; resident
memory (VmRSS) at start, after warm-up, during the run and at the end. After the run /health
and one good request are checked again.

Files: ``options`` (kinds, outcomes, LoadConfig and its parser), ``target`` (the server under test),
``client`` (one simulated user, the request pool), ``answers`` (reading and judging answers),
``report`` (the JSON and the table), ``run`` (warm-up, the run, ``main``).
"""

from .options import OUTCOMES, LoadConfig, build_parser, parse_config
from .run import main, run_load

__all__ = ["OUTCOMES", "LoadConfig", "build_parser", "main", "parse_config", "run_load"]
