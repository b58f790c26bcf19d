"""GPU test setup: the `device` the Triton kernels run on.

The tests here run on CUDA. Without a GPU they are skipped, except under TRITON_INTERPRET=1, where
Triton's interpreter runs the same kernels on CPU tensors (slowly: the tests then shrink their
shapes) so kernels can be debugged on a machine with no GPU.

Tests that build an engine size its KV cache from the GPU's free memory, so two of them side by side run
out of it: they carry the `whole_gpu` mark (the modules below wholly) and run one at a time, while the
kernel tests may run in parallel (`scripts/gpu_check.sh tests` does both).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import kernel_device

# Every test of these modules builds an engine (or a child process that does).
WHOLE_GPU_MODULES = {
    "test_engine_gpu.py",
    "test_bench_harness.py",
    "test_kernel_tuning.py",
    "test_default_model_gpu.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in WHOLE_GPU_MODULES:
            item.add_marker(pytest.mark.whole_gpu)


@pytest.fixture
def device() -> torch.device:
    found = kernel_device()
    if found is None:
        pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)")
    return found
