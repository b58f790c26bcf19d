"""Triton batch-1 GEMV against torch's linear in float64, and the kernel dispatch's choice of it, on
random shapes (ragged ones take the masked path, even ones the unmasked one) in fp16 and bf16."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, INTERPRET, rel_error

from kiln import kernels
from kiln.kernels import reference

pytestmark = pytest.mark.gpu

# (N, K, config or None for the default)
SHAPES = [(64, 128, (4, 64, 4, 1)), (70, 100, (8, 32, 4, 1)), (33, 96, (1, 64, 2, 1)), (50, 300, None)]
if not INTERPRET:
    SHAPES += [(4096, 4096, None), (1000, 4000, None), (12288, 4096, (4, 4096, 8, 3)), (4096, 11008, None)]
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "config"), SHAPES)
def test_gemv_matches_reference(device, dtype, n, k, config):
    from kiln.kernels.triton_gemv import gemv

    gen = torch.Generator(device=device).manual_seed(n * k)
    weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
    x = torch.randn(1, k, device=device, generator=gen).to(dtype)
    out = gemv(x, weight, config=config)
    assert out.shape == (1, n) and out.dtype == dtype
    expected = torch.nn.functional.linear(x.double(), weight.double())
    assert rel_error(out, expected) < BOUND[dtype]


def test_gemv_refuses_what_it_does_not_compute(device):
    from kiln.kernels.triton_gemv import gemv

    weight = torch.zeros(8, 16, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="one token"):
        gemv(torch.zeros(2, 16, device=device, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="features"):
        gemv(torch.zeros(1, 8, device=device, dtype=torch.float16), weight)


@pytest.mark.skipif(INTERPRET, reason="the dispatch picks Triton on CUDA tensors only")
def test_linear_dispatch_takes_the_gemv_for_one_token_only(device, monkeypatch):
    from kiln.kernels import triton_gemv

    calls = []
    real = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    weight = torch.randn(64, 32, device=device, dtype=torch.float16)
    bias = torch.randn(64, device=device, dtype=torch.float16)
    for rows in (1, 2, 7):
        x = torch.randn(rows, 32, device=device, dtype=torch.float16)
        got = kernels.linear(x, weight)
        assert rel_error(got, torch.nn.functional.linear(x.double(), weight.double())) < 2e-3
    kernels.linear(torch.randn(1, 32, device=device, dtype=torch.float16), weight, bias)  # bias: cuBLAS
    assert calls == [torch.Size([1, 32])]


@pytest.mark.skipif(INTERPRET, reason="programmatic dependent launch needs a GPU")
def test_gemv_waits_for_the_kernel_that_writes_its_input(device):
    # On Hopper the GEMV starts before its producer ends and streams weights meanwhile; it must still
    # read the input the producer writes, never the stale one. Chain RMSNorm -> GEMV -> RMSNorm ... in
    # one CUDA graph (as a decode step does), each norm's input the GEMV before it, and check every link.
    from kiln.kernels import pdl, triton_norm
    from kiln.kernels.triton_gemv import gemv

    if not pdl.pdl_enabled(device):
        pytest.skip("this GPU has no programmatic dependent launch")
    gen = torch.Generator(device=device).manual_seed(3)
    weights = [(torch.randn(4096, 4096, device=device, generator=gen) / 64).half() for _ in range(6)]
    norm_weight = torch.ones(4096, device=device, dtype=torch.float16)
    x = torch.randn(1, 4096, device=device, generator=gen).half()

    def chain():
        links, h = [], x
        for w in weights:
            normed, _ = triton_norm.rms_norm(h, norm_weight, 1e-6)
            h = gemv(normed, w)
            links.append((normed, h))
        return links

    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        links = chain()
    for step in range(20):
        x.copy_(torch.randn(1, 4096, device=device, generator=gen).half())
        graph.replay()
        previous = x
        for i, (normed, out) in enumerate(links):
            norm_ref, _ = reference.rms_norm(previous, norm_weight, 1e-6)
            assert rel_error(normed, norm_ref) < 2e-3, f"replay {step}, norm {i}"
            expected = torch.nn.functional.linear(normed.double(), weights[i].double())
            assert rel_error(out, expected) < 2e-3, f"replay {step}, GEMV {i}"
            previous = out
