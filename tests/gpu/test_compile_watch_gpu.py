"""kiln.kernels.compile_watch on a GPU: Triton's own JIT calls the hooks once per new kernel variant.

A kernel of this test's own, launched with a constexpr value new to this process, is one variant built
(from Triton's disk cache or compiled); the same launch again is none; another value is one more.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from kiln.kernels.compile_watch import compile_watch  # noqa: E402

pytestmark = pytest.mark.gpu


@triton.jit
def _add_constant(x_ptr, N, ADD: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + ADD, mask=mask)


def test_a_new_variant_is_counted_once_with_its_seconds():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the interpreter builds no variants")
    watch = compile_watch()
    assert watch is not None
    x = torch.zeros(100, device="cuda")
    count, seconds = watch.count, watch.seconds
    _add_constant[(1,)](x, 100, ADD=3, BLOCK=128)
    assert watch.count == count + 1 and watch.seconds > seconds
    _add_constant[(1,)](x, 100, ADD=3, BLOCK=128)
    assert watch.count == count + 1
    _add_constant[(1,)](x, 100, ADD=4, BLOCK=128)
    assert watch.count == count + 2
    torch.cuda.synchronize()
    assert x[0].item() == 10.0
