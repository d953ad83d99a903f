"""Benchmark scripts (run with ``python -m megacontext.bench.<name>``); not tests."""
