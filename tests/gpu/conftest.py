"""GPU test setup: the `device` the Triton kernels run on.

The tests here run on CUDA. Without a GPU they are skipped, except under TRITON_INTERPRET=1, where
Triton's interpreter runs the same kernels on CPU tensors (slowly: the tests then shrink their
shapes) so kernels can be debugged on a machine with no GPU.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import kernel_device


@pytest.fixture
def device() -> torch.device:
    found = kernel_device()
    if found is None:
        pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)")
    return found
