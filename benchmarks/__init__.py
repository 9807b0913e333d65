"""Benchmarks and measurement scripts; run each from the repository root as ``python -m benchmarks.<name>`` (results in ``benchmarks/results/``)."""
