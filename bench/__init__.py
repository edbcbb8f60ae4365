"""Benchmarks: each `python -m bench.<name>` prints its numbers and ends with one JSON line."""
