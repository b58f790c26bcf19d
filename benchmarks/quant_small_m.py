"""Quantized products of a decode batch (1 to 16 tokens): the GEMV and today's dispatch against the
tensor-core GEMM (`kiln.kernels.triton_quant_gemm.quant_gemm`) over a sweep of narrow tiles.

    python -m benchmarks.quant_small_m --out results.json [--tokens 1 16] [--modes fp8 int8_wo]

Why: a batch-1 step of an 8-bit engine streams half the bytes of a 16-bit one, but the CUDA-core GEMV
widens every weight byte to float32 before its multiply-add, and the GPU converts types at a fraction of
its FMA rate; the tensor-core GEMM multiplies 8-bit operands (FP8, W8A8) or weights widened only to 16
bits (weight-only) instead. Which is faster at which tile is measured here, not assumed.

Each case runs L2-cold (cycling through >= 256 MB of weight copies inside a CUDA graph, as
`benchmarks.quant_gemv` does) at the Llama-2-7B projections (and the Llama-3.1-8B ones with `--models`).
Modes, each beside what the dispatch runs (`kiln.kernels.*_linear`, "baseline"; `gemm_config`'s tiles):
- `int8_wo`: int8 weight per channel, x 16-bit (baseline: the GEMV at 1 token, the GEMM above);
- `int8_wo_bits`: the same, its tiles widened by integer operations (`quant_gemm(..., bit_widen=True)`);
- `fp8_wo`: e4m3 weight widened to x's dtype, x 16-bit (baseline: `kiln.kernels.fp8_linear`, which runs
  this up to 16 tokens);
- `fp8`: x quantized per token to e4m3 (`quantize_rows`, timed with it), e4m3 x e4m3 products (baseline:
  `kiln.kernels.fp8_linear`);
- `int8_sq`: x quantized to int8 (timed with it), int8 x int8 (baseline: `kiln.kernels.int8_sq_linear`).
Reported per mode and tile: microseconds per projection, weight TB/s, and the sum over a decode step's
projections (x 32 layers); the best tile per mode; the float16 GEMV of the same shapes beside them.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.quant_gemv import FLUSH_BYTES, GEMV_SHAPES, LAYERS
from benchmarks.timing import Result, bench_graph_us, write_results
from kiln import kernels
from kiln.kernels import quant_reference as qr
from kiln.kernels.triton_gemv import gemv
from kiln.kernels.triton_quant_act import quantize_rows
from kiln.kernels.triton_quant_gemm import quant_gemm

MODES = ("fp8", "int8_wo", "int8_wo_bits", "fp8_wo", "int8_sq")
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SWAP)
TILES = [
    (16, bn, bk, 8, 4, 4, swap)
    for bn, bk, swap in itertools.product((16, 32, 64), (128, 256, 512), (False, True))
]


def _cycled_us(fn: Callable[[int], object], copies: int) -> float:
    def run() -> None:
        for i in range(copies):
            fn(i)

    return bench_graph_us(run, warmup_ms=5, rep_ms=30) / copies


def _mode_fns(mode: str, x: torch.Tensor) -> tuple[Callable, Callable]:
    """(baseline(q, s), tiled(q, s, config)) for one mode; both include the activation quantization."""
    if mode == "int8_wo":
        return (lambda q, s: kernels.int8_wo_linear(x, q, s)), (
            lambda q, s, c: quant_gemm(x, q, s, config=c, bit_widen=False)
        )
    if mode == "int8_wo_bits":
        return (lambda q, s: kernels.int8_wo_linear(x, q, s)), (
            lambda q, s, c: quant_gemm(x, q, s, config=c, bit_widen=True)
        )
    if mode == "fp8_wo":
        return (lambda q, s: kernels.fp8_linear(x, q, s)), (lambda q, s, c: quant_gemm(x, q, s, config=c))
    if mode == "fp8":

        def fp8(q: torch.Tensor, s: torch.Tensor, c: tuple) -> torch.Tensor:
            xq, xs = quantize_rows(x, torch.float8_e4m3fn)
            return quant_gemm(xq, q, s, x_scale=xs, out_dtype=x.dtype, config=c)

        return (lambda q, s: kernels.fp8_linear(x, q, s)), fp8

    def w8a8(q: torch.Tensor, s: torch.Tensor, c: tuple) -> torch.Tensor:
        xq, xs = quantize_rows(x, torch.int8)
        return quant_gemm(xq, q, s, x_scale=xs, out_dtype=x.dtype, config=c)

    return (lambda q, s: kernels.int8_sq_linear(x, q, s)), w8a8


def bench_shape(
    model: str, name: str, n: int, k: int, m: int, modes: list[str], results: list[Result]
) -> dict[str, float]:
    """Times (us) keyed "mode/baseline", "mode/<tile>" and "fp16_gemv" for one projection shape."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.float16)
    copies = max(2, math.ceil(FLUSH_BYTES / (n * k)))
    times: dict[str, float] = {}
    where = f"{model} {name} {n}x{k} M={m}"
    if m == 1:
        w16 = [w.half() for _ in range(max(2, copies // 2))]
        times["fp16_gemv"] = _cycled_us(lambda i: gemv(x, w16[i]), len(w16))
        del w16
    int8 = [qr.quantize_int8(w) for _ in range(copies)]
    fp8 = [qr.quantize_fp8(w) for _ in range(copies)]
    del w
    for mode in modes:
        weights = fp8 if mode.startswith("fp8") else int8
        baseline, tiled = _mode_fns(mode, x)
        times[f"{mode}/baseline"] = _cycled_us(lambda i, f=baseline, ws=weights: f(*ws[i]), copies)
        for tile in TILES:
            try:
                t = _cycled_us(lambda i, f=tiled, ws=weights, c=tile: f(*ws[i], c), copies)
            except Exception as exc:  # a tile the compiler refuses (shared memory, layout): reported, skipped
                print(f"{where} {mode} {tile}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            times[f"{mode}/{tile}"] = t
    for label, t in times.items():
        weight_bytes = n * k * (2 if label == "fp16_gemv" else 1)  # the 16-bit GEMV reads two bytes a weight
        results.append(Result("quant_small_m", label, where, "us", t, {"tb_s": weight_bytes / t / 1e6}))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--models", nargs="+", default=["llama2-7b"])
    args = p.parse_args(argv)
    for m in args.tokens:
        results: list[Result] = []
        step: dict[str, float] = {}
        seen: dict[str, int] = {}
        for model, name, n, k in GEMV_SHAPES:
            if model not in args.models:
                continue
            for label, t in bench_shape(model, name, n, k, m, args.modes, results).items():
                step[f"{model} {label}"] = step.get(f"{model} {label}", 0.0) + t * LAYERS / 1000
                seen[f"{model} {label}"] = seen.get(f"{model} {label}", 0) + 1
            torch.cuda.empty_cache()
        shapes = {model: sum(s[0] == model for s in GEMV_SHAPES) for model in args.models}
        step = {label: ms for label, ms in step.items() if seen[label] == shapes[label.split(" ")[0]]}
        for mode in ["fp16_gemv", *args.modes]:
            for model in args.models:
                # "mode/" and the bare "fp16_gemv": "fp8" must not take "fp8_wo/..." (nor int8_wo "int8_wo_bits/...")
                mine = {
                    label: ms
                    for label, ms in step.items()
                    if label.startswith(f"{model} {mode}/") or label == f"{model} {mode}"
                }
                if not mine:
                    continue
                best = min(mine, key=mine.get)
                base = mine.get(f"{model} {mode}/baseline")
                results.append(
                    Result(
                        "quant_small_m", f"step/{best.split(' ', 1)[1]}", f"{model} M={m}", "ms", mine[best]
                    )
                )
                print(f"M={m} {model} {mode:9s} best {best.split(' ', 1)[1]:45s} {mine[best]:7.3f} ms a step"
                      + (f" (baseline {base:.3f})" if base is not None else ""), flush=True)  # fmt: skip
        if args.out:
            write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
