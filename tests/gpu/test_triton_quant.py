"""The quantized GPU kernels against kiln.kernels.quant_reference, on random shapes, and a tiny quantized
engine on CUDA against the reference path.

Covered: per-token activation quantization (int8 with and without SmoothQuant's division, FP8); the
batch-1 GEMV (int8 per channel and per group, FP8 weight, W8A8); the Triton int8 GEMM (weight-only per
channel and per group, W8A8); the dispatch `kiln.kernels.*_linear` at 1, 2, 7, 16, 33 and 256 tokens
(which reaches torch._scaled_mm and torch._int_mm); CUDA-graph capture; and end to end, a `kiln build
--tiny --quantization` engine in float16 on CUDA. Shapes include N and K that are not multiples of any
block (the masked paths) and even ones (the unmasked paths), in float16 and bfloat16.

Tolerances (relative Frobenius error, `rel_error`), and why:
- Weight-only and the FP8 GEMV against F.linear in float64 over the reference's dequantized weight:
  2e-3 in float16, 1.6e-2 in bfloat16, the bounds of the 16-bit GEMV's test (tests/gpu/test_triton_gemv.py):
  the kernels sum in float32 and round once to the output dtype.
- The FP8 GEMV against `fp8_linear`: 0.06. The GEMV keeps x in 16 bits; the reference rounds x to e4m3
  (3 mantissa bits, about 2.6% relative error per element, measured 2.7% on these random shapes).
- FP8 through torch._scaled_mm: the activations must be the reference's bit for bit (`torch.equal`); the
  product against the same quantized operands multiplied in float64: with float32 sums 2e-3 / 1.6e-2 (one
  output rounding, and for float16 on a cuBLAS without float16 row-wise output, a bfloat16 rounding
  first: 2^-9); with the tensor core's reduced-precision sums (the default, `FAST_ACCUM`) 5e-3 in float16,
  twice what they measured at K = 14,336 (2.9e-3 besides the output's rounding, H100).
- W8A8 (`int8_sq`): the same integers are summed exactly and scaled in float32 in the reference's order,
  so the result equals the reference but for rare one-unit roundings: 1e-4.
Under TRITON_INTERPRET=1 (CPU) the Triton kernels run with small shapes; torch._scaled_mm, torch._int_mm,
the dispatch, CUDA graphs and the engine need a GPU, and bfloat16 is skipped (kernel_cases.DTYPES).
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import DTYPES, INTERPRET, force_one_pass, greedy_agreement, rel_error

from kiln import kernels
from kiln.kernels import quant_reference as qr

pytestmark = pytest.mark.gpu
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FP8_GEMV_VS_REFERENCE = 0.06
W8A8_BOUND = 1e-4
FAST_ACCUM_BOUND = {torch.float16: 5e-3, torch.bfloat16: 1.6e-2}
needs_cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (N, K): ragged ones take the masked paths; 4096 x 4096 and the 7B shapes the unmasked ones.
SHAPES = [(64, 128), (70, 100), (33, 96), (48, 320)]
if not INTERPRET:
    SHAPES += [(4096, 4096), (1000, 4000), (12288, 4096), (4096, 11008)]
TOKENS = [2, 7, 17] if INTERPRET else [2, 7, 16, 33, 256]


def _case(device, n, k, dtype, m=1, seed=0):
    gen = torch.Generator().manual_seed(seed + n * k + m)
    w = torch.randn(n, k, generator=gen) / k**0.5
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    smooth = torch.rand(k, generator=gen) + 0.5
    return w.to(device), x.to(device), bias.to(device), smooth.to(device)


def _groups(k: int) -> list[int]:
    return [g for g in (16, 64, 128) if k % g == 0]


def _weight_only_exact(x, q, scale, bias):
    """F.linear in float64 over the weight the reference dequantizes (to x's dtype)."""
    w = qr.dequantize_int8(q, scale, x.dtype).double()
    return torch.nn.functional.linear(x.double(), w, None if bias is None else bias.double())


def _fp8_exact(xq, x_scale, q, scale, bias):
    out = (xq.double() @ q.double().t()) * x_scale.double()[:, None] * scale.double()[None, :]
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("one_pass", [None, True, False])  # None: the measured choice; else forced
def test_quantize_rows_is_the_reference_bit_for_bit(device, dtype, smooth, one_pass, monkeypatch):
    from kiln.kernels.triton_quant_act import quantize_rows

    force_one_pass(monkeypatch, one_pass)
    # 14,336: Llama-3.1-8B's down_proj input (one pass); 28,672: Llama-3-70B's (two, whatever is forced)
    for n, k in SHAPES if INTERPRET else [*SHAPES, (8, 14336), (8, 28672)]:
        _, x, _, s = _case(device, 5, k, dtype, m=n)
        x[3] = 0  # an all-zero row gets scale 1
        s = s if smooth else None
        q, scale = quantize_rows(x, torch.int8, s)
        ref_q, ref_scale = qr.quantize_int8_rows(x.float() if s is None else x.float() / s)
        assert torch.equal(scale, ref_scale) and torch.equal(q, ref_q), (n, k)
        if smooth:
            continue
        q, scale = quantize_rows(x, torch.float8_e4m3fn)
        ref_q, ref_scale = qr.quantize_fp8_rows(x)
        assert torch.equal(scale, ref_scale)
        if not INTERPRET:  # the interpreter's own float32 -> e4m3 cast is not the GPU's (nor torch's)
            assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), (n, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_gemv_matches_the_references(device, dtype, n, k):
    from kiln.kernels.triton_quant_act import quantize_rows
    from kiln.kernels.triton_quant_gemv import quant_gemv

    w, x, bias, smooth = _case(device, n, k, dtype)
    for b in (None, bias):
        q, scale = qr.quantize_int8(w)
        out = quant_gemv(x, q, scale, b)
        assert out.shape == (1, n) and out.dtype == dtype
        assert rel_error(out, _weight_only_exact(x, q, scale, b)) < BOUND[dtype]
        for group in _groups(k):
            q, scale = qr.quantize_int8(w, group)
            assert rel_error(quant_gemv(x, q, scale, b), _weight_only_exact(x, q, scale, b)) < BOUND[dtype]
        q8, scale8 = qr.quantize_fp8(w)
        out = quant_gemv(x, q8, scale8, b)
        exact = torch.nn.functional.linear(
            x.double(), qr.dequantize_fp8(q8, scale8, torch.float64), None if b is None else b.double()
        )
        assert rel_error(out, exact) < BOUND[dtype]
        assert rel_error(out, qr.fp8_linear(x, q8, scale8, b)) < FP8_GEMV_VS_REFERENCE
        q, scale = qr.quantize_int8(w)
        xq, x_scale = quantize_rows(x, torch.int8, smooth)
        out = quant_gemv(xq, q, scale, b, x_scale=x_scale, out_dtype=dtype)
        assert out.dtype == dtype
        assert rel_error(out, qr.int8_sq_linear(x, q, scale, smooth, b)) < W8A8_BOUND


def _every_code(q: torch.Tensor) -> torch.Tensor:
    """q with its first row cycling through every byte pattern of its dtype (e4m3: but NaN, 0x7F / 0xFF;
    its subnormals and both zeros included)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if q.dtype == torch.float8_e4m3fn:
        codes = codes[(codes & 0x7F) != 0x7F]
    q = q.clone()
    q[0] = codes.repeat(q.shape[1] // codes.numel() + 1)[: q.shape[1]].to(q.device).view(q.dtype)
    return q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_gemv_bit_widening_is_the_conversions_bit_for_bit(device, dtype, n, k):
    """`bit_widen` builds the float32 weights from their bits (triton_quant_gemv's module doc): the output
    of the conversion instructions' path, bit for bit, for int8 per channel and per group and for e4m3,
    every byte pattern included."""
    from kiln.kernels.triton_quant_gemv import quant_gemv

    w, x, bias, _ = _case(device, n, k, dtype)
    cases = [qr.quantize_int8(w), *(qr.quantize_int8(w, g) for g in _groups(k)), qr.quantize_fp8(w)]
    for q, scale in cases:
        q = _every_code(q)
        for b in (None, bias):
            assert torch.equal(
                quant_gemv(x, q, scale, b, bit_widen=True), quant_gemv(x, q, scale, b, bit_widen=False)
            ), q.dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("m", [1, 16, 33])
def test_gemm_bit_widening_is_the_conversions_bit_for_bit(device, dtype, n, k, m):
    """`quant_gemm(..., bit_widen=True)` widens int8 weight-only tiles by integer operations: the same
    16-bit values (and per group, float32), so the output of the conversions' path bit for bit."""
    from kiln.kernels.triton_quant_gemm import quant_gemm

    w, x, bias, _ = _case(device, n, k, dtype, m=m)
    for q, scale in [qr.quantize_int8(w), *(qr.quantize_int8(w, g) for g in _groups(k))]:
        q = _every_code(q)
        got = quant_gemm(x, q, scale, bias, bit_widen=True)
        assert torch.equal(got, quant_gemm(x, q, scale, bias, bit_widen=False)), scale.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_quant_gemm_matches_the_references(device, dtype, n, k, m):
    from kiln.kernels.triton_quant_act import quantize_rows
    from kiln.kernels.triton_quant_gemm import quant_gemm, scale_int32

    w, x, bias, smooth = _case(device, n, k, dtype, m=m)
    q, scale = qr.quantize_int8(w)
    for b in (None, bias):
        out = quant_gemm(x, q, scale, b)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_error(out, _weight_only_exact(x, q, scale, b)) < BOUND[dtype]
        xq, x_scale = quantize_rows(x, torch.int8, smooth)
        expected = qr.int8_sq_linear(x, q, scale, smooth, b)
        assert rel_error(quant_gemm(xq, q, scale, b, x_scale=x_scale, out_dtype=dtype), expected) < W8A8_BOUND
        assert rel_error(scale_int32(qr.int8_matmul(xq, q), x_scale, scale, b, dtype), expected) < W8A8_BOUND
    for group in _groups(k):
        qg, scale_g = qr.quantize_int8(w, group)
        assert rel_error(quant_gemm(x, qg, scale_g), _weight_only_exact(x, qg, scale_g, None)) < BOUND[dtype]


# Narrow column tiles, the weight as the dot's first operand or its second, as decode batches use them.
SMALL_TILES = [(16, 64, 128, 8, 4, 3, False), (16, 64, 256, 8, 4, 4, True), (16, 32, 128, 8, 2, 3, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("m", [1, *TOKENS])
def test_quant_gemm_fp8_and_swapped_tiles(device, dtype, n, k, m):
    """The e4m3 weight widened to x's dtype (weight-only) and e4m3 x e4m3 (FP8), and every path under the
    small-batch tiles, the operands swapped or not: each against its exact product."""
    from kiln.kernels.triton_quant_act import quantize_rows
    from kiln.kernels.triton_quant_gemm import quant_gemm

    w, x, bias, smooth = _case(device, n, k, dtype, m=m)
    q, scale = qr.quantize_int8(w)
    q8, scale8 = qr.quantize_fp8(w)
    x8, x8_scale = quantize_rows(x, torch.float8_e4m3fn)
    xq, x_scale = quantize_rows(x, torch.int8, smooth)
    fp8_wo = torch.nn.functional.linear(
        x.double(), qr.dequantize_fp8(q8, scale8, torch.float64), bias.double()
    )
    for config in (None, *SMALL_TILES):
        if INTERPRET and config is not None and config[2] > 128:
            continue
        got = quant_gemm(x, q8, scale8, bias, config=config)
        assert got.dtype == dtype and rel_error(got, fp8_wo) < BOUND[dtype], config
        if not INTERPRET:  # the interpreter has no e4m3 dot
            got = quant_gemm(x8, q8, scale8, bias, x_scale=x8_scale, out_dtype=dtype, config=config)
            assert rel_error(got, _fp8_exact(x8, x8_scale, q8, scale8, bias)) < BOUND[dtype], config
        got = quant_gemm(x, q, scale, bias, config=config)
        assert rel_error(got, _weight_only_exact(x, q, scale, bias)) < BOUND[dtype], config
        got = quant_gemm(xq, q, scale, bias, x_scale=x_scale, out_dtype=dtype, config=config)
        assert rel_error(got, qr.int8_sq_linear(x, q, scale, smooth, bias)) < W8A8_BOUND, config
    with pytest.raises(ValueError, match="quantized x"):
        quant_gemm(x8, q, scale, x_scale=x8_scale)  # an e4m3 x with an int8 weight


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("m", [1, *TOKENS])
def test_dispatch_matches_the_references(dtype, n, k, m):
    from kiln.kernels.triton_quant_act import quantize_rows

    w, x, bias, smooth = _case("cuda", n, k, dtype, m=m)
    b = bias if m % 2 else None
    q, scale = qr.quantize_int8(w)
    assert (
        rel_error(kernels.int8_wo_linear(x, q, scale, b), _weight_only_exact(x, q, scale, b)) < BOUND[dtype]
    )
    for group in _groups(k):
        qg, scale_g = qr.quantize_int8(w, group)
        got = kernels.int8_wo_linear(x, qg, scale_g, b)
        assert rel_error(got, _weight_only_exact(x, qg, scale_g, b)) < BOUND[dtype]
    got = kernels.int8_sq_linear(x, q, scale, smooth, b)
    assert got.dtype == dtype and rel_error(got, qr.int8_sq_linear(x, q, scale, smooth, b)) < W8A8_BOUND
    q8, scale8 = qr.quantize_fp8(w)
    got = kernels.fp8_linear(x, q8, scale8, b)
    assert got.shape == (m, n) and got.dtype == dtype
    if m == 1:
        assert rel_error(got, qr.fp8_linear(x, q8, scale8, b)) < FP8_GEMV_VS_REFERENCE
    else:
        from kiln.kernels.triton_quant_linear import FAST_ACCUM, SCALED_MM_MIN_TOKENS

        bound = FAST_ACCUM_BOUND if FAST_ACCUM and m >= SCALED_MM_MIN_TOKENS else BOUND
        xq, x_scale = quantize_rows(x, torch.float8_e4m3fn)
        assert rel_error(got, _fp8_exact(xq, x_scale, q8, scale8, b)) < bound[dtype]
        assert rel_error(got, qr.fp8_linear(x, q8, scale8, b)) < bound[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_gemm_sums_in_the_fast_accumulator_unless_turned_off(monkeypatch, dtype):
    from kiln.kernels import triton_quant_linear as tql
    from kiln.kernels.triton_quant_act import quantize_rows

    fast: list[bool] = []
    real = torch._scaled_mm
    monkeypatch.setattr(
        torch, "_scaled_mm", lambda *a, **kw: fast.append(kw["use_fast_accum"]) or real(*a, **kw)
    )
    w, x, _, _ = _case("cuda", 4096, 11008, dtype, m=64)
    q8, scale8 = qr.quantize_fp8(w)
    xq, x_scale = quantize_rows(x, torch.float8_e4m3fn)
    exact = _fp8_exact(xq, x_scale, q8, scale8, None)
    monkeypatch.setattr(tql, "FAST_ACCUM", True)
    assert rel_error(kernels.fp8_linear(x, q8, scale8), exact) < FAST_ACCUM_BOUND[dtype]
    monkeypatch.setattr(tql, "FAST_ACCUM", False)
    assert rel_error(kernels.fp8_linear(x, q8, scale8), exact) < BOUND[dtype]
    assert fast == [True, False]
    # The default, and the switch (read at import).
    probe = "from kiln.kernels.triton_quant_linear import FAST_ACCUM; print(FAST_ACCUM)"
    env = {k: v for k, v in os.environ.items() if k != "KILN_FP8_FAST_ACCUM"}
    for value, expected in ((None, "True"), ("0", "False"), ("1", "True")):
        run_env = env if value is None else {**env, "KILN_FP8_FAST_ACCUM": value}
        out = subprocess.run(
            [sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected, value


@needs_cuda
def test_dispatch_picks_the_kernel_for_each_batch(monkeypatch):
    from kiln.kernels import triton_quant_linear as tql

    calls: list[str] = []
    for name in ("quant_gemv", "quant_gemm", "scale_int32"):
        real = getattr(tql, name)
        monkeypatch.setattr(tql, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n) or _f(*a, **kw))
    for name in ("_scaled_mm", "_int_mm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n) or _f(*a, **kw))
    w, _, _, smooth = _case("cuda", 256, 512, torch.float16)
    q, scale = qr.quantize_int8(w)
    q8, scale8 = qr.quantize_fp8(w)
    seen = {}
    for m in (1, 7, 33):
        x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
        for scheme, run in {
            "int8_wo": lambda x: kernels.int8_wo_linear(x, q, scale),
            "fp8": lambda x: kernels.fp8_linear(x, q8, scale8),
            "int8_sq": lambda x: kernels.int8_sq_linear(x, q, scale, smooth),
        }.items():
            calls.clear()
            run(x)
            seen[scheme, m] = list(calls)
        calls.clear()
        kernels.int8_wo_linear(x.float(), q, scale)  # float32 activations: the reference
        assert calls == []
    assert seen == {
        ("int8_wo", 1): ["quant_gemv"],
        ("fp8", 1): ["quant_gemv"],
        ("int8_sq", 1): ["quant_gemv"],
        ("int8_wo", 7): ["quant_gemm"],
        ("fp8", 7): ["quant_gemm"],
        ("int8_sq", 7): ["quant_gemm"],
        ("int8_wo", 33): ["quant_gemm"],
        ("fp8", 33): ["_scaled_mm"],
        ("int8_sq", 33): ["_int_mm", "scale_int32"],
    }


@needs_cuda
def test_cuda_graphs_capture_every_path():
    # Each scheme at 1 (GEMV, with PDL on Hopper), 5 (Triton GEMM / _scaled_mm) and 40 tokens (_int_mm),
    # chained so each call's input is the previous call's output, captured in one graph and replayed on
    # new inputs: every output must be what the same calls give eagerly.
    gen = torch.Generator(device="cuda").manual_seed(5)
    w = torch.randn(1024, 1024, device="cuda", generator=gen) / 32
    q, scale = qr.quantize_int8(w)
    qg, scale_g = qr.quantize_int8(w, 128)
    q8, scale8 = qr.quantize_fp8(w)
    smooth = torch.rand(1024, device="cuda", generator=gen) + 0.5
    inputs = {m: torch.randn(m, 1024, device="cuda", generator=gen).half() for m in (1, 5, 40)}

    def chain() -> list[torch.Tensor]:
        outs = []
        for x in inputs.values():
            h = kernels.int8_wo_linear(x, q, scale)
            h = kernels.int8_wo_linear(h, qg, scale_g)
            h = kernels.fp8_linear(h, q8, scale8)
            outs.append(kernels.int8_sq_linear(h, q, scale, smooth))
        return outs

    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        for x in inputs.values():
            x.copy_(torch.randn(x.shape, device="cuda", generator=gen).half())
        graph.replay()
        for got, expected in zip(captured, chain(), strict=True):
            assert rel_error(got, expected) < 1e-3


# --- a tiny quantized engine on CUDA ------------------------------------------------------------------

# (scheme, group) -> (least top-1 agreement, most mean KL) of the float16 CUDA engine against the same
# engine's float32 CPU reference. The tiny model's random weights make its logits chaotic: float16
# rounding alone moves them that much on the CPU (measured with the references, 2026-12-05, 550 tokens:
# int8-wo 0.989 / 0.0012, groups of 16 0.980 / 0.0012, fp8 0.855 / 0.107, int8-sq 0.896 / 0.041). The
# gates leave room for a different rounding order; a broken layout or scale gives near-zero agreement.
ENGINE_GATES = {
    ("int8-wo", None): (0.95, 0.01),
    ("int8-wo", 16): (0.94, 0.01),
    ("fp8", None): (0.72, 0.3),
    ("int8-sq", None): (0.8, 0.12),
}


@needs_cuda
@pytest.mark.whole_gpu
@pytest.mark.parametrize(("scheme", "group"), list(ENGINE_GATES))
def test_tiny_quantized_engine_on_cuda_tracks_the_reference(tmp_path, scheme, group):
    import this

    from kiln.bench.accuracy import agreement, prefill_logits, text_logits
    from kiln.build import build_tiny_engine
    from kiln.config import EngineConfig
    from kiln.engine.llm_engine import LLMEngine
    from kiln.models.loader import load_model
    from kiln.models.tokenizer import Tokenizer

    engine_dir = tmp_path / "engine"
    options = {"calib_size": 2} if scheme == "int8-sq" else {}
    build_tiny_engine(engine_dir, quantization=scheme, quant_group_size=group, **options)
    least_top1, most_kl = ENGINE_GATES[scheme, group]
    # Prefill of a real text: the batched kernels (hundreds of tokens: Triton GEMM, _scaled_mm, _int_mm).
    ids = Tokenizer(engine_dir).encode(codecs.decode(this.s, "rot13"))
    reference = text_logits(engine_dir, ids)
    model, _ = load_model(engine_dir, dtype=torch.float16, device="cuda")
    top1, kl = agreement(reference, prefill_logits(model, ids).cpu())
    print(f"{scheme} g={group} prefill on CUDA: top-1 {top1:.3f}, KL {kl:.4f}")
    assert top1 >= least_top1 and kl <= most_kl
    del model
    # Greedy decoding through the engine (CUDA graphs): one request alone (the batch-1 GEMVs), then
    # four together. Each generated token is scored against the reference given the same prefix.
    engine = LLMEngine.from_path(engine_dir, EngineConfig(device="cuda", dtype="float16", max_num_seqs=8))
    agree, total = greedy_agreement(engine, engine_dir)
    print(f"{scheme} g={group} greedy on CUDA: {agree}/{total} tokens the reference's argmax")
    assert agree / total >= least_top1
