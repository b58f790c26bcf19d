"""What the paged-attention kernel compiles to on Hopper, without a GPU: the instruction mix of its loops.

    python -m benchmarks.kernel_sass --cache fp8              # the fp8 cache's long-context decode tile
    python -m benchmarks.kernel_sass --cache fp8 --v-dtype fp16 --block-n 64 --warps 4 --stages 5

Triton compiles `_paged_attention_kernel` for sm_90 (Llama-3.1-8B heads: 32 query heads in groups of 4,
head dim 128, blocks of 16; a bfloat16 query) with the tile given, and the cuobjdump that Triton ships
disassembles it. Reported: registers, shared memory and spills, and for each loop (a backward branch in the
SASS) its instruction count per warp and iteration with the commonest opcodes. The decode loop's first loop
is the unmasked one (whole key tiles), the second the masked tail. A count is not a timing: it says what
a loop issues, which bounds it where it is not bound by memory (decode over an fp8 cache,
docs/quantization.md). `--v-dtype` gives V another dtype than K, to see what each operand costs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Triton's names of the element types that may be passed.
TRITON_TYPES = {"fp8": "fp8e4nv", "bf16": "bf16", "fp16": "fp16"}
STRIDES = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh",
           "stride_vb", "stride_vs", "stride_vh")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Loop:
    start: int  # address of its first instruction
    instructions: int  # per warp and iteration
    opcodes: Counter


def compile_attention(
    cache: str, v_dtype: str | None, block_n: int, warps: int, stages: int, decode: bool = True
) -> bytes:
    """The cubin of the paged-attention kernel for sm_90 with these operand types and tile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kiln.kernels.triton_attention import _paged_attention_kernel as kernel

    fp8 = cache == "fp8"
    k_type = TRITON_TYPES[cache]
    types = {
        "q_ptr": "*bf16", "k_cache_ptr": f"*{k_type}", "v_cache_ptr": f"*{TRITON_TYPES[v_dtype or cache]}",
        "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "split_counters_ptr": "*i32",
        "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32",
        "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "num_seqs": "i32", "tile_base": "i32", "seq_base": "i32",
        "scale_log2": "fp32", "stride_bt": "i32", **dict.fromkeys(STRIDES, "i32"),
    }  # fmt: skip
    group, block_q = 4, 1 if decode else 32
    constexprs = {
        "NUM_HEADS": 32, "GROUP": group, "GROUP_P2": group, "HEAD_DIM": 128, "HEAD_DIM_P2": 128,
        "BLOCK_SIZE": 16, "BLOCK_Q": block_q, "BLOCK_M": max(16, block_q * group), "BLOCK_N": block_n,
        "NUM_SPLITS": 1, "DECODE": decode, "SKIP_LONG_PROMPTS": False, "LONG_PROMPT_TOKENS": 8192,
        "KEYS_TRANSPOSED": False, "KV_SCALED": fp8, "F16_DOTS": fp8, "LAUNCH_DEPENDENTS": True,
    }  # fmt: skip
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    aligned = [name for name in names if types.get(name, "").startswith("*") or name in STRIDES]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    return compiled.asm["cubin"]


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(resource usage line, SASS) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True
        )
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True)
    found = re.search(r"REG:\d+.*", usage.stdout)
    return (found.group(0).strip() if found else usage.stdout.strip()), sass.stdout


def loops(sass: str) -> list[Loop]:
    """Every loop of the SASS: the instructions from a backward branch's target up to the branch."""
    instructions = [
        (int(m.group(1), 16), m.group(2).strip())
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?);", sass)
    ]
    index = {address: i for i, (address, _) in enumerate(instructions)}
    found = []
    for i, (address, text) in enumerate(instructions):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            body = instructions[index[int(target.group(1), 16)] : i + 1]
            opcodes = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in body)
            found.append(Loop(body[0][0], len(body), opcodes))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", choices=sorted(TRITON_TYPES), default="fp8", help="K (and V) cache dtype")
    parser.add_argument(
        "--v-dtype", choices=sorted(TRITON_TYPES), default=None, help="V's, if not the cache's"
    )
    parser.add_argument("--block-n", type=int, default=64, help="keys a tile")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=None, help="default: 5 for fp8, 2 otherwise")
    parser.add_argument(
        "--prefill", action="store_true", help="the prefill tile (128 rows) instead of decode"
    )
    parser.add_argument("--top", type=int, default=14, help="opcodes shown a loop")
    args = parser.parse_args(argv)
    stages = args.stages or (5 if args.cache == "fp8" else 2)
    cubin = compile_attention(args.cache, args.v_dtype, args.block_n, args.warps, stages, not args.prefill)
    usage, sass = disassemble(cubin)
    kind = "prefill" if args.prefill else "decode"
    print(f"{kind}, K {args.cache}, V {args.v_dtype or args.cache}, {args.block_n} keys, {args.warps} warps, "
          f"{stages} stages (sm_90): {usage}")  # fmt: skip
    for loop in loops(sass):
        common = ", ".join(f"{op} {n}" for op, n in loop.opcodes.most_common(args.top))
        print(f"  loop at {loop.start:#06x}: {loop.instructions} instructions a warp an iteration; {common}")


if __name__ == "__main__":
    main()
