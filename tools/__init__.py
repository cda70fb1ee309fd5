"""Benchmarks and the load test: entry-point scripts (``python -m tools.bench ...``), each prints a table
and writes JSON. Not part of the installed package and never run as timed tests."""
