"""SmoothQuant's calibration pass (kiln.build.calibrate): the default text, the sample split, and the
per-channel activation abs-max it records, checked against the inputs the model's own modules compute."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from kiln import kernels
from kiln.build import build_tiny_engine
from kiln.build.calibrate import (
    CALIB_SEQ_LEN,
    activation_amax,
    calibration_set,
    calibration_tokens,
    prefill,
)
from kiln.config import QUANTIZED_LINEARS, QuantConfig
from kiln.models.loader import load_model

SQ = QuantConfig(scheme="int8_sq", smoothquant_alpha=0.5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    engine = tmp_path_factory.mktemp("calib") / "tiny"
    build_tiny_engine(engine)
    model, _ = load_model(engine, dtype=torch.float32)
    return model


def test_the_default_set_is_the_standard_librarys_pydoc_topics() -> None:
    from pydoc_data.topics import topics

    calib = calibration_set()
    assert calib.dataset.startswith("pydoc_data.topics (Python 3.")
    assert calib.text == "\n\n".join(topics[key] for key in sorted(topics))
    assert len(calib.text) > 100_000
    assert calib.sha256 == hashlib.sha256(calib.text.encode()).hexdigest()
    assert calib.record(7) == {"dataset": calib.dataset, "sha256": calib.sha256, "num_tokens": 7}
    assert calibration_set().sha256 == calib.sha256  # deterministic


def test_a_users_file_is_read_as_utf8_and_bad_files_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "c.txt"
    good.write_text("naïve café\n", encoding="utf-8")
    assert calibration_set(good).text == "naïve café\n" and calibration_set(good).dataset == str(
        good.resolve()
    )
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        calibration_set(tmp_path / "empty.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="calibration dataset"):
        calibration_set(tmp_path / "bin")


def test_samples_are_consecutive_runs_of_the_sequence_length() -> None:
    ids = list(range(3 * CALIB_SEQ_LEN + 10))
    samples = calibration_tokens(ids, 2)
    assert [len(s) for s in samples] == [CALIB_SEQ_LEN, CALIB_SEQ_LEN]
    assert [t for s in samples for t in s] == ids[: 2 * CALIB_SEQ_LEN]
    assert [t for s in calibration_tokens(ids, 10) for t in s] == ids  # a short text is used whole
    with pytest.raises(ValueError, match=">= 1 sample"):
        calibration_tokens(ids, 0)


def test_recorded_amax_is_the_max_of_each_linears_inputs(tiny_model) -> None:
    samples = [[3, 17, 99, 5, 250, 8, 1, 42] * 5, [7, 7, 300, 12]]
    amax = activation_amax(tiny_model, samples, SQ)
    layers = tiny_model.model.layers
    assert set(amax) == {
        f"model.layers.{i}.{lin}.weight" for i in range(len(layers)) for lin in QUANTIZED_LINEARS
    }
    # The same inputs, seen from the modules that compute them: the norms feeding qkv_proj and gate_up_proj.
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            seen.setdefault(name, []).append(output[0].abs().amax(0))

        return hook

    for i, layer in enumerate(layers):
        layer.input_layernorm.register_forward_hook(keep(f"{i}.qkv"))
        layer.post_attention_layernorm.register_forward_hook(keep(f"{i}.gate_up"))
    try:
        for sample in samples:
            prefill(tiny_model, sample)
    finally:
        for layer in layers:
            layer.input_layernorm._forward_hooks.clear()
            layer.post_attention_layernorm._forward_hooks.clear()
    for i in range(len(layers)):
        qkv = torch.stack(seen[f"{i}.qkv"]).amax(0)
        gate_up = torch.stack(seen[f"{i}.gate_up"]).amax(0)
        torch.testing.assert_close(amax[f"model.layers.{i}.self_attn.qkv_proj.weight"], qkv, rtol=0, atol=0)
        torch.testing.assert_close(amax[f"model.layers.{i}.mlp.gate_up_proj.weight"], gate_up, rtol=0, atol=0)
        for name, width in (
            ("self_attn.o_proj", tiny_model.config.q_size),
            ("mlp.down_proj", tiny_model.config.intermediate_size),
        ):
            stat = amax[f"model.layers.{i}.{name}.weight"]
            assert stat.shape == (width,) and (stat > 0).all()


def test_down_proj_amax_is_of_silu_gate_times_up(tiny_model) -> None:
    sample = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    amax = activation_amax(tiny_model, [sample], SQ)
    layer = tiny_model.model.layers[0]
    normed: list[torch.Tensor] = []
    handle = layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: normed.append(out[0]))
    try:
        prefill(tiny_model, sample)
    finally:
        handle.remove()
    mlp = layer.mlp
    down_in = kernels.silu_and_mul(
        torch.nn.functional.linear(normed[0], mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
    )
    torch.testing.assert_close(amax["model.layers.0.mlp.down_proj.weight"], down_in.abs().amax(0))


def test_calibration_is_deterministic_and_refuses_a_quantized_model(tiny_model, tmp_path: Path) -> None:
    samples = [list(range(1, 60))]
    first, second = activation_amax(tiny_model, samples, SQ), activation_amax(tiny_model, samples, SQ)
    assert all(torch.equal(first[name], second[name]) for name in first)
    build_tiny_engine(tmp_path / "q", quantization="int8-wo")
    quantized, _ = load_model(tmp_path / "q")
    with pytest.raises(ValueError, match="unquantized model"):
        activation_amax(quantized, samples, SQ)
