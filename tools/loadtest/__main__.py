"""``python -m tools.loadtest``."""

from .run import main

main()
