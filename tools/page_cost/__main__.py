"""``python -m tools.page_cost``."""

from .run import main

main()
