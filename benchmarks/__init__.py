"""Kiln's benchmark harness (run from the repository root: `python -m benchmarks.<script>`); see benchmarks/README.md."""
