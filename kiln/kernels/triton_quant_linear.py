"""The quantized linear layers on CUDA: which kernel runs each scheme at each number of tokens.

`kiln.kernels.int8_wo_linear`, `fp8_linear` and `int8_sq_linear` call these on CUDA tensors; each has the
signature and semantics of its reference in `kiln.kernels.quant_reference` (x [M, K], q [N, K], scales).

Rules:
- int8_wo: one token -> the quantized GEMV (`triton_quant_gemv`); more -> the Triton GEMM that widens int8
  tiles inside its K loop (`triton_quant_gemm`). The weight crosses HBM once, 1 byte an element.
- fp8: one token -> the GEMV with x kept in 16 bits (batch 1 is bandwidth-bound; see triton_quant_gemv
  for why, and for its tolerance against the reference). More -> per-token e4m3 quantization
  (`triton_quant_act`, bit-identical to the reference's), then up to 16 tokens the Triton FP8 x FP8 GEMM
  (its decode-batch tile beat cuBLASLt there: benchmarks/quant_small_m.py), above that cuBLASLt's FP8
  GEMM, `torch._scaled_mm`, with row-wise scales: scale_a [M, 1] float32 (the tokens'), scale_b [1, N]
  float32 (the channels'), the products summed in the tensor core's reduced-precision accumulator
  (`use_fast_accum`): 8-11% faster on Llama-3.1-8B's shapes at 256-8,192 tokens than float32 sums, for
  a relative error against the exact product of 2-3e-3 where float32 sums give 1.7e-3, both with a
  bfloat16 output (H100; docs/results/2026-12-06-h100), and against e4m3's own ~3% rounding of x.
  `KILN_FP8_FAST_ACCUM=0` (read at import) sums in float32, the reference's numerics.
  Its second operand must be column-major [K, N]: `q.t()` of the row-major [N, K] weight is exactly
  that, a view, so no copy is made per call and no re-layout at load. Its output is x's dtype when
  row-wise scaling can write it (bfloat16 always; float16 from cuBLAS 12.9 on Hopper, `_fp16_rowwise`),
  else bfloat16 then cast.
- int8_sq: per-token int8 quantization (`triton_quant_act`, smoothing division included, bit-identical to
  the reference's), then one token -> the W8A8 GEMV; 2..16 tokens -> the Triton W8A8 GEMM; more ->
  cuBLAS's int8 GEMM, `torch._int_mm` (int32 sums; it needs M > 16, K and N multiples of 8: otherwise the
  Triton GEMM) and a Triton epilogue (x_scale, scale, cast, bias). Both sum the same integers exactly, so
  the result is the reference's bit for bit but for rare one-unit roundings of the final cast.
- What these kernels do not take runs the reference, on the GPU, with the same result (slower):
  float32 activations (Triton's dot would round them to TF32), x that is not 2-D, per-group sizes that
  are not a power of two of at least 16. FP8 GEMMs whose K or N is not a multiple of 16 (a
  `_scaled_mm` requirement; no Llama shape) take the Triton FP8 x FP8 GEMM.
- `fp8_matmul` and `int8_sq_matmul` take an activation the kernel before them already quantized
  (`kiln.kernels.triton_norm.rms_norm_quant`, `triton_quant_act.silu_and_mul_quant`) and run the
  second half of `fp8_linear` / `int8_sq_linear`, with the same kernels (an e4m3 activation of one
  token too goes through the Triton GEMM: the GEMV takes 16-bit x).
- Nothing here syncs with the host or has a data-dependent shape: CUDA graphs capture every path.
"""

from __future__ import annotations

import functools

import torch

from kiln.kernels import quant_reference
from kiln.kernels.quant_reference import QuantizedActivation
from kiln.kernels.switches import env_switch
from kiln.kernels.triton_quant_act import quantize_rows
from kiln.kernels.triton_quant_gemm import quant_gemm, scale_int32
from kiln.kernels.triton_quant_gemv import quant_gemv

_HALF = (torch.float16, torch.bfloat16)
INT_MM_MIN_TOKENS = 17  # torch._int_mm: "self.size(0) needs to be greater than 16"
SCALED_MM_MIN_TOKENS = 17  # fewer: the Triton FP8 GEMM's decode-batch tile is faster (module rules)
FAST_ACCUM = bool(env_switch("KILN_FP8_FAST_ACCUM", True))  # cuBLASLt's FP8 accumulator (module rules)


def _group(q: torch.Tensor, scale: torch.Tensor) -> int | None:
    """Inputs per scale group: 0 per channel, None for a group size the kernels do not take."""
    groups = scale.shape[1] if scale.dim() == 2 else 1
    if groups == 1:
        return 0
    size = q.shape[1] // groups
    return size if size >= 16 and not size & (size - 1) else None


def int8_wo_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """quant_reference.int8_wo_linear on CUDA (see the module rules)."""
    if x.dim() != 2 or x.dtype not in _HALF or _group(q, scale) is None or x.shape[0] == 0:
        return quant_reference.int8_wo_linear(x, q, scale, bias)
    if scale.dim() == 2 and scale.shape[1] == 1:
        scale = scale.view(-1)  # one group a row is per channel
    if x.shape[0] == 1:
        return quant_gemv(x, q, scale, bias)
    return quant_gemm(x, q, scale, bias)


@functools.cache
def _fp16_rowwise(device_index: int) -> bool:
    """Whether torch._scaled_mm writes float16 with row-wise scales here: through cuBLASLt on Hopper from
    CUDA 12.9; otherwise its CUTLASS kernel, which writes only bfloat16."""
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(device_index)[0] == 9 and cuda >= (12, 9)


def fp8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """quant_reference.fp8_linear on CUDA (see the module rules)."""
    m = x.shape[0] if x.dim() == 2 else 0
    if x.dim() != 2 or x.dtype not in _HALF or m == 0:
        return quant_reference.fp8_linear(x, q, scale, bias)
    if m == 1:
        return quant_gemv(x, q, scale, bias)
    xq, x_scale = quantize_rows(x, torch.float8_e4m3fn)
    return fp8_matmul(QuantizedActivation(xq, x_scale, x.dtype), q, scale, bias)


def fp8_matmul(
    a: QuantizedActivation, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """quant_reference.fp8_matmul on CUDA: cuBLASLt's FP8 GEMM (see the module rules); a decode batch, or
    K or N not a multiple of 16, the Triton GEMM."""
    m = a.q.shape[0]
    n, k = q.shape
    if m == 0 or a.dtype not in _HALF:
        return quant_reference.fp8_matmul(a, q, scale, bias)
    if m < SCALED_MM_MIN_TOKENS or k % 16 or n % 16:
        return quant_gemm(a.q, q, scale, bias, x_scale=a.scale, out_dtype=a.dtype)
    index = a.q.device.index if a.q.device.index is not None else torch.cuda.current_device()
    direct = a.dtype == torch.bfloat16 or _fp16_rowwise(index)
    out = torch._scaled_mm(
        a.q,
        q.t(),
        scale_a=a.scale.view(m, 1),
        scale_b=scale.view(1, n),
        out_dtype=a.dtype if direct else torch.bfloat16,
        use_fast_accum=FAST_ACCUM,
    )
    if not direct:
        out = out.to(a.dtype)
    return out if bias is None else out.add_(bias)


def int8_sq_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """quant_reference.int8_sq_linear on CUDA (see the module rules)."""
    if x.dim() != 2 or x.dtype not in _HALF or x.shape[0] == 0:
        return quant_reference.int8_sq_linear(x, q, scale, smooth, bias)
    xq, x_scale = quantize_rows(x, torch.int8, smooth)
    return int8_sq_matmul(QuantizedActivation(xq, x_scale, x.dtype), q, scale, bias)


def int8_sq_matmul(
    a: QuantizedActivation, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """quant_reference.int8_sq_matmul on CUDA (see the module rules)."""
    m = a.q.shape[0]
    n, k = q.shape
    if m == 0 or a.dtype not in _HALF:
        return quant_reference.int8_sq_matmul(a, q, scale, bias)
    if m == 1:
        return quant_gemv(a.q, q, scale, bias, x_scale=a.scale, out_dtype=a.dtype)
    if m < INT_MM_MIN_TOKENS or k % 8 or n % 8:
        return quant_gemm(a.q, q, scale, bias, x_scale=a.scale, out_dtype=a.dtype)
    return scale_int32(torch._int_mm(a.q, q.t()), a.scale, scale, bias, a.dtype)
