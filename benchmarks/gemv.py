"""Batch-1 decode GEMVs: cuBLAS against Kiln's Triton GEMV (kiln.kernels.triton_gemv) over a
sweep of tile configs and its default config, at the Llama-2-7B fp16 weight shapes.

    python -m benchmarks.gemv --out results.json

Each case cycles through enough distinct weight copies (>= 256 MB) that L2 holds none of them, inside a
CUDA graph, so the time is that of streaming the weights from HBM, as in a decode step. Reported: µs per
GEMV and TB/s of weight read; then the per-step total of the 7B model's GEMVs (32 layers + lm_head) for
cuBLAS, for the best Triton config of each shape and for the default config the model uses.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import Result, bench_graph_us, write_results
from kiln.kernels.triton_gemv import gemv

# (name, N, K, calls per decode step) for Llama-2-7B
SHAPES = [
    ("qkv_proj", 12288, 4096, 32),
    ("o_proj", 4096, 4096, 32),
    ("gate_up_proj", 22016, 4096, 32),
    ("down_proj", 4096, 11008, 32),
    ("lm_head", 32000, 4096, 1),
]
FLUSH_BYTES = 256 << 20


def configs(quick: bool) -> list[tuple[int, int, int, int]]:
    out = []
    # Software pipelining (num_stages 3) measured the same as 1 on every shape: the loop has few trips.
    for bn, bk, warps in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096, 8192), (4, 8, 16)):
        if bn * bk > 16384 or bn * bk < 1024 or (warps == 16 and bk < 4096):
            continue
        out.append((bn, bk, warps, 1))
    return out[:4] if quick else out


def timed(fn_for_copy, copies: int) -> float:
    """µs per call of fn_for_copy(i), cycled over `copies` inputs in one graph."""

    def run() -> None:
        for i in range(copies):
            fn_for_copy(i)

    return bench_graph_us(run, warmup_ms=5, rep_ms=40) / copies


def bench_shape(
    name: str, n: int, k: int, sweep: list[tuple[int, int, int, int]], results: list[Result]
) -> dict[str, float]:
    """Time cuBLAS and every Triton config on an [n, k] weight; returns µs of cuBLAS (the faster of
    linear and mv), the best Triton config, and the default one."""
    dtype = torch.float16
    nbytes = n * k * 2
    copies = max(2, math.ceil(FLUSH_BYTES / nbytes))
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=dtype, generator=gen)
    expect = F.linear(x.float(), weights[0].float())

    def record(label: str, t: float, **params: object) -> float:
        results.append(
            Result("gemv", f"{name}/{label}", f"{n}x{k}", "us", t, {**params, "tb_s": nbytes / t / 1e6})
        )
        return t

    def show(label: str, t: float) -> None:
        print(f"{name:13s} {label:28s} {t:8.1f} us {nbytes / t / 1e6:5.2f} TB/s", flush=True)

    times = {"cublas_linear": timed(lambda i: F.linear(x, weights[i]), copies)}
    times["cublas_mv"] = timed(lambda i: torch.mv(weights[i], x[0]), copies)
    best: tuple[float, tuple[int, int, int, int]] | None = None
    for cfg in sweep:
        got = gemv(x, weights[0], config=cfg).float()
        err = ((got - expect).abs().max() / expect.abs().max()).item()
        if err > 1e-2:
            print(f"{name} {cfg}: WRONG (rel err {err:.3g})")
            continue
        t = record("triton", timed(lambda i, c=cfg: gemv(x, weights[i], config=c), copies), config=cfg)
        if best is None or t < best[0]:
            best = (t, cfg)
    assert best is not None, f"no config computed {name} correctly"
    times["triton_default"] = timed(lambda i: gemv(x, weights[i]), copies)
    for label in ("cublas_linear", "cublas_mv", "triton_default"):
        record(label, times[label])
        show(label, times[label])
    show(f"triton best {best[1]}", best[0])
    return {
        "cublas": min(times["cublas_linear"], times["cublas_mv"]),
        "triton_best": best[0],
        "triton_default": times["triton_default"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="four configs (a smoke test)")
    args = p.parse_args(argv)
    results: list[Result] = []
    per_shape = {}
    for name, n, k, _ in SHAPES:
        per_shape[name] = bench_shape(name, n, k, configs(args.quick), results)
        torch.cuda.empty_cache()
    weight_bytes = sum(n * k * 2 * calls for _, n, k, calls in SHAPES)
    for label in ("cublas", "triton_best", "triton_default"):
        ms = sum(per_shape[name][label] * calls for name, _, _, calls in SHAPES) / 1000
        tb_s = weight_bytes / ms / 1e9
        results.append(Result("gemv", f"decode_step_gemvs/{label}", "llama2-7b", "ms", ms, {"tb_s": tb_s}))
        print(f"7B decode step GEMVs, {label}: {ms:.3f} ms ({tb_s:.2f} TB/s)")
    if args.out:
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
