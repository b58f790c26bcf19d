"""The lazy tensorrt_llm import, its version rule, and engine/GPU compatibility (no tensorrt_llm needed)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from kiln.errors import BackendUnavailableError, InvalidEngineError
from kiln.trtllm import compat
from kiln.trtllm.compat import GpuInfo, check_engine_compatible


def test_importing_kiln_trtllm_does_not_import_the_library():
    # A fresh interpreter with a poisoned `tensorrt_llm`: any module-level import of it would fail.
    code = (
        "import sys; sys.modules['tensorrt_llm'] = None\n"
        "import kiln.trtllm, kiln.clients.trtllm, kiln.build.trtllm, kiln.trtllm.params\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_absent_library_raises_backend_unavailable_naming_the_container_and_index(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes `import tensorrt_llm` fail
    with pytest.raises(BackendUnavailableError) as info:
        compat.import_tensorrt_llm()
    message = str(info.value)
    assert compat.NGC_IMAGE in message and "nvcr.io/nvidia/tensorrt-llm/release:1.2" in message
    assert compat.NVIDIA_INDEX_URL in message and "kiln[trtllm]" in message
    with pytest.raises(BackendUnavailableError):
        compat.import_trt_engine_llm()


def test_wrong_library_version_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.SimpleNamespace(__version__="1.3.0rc1"))
    with pytest.raises(BackendUnavailableError, match=r"tensorrt_llm 1\.3\.0rc1 is installed.*needs 1\.2\.x"):
        compat.import_tensorrt_llm()


def test_supported_versions():
    for ok in ("1.2.0", "1.2.1", "1.2.0rc3", "1.2.0.post1"):
        compat.check_version(ok)
    for bad in ("1.1.0", "1.3.0", "0.21.0", "garbage"):
        with pytest.raises(BackendUnavailableError):
            compat.check_version(bad)


def test_a_fake_1_2_library_is_returned(monkeypatch):
    fake = types.SimpleNamespace(__version__="1.2.1")
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    assert compat.import_tensorrt_llm() is fake


H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 1)
BUILT_ON_H100 = compat.build_environment(H100, "1.2.0", tp_size=1)


def test_build_environment_round_trips_through_the_check():
    assert BUILT_ON_H100 == {
        "tensorrt_llm_version": "1.2.0",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "tp_size": 1,
    }
    check_engine_compatible(BUILT_ON_H100, runtime_version="1.2.0", gpu=H100)


def test_other_library_version_is_refused_with_both_versions():
    with pytest.raises(
        InvalidEngineError, match=r"built with tensorrt_llm 1\.2\.0, but tensorrt_llm 1\.2\.1"
    ):
        check_engine_compatible(BUILT_ON_H100, runtime_version="1.2.1", gpu=H100)


def test_other_gpu_architecture_is_refused_naming_both_gpus():
    a100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 1)
    with pytest.raises(InvalidEngineError) as info:
        check_engine_compatible(BUILT_ON_H100, runtime_version="1.2.0", gpu=a100)
    message = str(info.value)
    assert "H100" in message and "A100" in message and "9.0" in message and "8.0" in message
    assert "kiln build --backend trtllm" in message


def test_same_architecture_other_model_is_allowed_with_a_warning(caplog):
    h100_pcie = GpuInfo("NVIDIA H100 PCIe", (9, 0), 1)
    check_engine_compatible(BUILT_ON_H100, runtime_version="1.2.0", gpu=h100_pcie)
    assert "H100 PCIe" in caplog.text


def test_too_few_gpus_for_tensor_parallel_is_refused():
    tp2 = compat.build_environment(H100, "1.2.0", tp_size=2)
    with pytest.raises(InvalidEngineError, match="over 2 GPUs, but only 1"):
        check_engine_compatible(tp2, runtime_version="1.2.0", gpu=H100)


def test_manifest_without_build_environment_is_refused():
    with pytest.raises(InvalidEngineError, match="lacks tensorrt_llm_version"):
        check_engine_compatible({}, runtime_version="1.2.0", gpu=H100)
