"""The quantized and fp8-KV-cache Triton kernels compile for Hopper (sm_90) and Ada (sm_89), with no GPU needed.

Triton compiles ahead of time for a named target (its own ptxas ships in the wheel), so a machine without a
GPU can still catch what the interpreter cannot: a construct the compiler refuses for the target (an e4m3
dot, a layout, shared memory), or a constexpr branch the interpreter never took. This compiles each kernel's
variants with the signature its launcher passes; what they compute is checked by the other tests here, on
a GPU or under TRITON_INTERPRET=1. Skipped where Triton is not installed (the CPU CI).
"""

from __future__ import annotations

import itertools
import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

pytestmark = pytest.mark.gpu
ARCHS = [90, 89]
ACTS = ["fp16", "bf16"]


def _compile(
    kernel,
    pointers: dict[str, str],
    constexprs: dict,
    arch: int,
    floats: tuple[str, ...] = (),
    stage: str = "ptx",
    aligned: tuple[str, ...] = (),
    options: dict | None = None,
) -> str:
    """`stage` (PTX, or "ttgir") of `kernel` for sm_`arch`: pointer types from `pointers`, `floats` fp32,
    other arguments i32. `aligned` arguments are known multiples of 16, as the JIT marks an aligned
    pointer or stride (what lets Triton vectorize and pipeline a load); `options` e.g. num_stages."""
    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
    names = [param.name for param in kernel.params]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm[stage]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(
    ("x", "weight"), [("act", "i8"), ("act", "fp8e4nv"), ("fp8e4nv", "fp8e4nv"), ("i8", "i8")]
)
def test_quant_gemm_compiles_for_every_operand_pair_and_tile(arch, act, x, weight):
    from kiln.kernels.triton_quant_gemm import SMALL_BATCH_TILES, _quant_gemm_kernel, gemm_config

    x = act if x == "act" else x
    pointers = {"a_ptr": f"*{x}", "b_ptr": f"*{weight}", "scale_ptr": "*fp32", "a_scale_ptr": "*fp32"}
    pointers |= {"bias_ptr": f"*{act}", "c_ptr": f"*{act}"}
    configs = [gemm_config(m, hopper=False) for m in (1, 32, 256)] + list(SMALL_BATCH_TILES.values())
    tiles = [(*config[:3], config[6]) for config in configs]
    tiles += [(16, n, k, True) for n, k in itertools.product((16, 64), (128, 512))]
    for block_m, block_n, block_k, swap in tiles:
        via_f32 = arch < 90 and x == "bf16" and weight == "fp8e4nv"  # kiln.kernels.triton_fp8's rule
        constexprs = dict(GROUP=0, SCALED_A=x == weight, SWAP=swap, FP8_VIA_F32=via_f32, HAS_BIAS=True)
        constexprs |= dict(BITS=x != weight and weight == "i8")  # int8 weight-only: the bit widening too
        constexprs |= dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
        ptx = _compile(_quant_gemm_kernel, pointers, constexprs, arch)
        assert "mma" in ptx, (block_m, block_n, block_k, swap)  # a tensor-core product, mma.sync or wgmma


def test_fp8_gemm_promotes_hoppers_accumulator_into_float32():
    """The decode-batch FP8 x FP8 tile on sm_90 (a wgmma product, the weight tile first): its dot promotes
    the tensor core's reduced-precision accumulator into float32 once per K tile, where Triton's default
    (2**30) would sum all of K in it."""
    import torch

    from kiln.kernels.triton_quant_gemm import SMALL_BATCH_TILES, _quant_gemm_kernel

    block_m, block_n, block_k, group_m, *_, swap = SMALL_BATCH_TILES[True, torch.float8_e4m3fn]
    pointers = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "a_scale_ptr": "*fp32"}
    pointers |= {"bias_ptr": "*fp16", "c_ptr": "*fp16"}
    constexprs = dict(GROUP=0, SCALED_A=True, SWAP=swap, FP8_VIA_F32=False, BITS=False, HAS_BIAS=False)
    constexprs |= dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m)
    ttgir = _compile(_quant_gemm_kernel, pointers, constexprs, 90, stage="ttgir")
    assert f"maxNumImpreciseAcc = {block_k}" in ttgir and "warp_group_dot" in ttgir


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("weight", ["i8", "fp8e4nv"])
def test_quant_gemv_widens_by_bits_without_conversion_instructions(arch, act, weight):
    """`bit_widen`'s GEMV compiles, and widens its weights by integer operations: no int8 -> float or e4m3
    conversion instruction is left, where the default path has one for every weight element (or pair)."""
    from kiln.kernels.triton_quant_gemv import _quant_gemv_kernel

    pointers = {"x_ptr": f"*{act}", "w_ptr": f"*{weight}", "scale_ptr": "*fp32", "x_scale_ptr": "*fp32"}
    pointers |= {"bias_ptr": f"*{act}", "out_ptr": f"*{act}"}
    weight_conversion = "cvt.rn.f32.s" if weight == "i8" else "e4m3"
    for bits in (False, True):
        constexprs = dict(EVEN=True, BLOCK_N=4, BLOCK_K=2048, GROUP=0, INT_X=False, HAS_BIAS=True)
        constexprs |= dict(BITS=bits, FP8_W=weight == "fp8e4nv", PDL=arch >= 90)
        ptx = _compile(_quant_gemv_kernel, pointers, constexprs, arch)
        assert (weight_conversion in ptx) != bits, bits


@pytest.mark.parametrize("arch", ARCHS)
def test_quant_gemm_widens_int8_to_float16_by_bits(arch):
    """The weight-only GEMM's `bit_widen` for a float16 x: no int8 -> float16 conversion instruction is
    left (Triton's own widening to bfloat16 already is an integer trick, so bfloat16 keeps it)."""
    from kiln.kernels.triton_quant_gemm import _quant_gemm_kernel

    pointers = {"a_ptr": "*fp16", "b_ptr": "*i8", "scale_ptr": "*fp32", "a_scale_ptr": "*fp32"}
    pointers |= {"bias_ptr": "*fp16", "c_ptr": "*fp16"}
    for bits in (False, True):
        constexprs = dict(GROUP=0, SCALED_A=False, SWAP=True, FP8_VIA_F32=False, BITS=bits, HAS_BIAS=False)
        constexprs |= dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=8)
        ptx = _compile(_quant_gemm_kernel, pointers, constexprs, arch)
        assert ("cvt.rn.f16.s16" in ptx) != bits, bits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("quant", [None, "i8", "fp8e4nv"])
def test_norm_and_activation_quantization_compile(arch, act, quant):
    from kiln.kernels.triton_norm import _rms_norm_kernel
    from kiln.kernels.triton_quant_act import _quantize_rows_kernel

    q = quant or act
    common = dict(QMAX=127.0 if quant == "i8" else 448.0, TO_INT8=quant == "i8", LAUNCH_DEPENDENTS=arch >= 90)
    for residual in (False, True):
        pointers = {
            name: f"*{act}" for name in ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "new_residual_ptr")
        }
        pointers |= {"out_ptr": f"*{q}", "scale_ptr": "*fp32"}
        out_dtype = {"fp16": triton.language.float16, "bf16": triton.language.bfloat16}[act]
        constexprs = dict(
            HAS_RESIDUAL=residual, OUT_DTYPE=out_dtype, QUANT=quant is not None, BLOCK=4096, **common
        )
        ptx = _compile(_rms_norm_kernel, pointers, constexprs, arch, floats=("eps",))
        assert ("div.rn.f32" in ptx) == (quant is not None)  # the IEEE divisions of the quantization
    if quant is None:
        return
    for smooth, gated in itertools.product((False, True), (False, True)):
        pointers = {"x_ptr": f"*{act}", "smooth_ptr": "*fp32", "q_ptr": f"*{q}", "scale_ptr": "*fp32"}
        _compile(
            _quantize_rows_kernel, pointers, dict(HAS_SMOOTH=smooth, GATED=gated, BLOCK=4096, **common), arch
        )


def _attention_pointers(act: str, cache: str) -> dict[str, str]:
    """The pointer types paged_attention passes its kernel (a 16-bit cache takes no scales: any tensor)."""
    scale = "*fp32" if cache == "fp8e4nv" else "*i32"
    pointers = {
        "q_ptr": f"*{act}",
        "out_ptr": f"*{act}",
        "k_cache_ptr": f"*{cache}",
        "v_cache_ptr": f"*{cache}",
    }
    pointers |= {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "k_scale_ptr": scale, "v_scale_ptr": scale}
    for name in ("split_counters_ptr", "query_start_loc_ptr", "seq_lens_ptr", "block_tables_ptr"):
        pointers[name] = "*i32"
    return pointers


def _attention_constexprs(
    act: str, cache: str, arch: int, *, block_q: int, block_n: int, splits: int
) -> dict:
    """Llama-3.1-8B's heads (32 query, 8 KV, 128 wide), blocks of 16, as paged_attention sets them."""
    scaled = cache == "fp8e4nv"
    constexprs = dict(NUM_HEADS=32, GROUP=4, GROUP_P2=4, HEAD_DIM=128, HEAD_DIM_P2=128, BLOCK_SIZE=16)
    constexprs |= dict(BLOCK_Q=block_q, BLOCK_M=64 if block_q > 1 else 16, BLOCK_N=block_n, NUM_SPLITS=splits)
    constexprs |= dict(
        KEYS_TRANSPOSED=False, DECODE=block_q == 1, KV_SCALED=scaled, LAUNCH_DEPENDENTS=arch >= 90
    )
    constexprs |= dict(SKIP_LONG_PROMPTS=block_q > 1 and not scaled, LONG_PROMPT_TOKENS=1024)
    return constexprs | dict(F16_DOTS=scaled and act == "bf16")  # paged_attention's rule


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("cache", ["act", "fp8e4nv"])
def test_kv_cache_kernels_compile_for_16_bit_and_fp8_caches(arch, act, cache):
    from kiln.kernels.triton_attention import _paged_attention_kernel
    from kiln.kernels.triton_cache import _rotary_kernel, _store_kv_kernel

    cache = act if cache == "act" else cache
    scaled = cache == "fp8e4nv"
    pointers = _attention_pointers(act, cache)
    for splits, block_q, transposed in ((1, 16, False), (4, 1, True)):
        constexprs = _attention_constexprs(act, cache, arch, block_q=block_q, block_n=64, splits=splits)
        constexprs |= dict(KEYS_TRANSPOSED=transposed)
        _compile(_paged_attention_kernel, pointers, constexprs, arch, floats=("scale_log2",))
    scale = "*fp32" if scaled else "*i64"
    pointers = {
        "key_ptr": f"*{act}",
        "value_ptr": f"*{act}",
        "k_cache_ptr": f"*{cache}",
        "v_cache_ptr": f"*{cache}",
    }
    pointers |= {"slot_ptr": "*i64", "k_scale_ptr": scale, "v_scale_ptr": scale}
    constexprs = dict(NUM_HEADS=8, HEADS_P2=8, HEAD_DIM=128, HEAD_DIM_P2=128, SCALED=scaled)
    _compile(_store_kv_kernel, pointers, constexprs, arch)
    pointers = {"positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "q_ptr": f"*{act}", "q_out_ptr": f"*{act}"}
    pointers |= {"k_ptr": f"*{act}", "k_out_ptr": f"*{cache}", "v_ptr": f"*{act}", "v_cache_ptr": f"*{cache}"}
    pointers |= {"slot_ptr": "*i64", "k_scale_ptr": scale, "v_scale_ptr": scale}
    constexprs = dict(NUM_Q_HEADS=32, Q_HEADS_P2=32, NUM_KV_HEADS=8, KV_HEADS_P2=8, HALF=64, HALF_P2=64)
    _compile(_rotary_kernel, pointers, constexprs | dict(TO_CACHE=True, SCALED=scaled), arch)


def test_fp8_decode_tiles_double_buffer_their_keys_and_values():
    """The built-in fp8-cache decode tile has five stages for one reason: with them Triton keeps the next
    K/V tiles' copies in flight while a tile is computed (an async wait that leaves copies pending), where
    with two it waits for every copy, the block-table load in front taking a stage. A Triton that pipelines
    differently should fail here, not only slow down. Compiled as the JIT compiles it: pointers and the
    cache's strides 16-aligned."""
    from kiln.kernels.attention_plan import builtin_config
    from kiln.kernels.triton_attention import _paged_attention_kernel

    config = builtin_config(True, 128, fp8_cache=True)
    pointers = _attention_pointers("bf16", "fp8e4nv")
    strides = (
        "stride_qt",
        "stride_qh",
        "stride_ot",
        "stride_oh",
        *(f"stride_{t}{d}" for t in "kv" for d in "bsh"),
    )
    constexprs = _attention_constexprs("bf16", "fp8e4nv", 90, block_q=1, block_n=config.block_n, splits=1)

    def pending(num_stages: int) -> list[int]:
        options = dict(num_warps=config.num_warps, num_stages=num_stages)
        ttgir = _compile(
            _paged_attention_kernel, pointers, constexprs, 90, floats=("scale_log2",), stage="ttgir",
            aligned=(*pointers, *strides), options=options,
        )  # fmt: skip
        return [int(n) for n in re.findall(r"async_wait[^{]*\{num = (\d+)", ttgir)]

    assert max(pending(config.num_stages)) > 0
    assert pending(2) and max(pending(2)) == 0


def test_only_bfloat16_before_hopper_widens_e4m3_through_float32(monkeypatch):
    import torch

    from kiln.kernels import triton_fp8

    cuda = torch.device("cuda", 0)
    for capability, bf16 in (((8, 9), True), ((9, 0), False), ((10, 0), False)):
        monkeypatch.setattr(triton_fp8, "_capability", lambda index, c=capability: c)
        assert triton_fp8.fp8_via_float32(cuda, torch.bfloat16) is bf16
        assert triton_fp8.fp8_via_float32(cuda, torch.float16) is False
    assert triton_fp8.fp8_via_float32(torch.device("cpu"), torch.bfloat16) is False
