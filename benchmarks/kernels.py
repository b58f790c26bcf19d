"""Kernel microbenchmarks: each Triton kernel against its PyTorch reference and, for attention,
against torch's fused SDPA on contiguous (non-paged) K/V (its cuDNN and flash backends for prefill),
at Llama-2-7B / Llama-3.1-8B head shapes. The elementwise suite also times the per-token FP8 quantization
of o_proj's and down_proj's inputs (no reference: `tests/gpu/test_triton_quant.py` holds them to it).

Reported per case: median microseconds, and the rate that bounds the kernel (GB/s of HBM traffic
for the memory-bound ones, TFLOP/s for prefill attention). Run: `python -m benchmarks.kernels --out F`.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import Result, bench_graph_us, bench_us, write_results
from kiln.kernels import reference
from kiln.kernels.attention_metadata import AttentionMetadata

# (label, query heads, KV heads, head dim, dtype)
ATTENTION_SHAPES = [
    ("llama2-7b", 32, 32, 128, torch.float16),
    ("llama3.1-8b", 32, 8, 128, torch.bfloat16),
]
BLOCK_SIZE = 16
MAX_KV_BYTES = 8 << 30  # skip cases whose cache would not leave room for the baselines' copies


def paged_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, dtype, device="cuda"):
    """Random query/caches and metadata; each request's blocks are scattered through the pool."""
    bs = BLOCK_SIZE
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    per_seq = [-(-s // bs) for s in seq_lens]
    num_blocks = sum(per_seq) + 1
    order = torch.randperm(num_blocks - 1, device=device).to(torch.int32) + 1
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[used : used + n]
        used += n
    k_cache = torch.randn(num_blocks, bs, num_kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(sum(q_lens), num_heads, head_dim, device=device, dtype=dtype)
    meta = AttentionMetadata.for_batch(q_lens, seq_lens, tables, bs)
    return query, k_cache, v_cache, meta


def bench_decode_attention(results: list[Result]) -> None:
    from kiln.kernels.triton_attention import paged_attention

    for label, hq, hkv, d, dtype in ATTENTION_SHAPES:
        for batch in (1, 8, 64, 256):
            for ctx in (512, 4096):
                kv_bytes = 2 * batch * (ctx + 1) * hkv * d * 2
                if kv_bytes > MAX_KV_BYTES:
                    continue
                q, kc, vc, meta = paged_batch([1] * batch, [ctx] * batch, hq, hkv, d, dtype)
                case = f"{label} B={batch} ctx={ctx}"
                params = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}
                us = bench_us(partial(paged_attention, q, kc, vc, meta, d**-0.5))
                results.append(Result("kernels", "decode_attention/triton", case, "us", us, params))
                graph_us = bench_graph_us(partial(paged_attention, q, kc, vc, meta, d**-0.5))
                results.append(
                    Result("kernels", "decode_attention/triton_graph", case, "us", graph_us, params)
                )
                results.append(
                    Result(
                        "kernels",
                        "decode_attention/triton_graph",
                        case,
                        "GB_per_s",
                        kv_bytes / graph_us / 1e3,
                        params,
                    )
                )
                # torch SDPA on contiguous K/V: what attention costs without paging.
                k = torch.randn(batch, hkv, ctx + 1, d, device="cuda", dtype=dtype)
                v = torch.randn_like(k)
                q4 = q.view(batch, 1, hq, d).transpose(1, 2)
                sdpa = partial(F.scaled_dot_product_attention, q4, k, v, enable_gqa=hq != hkv)
                results.append(
                    Result(
                        "kernels",
                        "decode_attention/torch_sdpa_contiguous",
                        case,
                        "us",
                        bench_us(sdpa),
                        params,
                    )
                )
                results.append(
                    Result(
                        "kernels",
                        "decode_attention/torch_sdpa_contiguous_graph",
                        case,
                        "us",
                        bench_graph_us(sdpa),
                        params,
                    )
                )
                if batch <= 8:
                    us = bench_us(partial(reference.paged_attention, q, kc, vc, meta, d**-0.5), rep_ms=50)
                    results.append(Result("kernels", "decode_attention/reference", case, "us", us, params))


def _causal_flops(q_lens, ctx_lens, hq, d) -> float:
    # QK^T and PV: 2 matmuls x 2 flops per MAC; query j of a chunk sees ctx + j + 1 keys.
    return sum(4.0 * hq * d * q * (c + (q + 1) / 2) for q, c in zip(q_lens, ctx_lens, strict=True))


def bench_prefill_attention(results: list[Result]) -> None:
    """Prefill attention, TFLOP/s: the Triton kernel on the paged cache (and its transposed-key tile),
    what `kiln.kernels.paged_attention` runs (it hands long fresh prompts to cuDNN on Hopper), and
    torch SDPA's cuDNN and flash backends on contiguous K/V for the fresh prompts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kiln import kernels
    from kiln.kernels.triton_attention import default_config, paged_attention

    transposed = dataclasses.replace(default_config(False, 128), keys_transposed=True)
    cases = [
        ("4x1024 prefill", [1024] * 4, [0] * 4),
        ("1x4096 prefill", [4096], [0]),
        ("1x8192 prefill", [8192], [0]),
        ("1x32768 prefill", [32768], [0]),
        ("512 after 3584", [512], [3584]),
        ("8192 after 24576", [8192], [24576]),
    ]
    for label, hq, hkv, d, dtype in ATTENTION_SHAPES:
        for name, q_lens, ctx_lens in cases:
            q, kc, vc, meta = paged_batch(q_lens, ctx_lens, hq, hkv, d, dtype)
            flops = _causal_flops(q_lens, ctx_lens, hq, d)
            case = f"{label} {name}"

            def record(what: str, us: float, case: str = case, flops: float = flops) -> None:
                results.append(Result("kernels", f"prefill_attention/{what}", case, "us", us))
                results.append(
                    Result("kernels", f"prefill_attention/{what}", case, "TFLOP_per_s", flops / us / 1e6)
                )

            record("triton", bench_us(partial(paged_attention, q, kc, vc, meta, d**-0.5)))
            # A/B of the key-tile layout (the default loads [block_n, head_dim] and transposes).
            record(
                "triton_keys_transposed",
                bench_us(partial(paged_attention, q, kc, vc, meta, d**-0.5, config=transposed)),
            )
            record("kiln_dispatch", bench_us(partial(kernels.paged_attention, q, kc, vc, meta, d**-0.5)))
            if all(c == 0 for c in ctx_lens) and len(set(q_lens)) == 1:
                b, length = len(q_lens), q_lens[0]
                q4 = q.view(b, length, hq, d).transpose(1, 2)
                k = torch.randn(b, hkv, length, d, device="cuda", dtype=dtype)
                v = torch.randn_like(k)
                for backend, what in (
                    (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn"),
                    (SDPBackend.FLASH_ATTENTION, "sdpa_flash"),
                ):

                    def sdpa(backend=backend, q4=q4, k=k, v=v, gqa=hq != hkv):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=gqa)

                    record(f"{what}_contiguous", bench_us(sdpa))
                del k, v
            del q, kc, vc
            torch.cuda.empty_cache()


def bench_elementwise(results: list[Result]) -> None:
    from kiln.kernels import triton_activation, triton_cache, triton_norm

    tokens, hidden = 8192, 4096
    for label, dtype, inter, hq, hkv in [
        ("llama2-7b", torch.float16, 11008, 32, 32),
        ("llama3.1-8b", torch.bfloat16, 14336, 32, 8),
    ]:
        x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
        res = torch.randn_like(x)
        w = torch.randn(hidden, device="cuda", dtype=dtype)
        nbytes = 4 * x.numel() * x.element_size()
        for impl, fn in [("triton", triton_norm.rms_norm), ("reference", reference.rms_norm)]:
            us = bench_us(partial(fn, x, w, 1e-5, res))
            results.append(Result("kernels", f"add_rms_norm/{impl}", f"{label} T={tokens}", "us", us))
            results.append(
                Result(
                    "kernels", f"add_rms_norm/{impl}", f"{label} T={tokens}", "GB_per_s", nbytes / us / 1e3
                )
            )
        gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=dtype)
        nbytes = 3 * tokens * inter * gate_up.element_size()
        for impl, fn in [("triton", triton_activation.silu_and_mul), ("reference", reference.silu_and_mul)]:
            us = bench_us(partial(fn, gate_up))
            results.append(Result("kernels", f"silu_and_mul/{impl}", f"{label} T={tokens}", "us", us))
            results.append(
                Result(
                    "kernels", f"silu_and_mul/{impl}", f"{label} T={tokens}", "GB_per_s", nbytes / us / 1e3
                )
            )
        _bench_activation_quant(results, label, x, gate_up)
        d = 128
        qkv = torch.randn(tokens, hq + 2 * hkv, d, device="cuda", dtype=dtype)
        q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
        num_blocks = tokens // BLOCK_SIZE + 1
        kc = torch.empty(num_blocks, BLOCK_SIZE, hkv, d, device="cuda", dtype=dtype)
        vc = torch.empty_like(kc)
        slots = torch.randperm(tokens, device="cuda") + BLOCK_SIZE
        positions = torch.arange(tokens, device="cuda")
        table = torch.randn(tokens, d, device="cuda")
        nbytes = (2 * hq + 4 * hkv) * d * tokens * x.element_size()

        args = (positions, q, k, v, table, kc, vc, slots)
        for impl, fn in [
            ("triton_fused", triton_cache.rotary_store_kv),
            ("reference", _reference_rotary_store),
        ]:
            us = bench_us(partial(fn, *args))
            results.append(Result("kernels", f"rotary_store_kv/{impl}", f"{label} T={tokens}", "us", us))
            results.append(
                Result(
                    "kernels", f"rotary_store_kv/{impl}", f"{label} T={tokens}", "GB_per_s", nbytes / us / 1e3
                )
            )


def _bench_activation_quant(
    results: list[Result], label: str, x: torch.Tensor, gate_up: torch.Tensor
) -> None:
    """Per-token FP8 quantization of o_proj's input (x) and of down_proj's (SiLU-and-mul of gate_up, fused)
    at a decode batch (512 tokens) and a prefill step (all of x's)."""
    from kiln.kernels.triton_quant_act import quantize_rows, silu_and_mul_quant

    fp8 = torch.float8_e4m3fn
    for tokens in (512, x.shape[0]):
        a, g = x[:tokens], gate_up[:tokens]
        for name, fn, nbytes in [
            ("quantize_rows_fp8", partial(quantize_rows, a, fp8), a.numel() * (a.element_size() + 1)),
            (
                "silu_and_mul_quant_fp8",
                partial(silu_and_mul_quant, g, fp8),
                g.numel() * g.element_size() * 5 // 4,
            ),
        ]:
            us = bench_us(fn)
            results.append(Result("kernels", f"{name}/triton", f"{label} T={tokens}", "us", us))
            results.append(
                Result("kernels", f"{name}/triton", f"{label} T={tokens}", "GB_per_s", nbytes / us / 1e3)
            )


def bench_tuning(results: list[Result]) -> None:
    """Sweep the attention tile shapes and the decode split count (CUDA-graph timing: GPU time only)."""
    from kiln.kernels.triton_attention import AttentionConfig, paged_attention

    _, hq, hkv, d, dtype = ATTENTION_SHAPES[1]
    prefill_cases = [("4x1024 prefill", [1024] * 4, [0] * 4), ("512 after 3584", [512], [3584])]
    for name, q_lens, ctx_lens in prefill_cases:
        q, kc, vc, meta = paged_batch(q_lens, ctx_lens, hq, hkv, d, dtype)
        flops = _causal_flops(q_lens, ctx_lens, hq, d)
        for bm in (64, 128):
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        config = AttentionConfig(bm, bn, warps, stages)
                        try:
                            us = bench_us(partial(paged_attention, q, kc, vc, meta, d**-0.5, config=config))
                        except Exception as exc:  # e.g. out of shared memory for this tile shape
                            print(f"config {config} failed: {type(exc).__name__}")
                            continue
                        params = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
                        results.append(
                            Result(
                                "tuning",
                                "prefill_attention",
                                f"llama3.1-8b {name}",
                                "TFLOP_per_s",
                                flops / us / 1e6,
                                params,
                            )
                        )
    for batch, ctx in ((1, 4096), (1, 512), (8, 512), (64, 4096)):
        q, kc, vc, meta = paged_batch([1] * batch, [ctx] * batch, hq, hkv, d, dtype)
        kv_bytes = 2 * batch * (ctx + 1) * hkv * d * 2
        case = f"llama3.1-8b B={batch} ctx={ctx}"
        for splits in (1, 2, 4, 8, 16, 32):
            us = bench_graph_us(partial(paged_attention, q, kc, vc, meta, d**-0.5, num_splits=splits))
            results.append(
                Result(
                    "tuning",
                    "decode_splits",
                    case,
                    "us_graph",
                    us,
                    {"num_splits": splits, "kv_bytes": kv_bytes},
                )
            )
        for bn in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 4):
                    config = AttentionConfig(16, bn, warps, stages)
                    us = bench_graph_us(partial(paged_attention, q, kc, vc, meta, d**-0.5, config=config))
                    params = {"block_n": bn, "num_warps": warps, "num_stages": stages}
                    results.append(Result("tuning", "decode_config", case, "us_graph", us, params))
        us = bench_us(partial(paged_attention, q, kc, vc, meta, d**-0.5))
        results.append(Result("tuning", "decode_default_with_launch", case, "us", us))
        us = bench_graph_us(partial(paged_attention, q, kc, vc, meta, d**-0.5))
        results.append(Result("tuning", "decode_default", case, "us_graph", us))


def _reference_rotary_store(positions, q, k, v, table, k_cache, v_cache, slots):
    q, k = reference.apply_rotary(positions, q, k, table)
    reference.store_kv(k, v, k_cache, v_cache, slots)
    return q


def _warm_up_gpu(seconds: float = 1.0) -> None:
    """Run matmuls for a second so the first measured case does not pay for clocks ramping up."""
    import time

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


SUITES = {
    "decode": bench_decode_attention,
    "prefill": bench_prefill_attention,
    "elementwise": bench_elementwise,
    "tune": bench_tuning,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    parser.add_argument(
        "--suites", nargs="+", choices=sorted(SUITES), default=["decode", "prefill", "elementwise"]
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    _warm_up_gpu()
    results: list[Result] = []
    for name in args.suites:
        SUITES[name](results)
        torch.cuda.empty_cache()
    write_results(args.out, results)
    for r in results:
        print(f"{r.name:45s} {r.shape:32s} {r.metric:12s} {r.value:10.1f}")


if __name__ == "__main__":
    main()
