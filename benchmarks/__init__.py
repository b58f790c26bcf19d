"""Kiln's benchmark harness (run from the repository root: `python -m bench.run_all`); see benchmarks/README.md."""
