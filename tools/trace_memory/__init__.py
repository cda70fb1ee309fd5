"""The page's focus-trace memory against ``--trace-memory-mb`` (issue 18).

    python -m tools.trace_memory [--turns 20] [--tokens 1000] [--sessions 5] [--trace-memory-mb 512]
                                 [--real-tokens 0] [--out bench-results/trace_memory.json]

Drives ``--turns`` turns of ``--tokens`` generated tokens each, spread round robin over ``--sessions``
browser sessions of one page's ``SessionStore`` (and so one ``TraceBudget``), through the page's own
session code: ``Session.start`` then ``stream_turn``, which folds every event into the turn with
``Turn.apply`` and counts its focus with the budget, exactly as a page turn does. The events are
synthetic, of the real shape: per token one ``Answer`` and one ``Focus`` whose per-layer stack is a fresh
(layers, patches) float32 array split into (layers, rows, cols) as ``engine/probes.py`` splits it, with the
engine's mean over layers as the shown map. The shape is that of a 40-layer random AutoGLM with a 24 x 24
patch grid (``SCALE``: built with ``autoglm_app.modeling.small.build_small(**SCALE)``, image 384 / patch 16).
Real generation at that size runs about 30 ms a token on a 2-core CPU, so 20,000 tokens would take ten
minutes; the memory path (Turn.apply, the budget) is the same for synthetic events. ``--real-tokens N``
first generates N tokens with that real model in a child process and checks that its Focus events have
the synthetic ones' shapes and dtypes (a child, so the model's freed memory cannot hide the traces' growth).

Measured: this process's resident memory (psutil, ``autoglm_app.memory``) before the first turn and every
``--sample-every`` tokens; the growth's peak against the budget; the budget's own count of per-layer detail
and shown maps (``ndarray.nbytes``); tokens whose detail is whole, coarsened or dropped. Target (issue
18): growth within the budget + 10 %. The input image is one object shared by every turn, so the growth is
the traces' (and the turns' per-token records, which no budget counts).
"""

from .run import main

__all__ = ["main"]
