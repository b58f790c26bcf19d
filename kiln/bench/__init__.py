"""Benchmarks of the product: what `kiln bench` runs.

- `cli`: the `kiln bench` command (also `python -m kiln.bench`).
- `offline`: throughput of a batch added at once, batch-1 latency.
- `client`: the load generator for a running server (`kiln bench --url`).
- `workload`: random-weight engines at preset shapes, random prompts, greedy requests.
- `profile`: engine steps under the torch profiler (`kiln bench --profile`).

The GPU harness that runs these beside the peers and writes the reports is the repository's
`benchmarks/` folder.
"""
