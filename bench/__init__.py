"""Benchmarks, run as modules from the repository root (`python -m bench.scoring`); never part of
the tests."""
