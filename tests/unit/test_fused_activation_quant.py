"""The per-token activation quantization moved into the kernel before an 8-bit matmul (RMSNorm, SiLU-and-mul):
which layers ask for it, and that a model computes the very same logits with and without the move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln import kernels
from kiln.bench.accuracy import load_float32, prefill_logits
from kiln.build import build_tiny_engine
from kiln.config import QuantConfig
from kiln.kernels import quant_reference as qr
from kiln.models.quant_linear import QuantizedLinear

TOKENS = list(range(3, 40))


def _config(scheme: str) -> QuantConfig:
    if scheme != "int8_sq":
        return QuantConfig(scheme=scheme)
    return QuantConfig(
        scheme=scheme, smoothquant_alpha=0.5, calibration={"dataset": "x", "sha256": "0", "num_tokens": 1}
    )


@pytest.mark.parametrize(
    ("scheme", "one", "several"),
    [("int8_sq", torch.int8, torch.int8), ("fp8", None, torch.float8_e4m3fn), ("int8_wo", None, None)],
)
def test_each_scheme_says_which_input_its_kernel_quantizes(scheme, one, several) -> None:
    layer = QuantizedLinear(32, 16, bias=False, quant=_config(scheme))
    assert layer.input_quantization(1) == one
    assert layer.input_quantization(7) == several


def test_a_layer_refuses_an_activation_quantized_for_another_scheme() -> None:
    layer = QuantizedLinear(32, 16, bias=False, quant=_config("int8_sq"))
    activation = qr.quantize_activation(torch.randn(3, 32), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"int8_sq layer does not take a torch\.float8_e4m3fn"):
        layer(activation)


@pytest.mark.parametrize(
    ("scheme", "options"), [("int8-sq", {"calib_size": 2}), ("fp8", {})], ids=["int8_sq", "fp8"]
)
def test_the_fused_quantization_leaves_the_logits_bit_for_bit(
    scheme: str, options: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tmp_path / scheme
    build_tiny_engine(engine, dtype="bfloat16", quantization=scheme, **options)
    model = load_float32(engine)
    calls: list[str] = []
    for name in ("rms_norm_quant", "silu_and_mul_quant"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n) or _f(*a, **kw)
        )
    fused = prefill_logits(model, TOKENS)
    layers = model.config.num_hidden_layers
    # Every layer: both norms quantize, and SiLU-and-mul for the down projection (int8_sq: smoothed).
    per_layer = {"rms_norm_quant": 2, "silu_and_mul_quant": 1}
    assert {name: calls.count(name) for name in per_layer} == {n: c * layers for n, c in per_layer.items()}
    monkeypatch.setattr(QuantizedLinear, "input_quantization", lambda self, num_tokens: None)
    calls.clear()
    unfused = prefill_logits(model, TOKENS)
    assert calls == [] and torch.equal(fused, unfused)
