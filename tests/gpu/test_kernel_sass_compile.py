"""benchmarks.kernel_sass compiles the paged-attention kernel for sm_90 with Triton alone (no GPU needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.gpu


def test_the_fp8_decode_tile_compiles_to_loops_of_tensor_core_products(capsys):
    from benchmarks.kernel_sass import compile_attention, disassemble, loops, main

    usage, sass = disassemble(compile_attention("fp8", None, block_n=64, warps=4, stages=5))
    assert usage.startswith("REG:")
    found = loops(sass)
    assert len(found) >= 2  # whole key tiles, then the masked tail
    for loop in found[:2]:
        assert any(op.startswith("HMMA") for op in loop.opcodes)
        assert any(op.startswith("F2FP.F16.E4M3") for op in loop.opcodes)  # e4m3 widened to float16
    main(["--cache", "bf16", "--top", "3"])
    assert "decode, K bf16, V bf16, 64 keys, 4 warps, 2 stages (sm_90): REG:" in capsys.readouterr().out
