"""Helpers for `scripts/bench.py`: a fast upstream, a gateway runner and a load generator,
each run as its own process."""
