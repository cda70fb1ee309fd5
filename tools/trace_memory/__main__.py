"""``python -m tools.trace_memory``."""

from .run import main

main()
