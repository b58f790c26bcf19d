"""The one door to `tensorrt_llm`: a lazy import, the version rule, and engine/GPU compatibility checks.

Rules:
- Nothing in Kiln imports `tensorrt_llm` at module level; every use goes through `import_tensorrt_llm()`,
  so `import kiln` works (and the native backend runs) where TensorRT-LLM is not installed.
- Only tensorrt_llm 1.2.x is accepted: it is the last release line with the TensorRT-engine path
  (`tensorrt_llm._tensorrt_engine.LLM`); 1.3 removed it. Anything else raises BackendUnavailableError.
- A TensorRT engine runs only with the TensorRT-LLM version that built it and on GPUs of the compute
  capability it was built for; `check_engine_compatible` turns a mismatch into InvalidEngineError
  before the library gets a chance to crash on it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kiln.errors import BackendUnavailableError, InvalidEngineError

logger = logging.getLogger(__name__)

# The NGC release image Kiln's Dockerfile builds on; it ships tensorrt_llm, TensorRT, CUDA and MPI.
NGC_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"
NVIDIA_INDEX_URL = "https://pypi.nvidia.com"
SUPPORTED_SERIES = (1, 2)  # major, minor

INSTALL_HINT = (
    f"Run Kiln inside NVIDIA's TensorRT-LLM container ({NGC_IMAGE}; see docs/deploy.md), "
    f"or install it from NVIDIA's package index on a machine with a CUDA GPU: "
    f"pip install --extra-index-url {NVIDIA_INDEX_URL} 'kiln[trtllm]' "
    "(tensorrt_llm>=1.2,<1.3; the PyPI package alone is only a stub)."
)


def _series(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def check_version(version: str) -> None:
    """Raise BackendUnavailableError unless `version` is a 1.2.x release (rc and post releases included)."""
    if _series(version) != SUPPORTED_SERIES:
        raise BackendUnavailableError(
            f"tensorrt_llm {version} is installed, but Kiln's TensorRT-engine backend needs 1.2.x "
            f"(1.3 removed the TensorRT-engine path). {INSTALL_HINT}"
        )


def installed_version() -> str | None:
    """The installed tensorrt_llm distribution's version, without importing it (None: not installed)."""
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_available() -> bool:
    """True when a supported tensorrt_llm is installed (does not import it: that takes seconds)."""
    version = installed_version()
    return version is not None and _series(version) == SUPPORTED_SERIES


def import_tensorrt_llm() -> ModuleType:
    """Import and return `tensorrt_llm`, or raise BackendUnavailableError saying how to get it."""
    try:
        module = importlib.import_module("tensorrt_llm")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"The TensorRT-LLM backend needs the tensorrt_llm package, which is not importable here "
            f"({exc}). {INSTALL_HINT}"
        ) from exc
    version = getattr(module, "__version__", None) or installed_version() or "unknown"
    check_version(str(version))
    return module


def import_trt_engine_llm() -> Any:
    """The TensorRT-engine `LLM` class of tensorrt_llm 1.2.

    In 1.2 the top-level `tensorrt_llm.LLM` is the PyTorch-backend class; the TensorRT-engine one lives at
    `tensorrt_llm._tensorrt_engine.LLM` (an alias of `tensorrt_llm.llmapi.llm._TrtLLM`, which adds `save()`).
    """
    import_tensorrt_llm()
    try:
        return importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailableError(
            f"tensorrt_llm is installed but has no TensorRT-engine LLM ({exc}). {INSTALL_HINT}"
        ) from exc


@dataclass(slots=True)
class GpuInfo:
    """What a TensorRT engine is tied to: the GPU model and its compute capability."""

    name: str
    compute_capability: tuple[int, int]
    count: int

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def probe_gpu() -> GpuInfo:
    """The first visible CUDA GPU, through torch (which the TensorRT-LLM container ships)."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "The TensorRT-LLM backend needs an NVIDIA GPU, and torch sees none here. "
            "In Docker pass --gpus all; in Kubernetes request nvidia.com/gpu (see docs/deploy.md)."
        )
    major, minor = torch.cuda.get_device_capability(0)
    return GpuInfo(torch.cuda.get_device_name(0), (major, minor), torch.cuda.device_count())


def build_environment(gpu: GpuInfo, version: str, tp_size: int) -> dict[str, Any]:
    """The manifest `extra` entries that say where an engine can run (read back by check_engine_compatible)."""
    return {
        "tensorrt_llm_version": version,
        "gpu_name": gpu.name,
        "compute_capability": gpu.sm,
        "tp_size": tp_size,
    }


def check_engine_compatible(extra: dict[str, Any], *, runtime_version: str, gpu: GpuInfo) -> None:
    """Raise InvalidEngineError when the engine described by manifest `extra` cannot run here.

    Refused: another tensorrt_llm version (TensorRT engines are not portable across releases), another
    compute capability (kernels are compiled per SM), or fewer GPUs than the tensor-parallel size.
    A different GPU name with the same compute capability (e.g. H100 PCIe vs SXM) is allowed with a warning:
    the engine runs, though its tactics were timed on the other part.
    """
    built_version = extra.get("tensorrt_llm_version")
    built_sm = extra.get("compute_capability")
    built_gpu = extra.get("gpu_name", "unknown GPU")
    if built_version is None or built_sm is None:
        raise InvalidEngineError(
            "engine.json of this TensorRT-LLM engine lacks tensorrt_llm_version/compute_capability in "
            "`extra`; rebuild it with `kiln build --backend trtllm`."
        )
    rebuild = "Rebuild the engine here with `kiln build --backend trtllm` (or use the image it was built in)."
    if built_version != runtime_version:
        raise InvalidEngineError(
            f"This engine was built with tensorrt_llm {built_version}, but tensorrt_llm {runtime_version} "
            f"is installed; TensorRT engines only run with the version that built them. {rebuild}"
        )
    if str(built_sm) != gpu.sm:
        raise InvalidEngineError(
            f"This engine was built for {built_gpu} (compute capability {built_sm}), but this GPU is "
            f"{gpu.name} (compute capability {gpu.sm}); TensorRT engines are compiled per GPU "
            f"architecture. {rebuild}"
        )
    tp_size = int(extra.get("tp_size", 1))
    if tp_size > gpu.count:
        raise InvalidEngineError(
            f"This engine was built for tensor parallelism over {tp_size} GPUs, but only {gpu.count} "
            "GPU(s) are visible. Expose more GPUs (--gpus / nvidia.com/gpu) or rebuild with a smaller --tp-size."
        )
    if built_gpu != gpu.name:
        logger.warning(
            "engine was built on %s and runs on %s (same compute capability %s); it works, "
            "but its kernels were tuned on the other GPU",
            built_gpu,
            gpu.name,
            gpu.sm,
        )
