"""Quantized linear layers of a native quantized engine (`engine.json` `quant_config`), and where they run.

A `QuantizedLinear` replaces an `nn.Linear` of the Llama model (qkv_proj, o_proj, gate_up_proj,
down_proj) and holds what the engine directory stores for it: `weight` in the scheme's storage dtype
(int8 or float8_e4m3fn) [N, K], `weight_scale` float32 ([N] per channel, [N, K // group_size] per
group; see kiln.config.QuantConfig), for int8_sq layers with no norm to fold the smoothing into
(o_proj, down_proj) `smooth_scale` float32 [K], and `bias` in the model dtype when the layer has one.

Rules:
- `quantized_linear` is the one place a quantized matmul is dispatched. It calls the kernel dispatch
  (`kiln.kernels.int8_wo_linear`, `fp8_linear`, `int8_sq_linear`), which runs the GPU kernels on CUDA
  (kiln.kernels.triton_quant_linear: GEMVs for one token, Triton / cuBLAS(Lt) GEMMs for more) and the
  PyTorch references of kiln.kernels.quant_reference elsewhere (KILN_KERNELS=reference forces them);
  the references are also the definition the GPU kernels are tested against (tests/gpu).
- The GPU kernels read the weights as loaded: `torch._scaled_mm` and `torch._int_mm` want the weight as
  a column-major [K, N], which `weight.t()` of the stored row-major [N, K] already is (a view), so no
  re-layout happens after load and the CPU path is untouched.
- `check_device_supports` refuses, by name, a scheme the device cannot run: fp8 needs FP8 tensor
  cores on CUDA (compute capability >= 8.9, Ada or Hopper); the CPU runs the references of all three.
  `check_kv_cache_supports` does the same for an fp8 KV cache, whose Triton kernels convert to and from
  e4m3 (Triton's fp8e4nv), which needs compute capability >= 8.9 too.
- `input_quantization(num_tokens)` says which 8-bit dtype the layer's kernel takes x in (int8_sq: int8;
  fp8 above one token: e4m3); the kernel that makes x (RMSNorm, SiLU-and-mul) then quantizes it in
  its own launch (`kernels.rms_norm_quant`, `silu_and_mul_quant`, with the layer's `smooth_scale`),
  the same numbers as quantizing inside the matmul, and the layer takes the `QuantizedActivation`.
- `storage_dtypes` names the parameters whose dtype the scheme fixes, so the loader does not cast
  them to the model dtype (kiln.models.loader.build_empty_model).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln import kernels
from kiln.config import KVCacheConfig, QuantConfig
from kiln.errors import InvalidEngineError
from kiln.kernels import quant_reference
from kiln.kernels.quant_reference import QuantizedActivation

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper and later have FP8 tensor cores
_STORAGE = {"int8_wo": torch.int8, "fp8": quant_reference.FP8_DTYPE, "int8_sq": torch.int8}


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(weight, weight_scale).T + bias, with the scheme's numerics (see the module rules)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, quant: QuantConfig, smooth: bool = False
    ) -> None:
        super().__init__()
        quant.validate()
        self.scheme = quant.scheme
        self.in_features, self.out_features = in_features, out_features
        self.storage_dtypes = {"weight": _STORAGE[quant.scheme], "weight_scale": torch.float32}
        scale_shape = (
            (out_features,) if quant.group_size is None else (out_features, in_features // quant.group_size)
        )
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=self.storage_dtypes["weight"]), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(scale_shape, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # int8_sq without a norm to fold into: the input is divided by these factors (kiln.config).
        self.smooth_scale: nn.Parameter | None = None
        if smooth:
            if quant.scheme != "int8_sq":
                raise ValueError(f"an explicit smoothing scale is int8_sq's, not {quant.scheme}'s")
            self.storage_dtypes["smooth_scale"] = torch.float32
            self.smooth_scale = nn.Parameter(
                torch.empty(in_features, dtype=torch.float32), requires_grad=False
            )

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        return quantized_linear(self, x)

    def input_quantization(self, num_tokens: int) -> torch.dtype | None:
        """The dtype this layer's kernel for `num_tokens` quantizes x to, so that the kernel producing x
        can quantize it instead (see the module rules); None when it takes x in 16 bits."""
        if self.scheme == "int8_sq":
            return torch.int8
        if self.scheme == "fp8" and num_tokens > 1:  # one token: the GEMV keeps x in 16 bits
            return quant_reference.FP8_DTYPE
        return None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}, scales={tuple(self.weight_scale.shape)}"


def quantized_linear(layer: QuantizedLinear, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """x [T, K] through a quantized layer -> [T, N] in x's dtype, by the scheme's kernel for x's device
    (see the module rules). A `QuantizedActivation` is x already quantized (and smoothed) as the layer's
    `input_quantization` asks."""
    if isinstance(x, QuantizedActivation):
        if x.q.dtype != layer.input_quantization(x.q.shape[0]):
            raise ValueError(f"a {layer.scheme} layer does not take a {x.q.dtype} activation")
        if layer.scheme == "int8_sq":
            return kernels.int8_sq_matmul(x, layer.weight, layer.weight_scale, layer.bias)
        return kernels.fp8_matmul(x, layer.weight, layer.weight_scale, layer.bias)
    if layer.scheme == "int8_wo":
        return kernels.int8_wo_linear(x, layer.weight, layer.weight_scale, layer.bias)
    if layer.scheme == "int8_sq":
        return kernels.int8_sq_linear(x, layer.weight, layer.weight_scale, layer.smooth_scale, layer.bias)
    return kernels.fp8_linear(x, layer.weight, layer.weight_scale, layer.bias)


def make_linear(
    in_features: int, out_features: int, *, bias: bool, quant: QuantConfig | None, name: str = ""
) -> nn.Module:
    """An `nn.Linear`, or a `QuantizedLinear` under `quant`; `name` is the packed linear's suffix
    (e.g. "mlp.down_proj"), which decides whether an int8_sq layer stores its own smoothing scale."""
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    smooth = quant.explicit_smoothing(name)
    return QuantizedLinear(in_features, out_features, bias=bias, quant=quant, smooth=smooth)


def check_device_supports(quant: QuantConfig | None, device: str | torch.device) -> None:
    """Raise InvalidEngineError naming the scheme when `device` cannot run it (see the module rules)."""
    if quant is not None and quant.scheme == "fp8":
        _require_fp8(
            device,
            "this engine is quantized fp8, which needs FP8 tensor cores",
            "rebuild with --quantization int8-wo or none",
        )


def check_kv_cache_supports(kv_cache: KVCacheConfig | None, device: str | torch.device) -> None:
    """Raise InvalidEngineError naming the fp8 KV cache when `device` cannot run it (see the module rules)."""
    if kv_cache is not None:
        _require_fp8(
            device,
            "this engine's KV cache is fp8 (E4M3), whose kernels need FP8 conversions",
            "rebuild with --kv-cache-dtype auto",
        )


def _require_fp8(device: str | torch.device, what: str, instead: str) -> None:
    """InvalidEngineError `what (compute capability >= 8.9, ...); <GPU> is X.Y: instead` on a CUDA GPU
    without FP8 (before Ada); nothing elsewhere (the CPU runs the references)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_COMPUTE_CAPABILITY:
        major, minor = FP8_MIN_COMPUTE_CAPABILITY
        raise InvalidEngineError(
            f"{what} (compute capability >= {major}.{minor}, Ada or Hopper); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: {instead}"
        )
