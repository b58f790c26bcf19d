"""Kiln's benchmark harness (run from the repository root: `python -m bench.run_all`); see bench/README.md."""
