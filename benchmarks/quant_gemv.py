"""The quantized kernels beside the 16-bit ones: batch-1 GEMVs (time and weight TB/s) at the Llama-2-7B and
Llama-3.1-8B projection shapes, and GEMM TFLOP/s at M = 256, 1024 and 4096 tokens.

    python -m benchmarks.quant_gemv --out results.json [--sweep] [--skip-gemm]

GEMV (one token, L2 cold: each case cycles through enough weight copies, >= 256 MB, inside a CUDA graph,
as `benchmarks.gemv` does): the 16-bit Triton GEMV (kiln.kernels.triton_gemv) against the quantized GEMV
(kiln.kernels.triton_quant_gemv) with int8 per-channel, int8 in groups of 128 and FP8 weights, and the
W8A8 path (per-token int8 quantization, then the W8A8 GEMV: two launches), and the int8 and FP8 GEMVs with
`bit_widen` (weights widened by integer operations, not conversion instructions). TB/s counts the weight bytes
and scales read. Then each decode step's sum over the 4 quantized projections x 32 layers (lm_head, 16-bit
in every scheme, left out). `--sweep` also times (BLOCK_N, BLOCK_K, warps) tiles of the int8 and FP8
GEMVs, each with its default widening.

GEMM (CUDA-graph replay, L2 warm, as a prefill or a large decode batch runs them): bf16 cuBLAS
(`F.linear`) against FP8 `torch._scaled_mm` with row-wise scales and the engine's accumulator
(`FAST_ACCUM`; the GEMM alone, and with the per-token quantization of x it needs; and alone with either
accumulator), int8 `torch._int_mm` + the Triton epilogue (with and without quantization), the Triton W8A8
GEMM and the Triton int8 weight-only GEMM, at the 8B gate_up (28672 x 4096) and o_proj (4096 x 4096)
shapes. TFLOP/s = 2 M N K / time.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import Result, bench_graph_us, write_results
from kiln.kernels import quant_reference as qr
from kiln.kernels.triton_gemv import gemv
from kiln.kernels.triton_quant_act import quantize_rows
from kiln.kernels.triton_quant_gemm import quant_gemm, scale_int32
from kiln.kernels.triton_quant_gemv import quant_gemv
from kiln.kernels.triton_quant_linear import FAST_ACCUM

# (model, projection, N, K); every projection runs once per layer, 32 layers in both models.
GEMV_SHAPES = [
    ("llama2-7b", "qkv_proj", 12288, 4096),
    ("llama2-7b", "o_proj", 4096, 4096),
    ("llama2-7b", "gate_up_proj", 22016, 4096),
    ("llama2-7b", "down_proj", 4096, 11008),
    ("llama3.1-8b", "qkv_proj", 6144, 4096),
    ("llama3.1-8b", "o_proj", 4096, 4096),
    ("llama3.1-8b", "gate_up_proj", 28672, 4096),
    ("llama3.1-8b", "down_proj", 4096, 14336),
]
LAYERS = 32
GEMM_SHAPES = [("gate_up_proj", 28672, 4096), ("o_proj", 4096, 4096)]
GEMM_TOKENS = [256, 1024, 4096]
FLUSH_BYTES = 256 << 20
SWEEP = [
    (2, 1024, 2),
    (2, 1024, 1),
    (2, 512, 1),
    (4, 1024, 4),
    (4, 1024, 2),
    (4, 512, 2),
    (2, 2048, 4),
    (4, 2048, 8),
    (8, 1024, 8),
    (2, 4096, 8),
]


def _cycled_us(fn_for_copy: Callable[[int], object], copies: int) -> float:
    def run() -> None:
        for i in range(copies):
            fn_for_copy(i)

    return bench_graph_us(run, warmup_ms=5, rep_ms=40) / copies


def bench_gemv_shape(model: str, name: str, n: int, k: int, sweep: bool, results: list[Result]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.float16)
    cases: dict[str, tuple[list[tuple[torch.Tensor, ...]], Callable]] = {}
    copies16 = max(2, math.ceil(FLUSH_BYTES / (n * k * 2)))
    copies8 = max(2, math.ceil(FLUSH_BYTES / (n * k)))
    w16 = [w.half() for _ in range(copies16)]
    cases["fp16"] = ([(t,) for t in w16], lambda t: gemv(x, t))
    q, s = qr.quantize_int8(w)
    qg, sg = qr.quantize_int8(w, 128)
    q8, s8 = qr.quantize_fp8(w)
    del w
    cases["int8_wo"] = (
        [(q.clone(), s.clone()) for _ in range(copies8)],
        lambda t, s_: quant_gemv(x, t, s_, bit_widen=False),
    )
    cases["int8_wo_g128"] = (
        [(qg.clone(), sg.clone()) for _ in range(copies8)],
        lambda t, s_: quant_gemv(x, t, s_),
    )
    cases["fp8"] = (
        [(q8.clone(), s8.clone()) for _ in range(copies8)],
        lambda t, s_: quant_gemv(x, t, s_, bit_widen=False),
    )
    # The same weights widened by integer operations instead of conversion instructions (bit_widen).
    cases["int8_wo_bits"] = (cases["int8_wo"][0], lambda t, s_: quant_gemv(x, t, s_, bit_widen=True))
    cases["fp8_bits"] = (cases["fp8"][0], lambda t, s_: quant_gemv(x, t, s_, bit_widen=True))

    def w8a8(t: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x, torch.int8)
        return quant_gemv(xq, t, s_, x_scale=xs, out_dtype=torch.float16)

    cases["int8_sq"] = (cases["int8_wo"][0], w8a8)
    times = {}
    for label, (weights, fn) in cases.items():
        t = _cycled_us(lambda i, fn=fn, weights=weights: fn(*weights[i]), len(weights))
        nbytes = sum(a.numel() * a.element_size() for a in weights[0])
        times[label] = t
        results.append(
            Result(
                "quant_gemv", f"gemv/{label}", f"{model} {name} {n}x{k}", "us", t, {"tb_s": nbytes / t / 1e6}
            )
        )
        print(f"{model:12s} {name:13s} {label:13s} {t:8.1f} us {nbytes / t / 1e6:5.2f} TB/s", flush=True)
    for scheme in ("int8_wo", "fp8") if sweep else ():
        weights = cases[scheme][0]
        for bn, bk, warps in SWEEP:
            cfg = (bn, bk, warps, 1)
            t = _cycled_us(lambda i, c=cfg, w=weights: quant_gemv(x, *w[i], config=c), len(weights))
            results.append(
                Result("quant_gemv", f"gemv/{scheme}_sweep", f"{model} {name}", "us", t, {"config": cfg})
            )
            print(
                f"{model:12s} {name:13s} {scheme:7s} {cfg!s:20s} {t:8.1f} us {n * k / t / 1e6:5.2f} TB/s",
                flush=True,
            )
    return times


def _gemm_cases(
    x: torch.Tensor, wb: torch.Tensor, q: torch.Tensor, s: torch.Tensor, q8: torch.Tensor, s8: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """The GEMMs of x [M, K] bf16 against one weight: bf16 `wb`, int8 `q`/`s`, FP8 `q8`/`s8`."""
    xq8, xs8 = quantize_rows(x, torch.float8_e4m3fn)
    xq, xs = quantize_rows(x, torch.int8)

    def scaled_mm(a: torch.Tensor, sa: torch.Tensor, fast: bool = FAST_ACCUM) -> torch.Tensor:
        return torch._scaled_mm(
            a, q8.t(), scale_a=sa.view(-1, 1), scale_b=s8.view(1, -1), out_dtype=x.dtype, use_fast_accum=fast
        )

    def int_mm(a: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
        return scale_int32(torch._int_mm(a, q.t()), sa, s, None, x.dtype)

    return {
        "bf16_cublas": lambda: F.linear(x, wb),
        "fp8_scaled_mm": lambda: scaled_mm(xq8, xs8),
        "fp8_scaled_mm+quant": lambda: scaled_mm(*quantize_rows(x, torch.float8_e4m3fn)),
        "fp8_scaled_mm_fast_accum": lambda: scaled_mm(xq8, xs8, fast=True),
        "fp8_scaled_mm_float32_sums": lambda: scaled_mm(xq8, xs8, fast=False),
        "int8_int_mm+epilogue": lambda: int_mm(xq, xs),
        "int8_int_mm+quant": lambda: int_mm(*quantize_rows(x, torch.int8)),
        "int8_triton_w8a8": lambda: quant_gemm(xq, q, s, x_scale=xs, out_dtype=x.dtype),
        "int8_triton_wo": lambda: quant_gemm(x, q, s),
    }


def bench_gemm(results: list[Result]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, n, k in GEMM_SHAPES:
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        wb = w.bfloat16()
        q, s = qr.quantize_int8(w)
        q8, s8 = qr.quantize_fp8(w)
        del w
        for m in GEMM_TOKENS:
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            for label, fn in _gemm_cases(x, wb, q, s, q8, s8).items():
                t = bench_graph_us(fn, warmup_ms=10, rep_ms=50)
                tflops = 2 * m * n * k / t / 1e6
                results.append(
                    Result(
                        "quant_gemm", f"gemm/{label}", f"{name} M={m} {n}x{k}", "us", t, {"tflop_s": tflops}
                    )
                )
                print(f"gemm {name:13s} M={m:5d} {label:22s} {t:9.1f} us {tflops:7.1f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--sweep", action="store_true", help="also time a few tiles of the int8 GEMV")
    p.add_argument("--skip-gemm", action="store_true", help="the GEMVs only")
    args = p.parse_args(argv)
    results: list[Result] = []
    per_model: dict[str, dict[str, float]] = {}
    for model, name, n, k in GEMV_SHAPES:
        times = bench_gemv_shape(model, name, n, k, args.sweep, results)
        for label, t in times.items():
            per_model.setdefault(model, {}).setdefault(label, 0.0)
            per_model[model][label] += t * LAYERS / 1000
        torch.cuda.empty_cache()
    for model, totals in per_model.items():
        for label, ms in totals.items():
            results.append(Result("quant_gemv", f"decode_step_gemvs/{label}", model, "ms", ms))
            print(f"{model} decode step, quantized projections x {LAYERS}: {label:13s} {ms:.3f} ms")
    if not args.skip_gemm:
        bench_gemm(results)
    if args.out:
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
