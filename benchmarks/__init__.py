"""Benchmarks of maestro_jax: every figure a ratio against a baseline timed in the same process.

Run ``python -m benchmarks`` (full, writes ``benchmarks/RESULTS.md`` and
``benchmarks/results.json``) or ``python -m benchmarks --small`` (a quick
version for CI, written to ``benchmarks/results/``). See :mod:`benchmarks.suite`
for what is measured and :mod:`benchmarks.timing` for how.
"""
