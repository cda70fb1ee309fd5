"""Benchmarks and the load test: entry-point scripts, each with its own parser, each printing a table and
writing JSON (``python -m tools.bench engine ...``, ``python -m tools.loadtest ...``). Not part of the
installed package and never run as timed tests."""
