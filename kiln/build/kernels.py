"""`kiln tune` / `kiln build --tune-kernels`: tune the attention tiles for this GPU and compile every
Triton kernel a server meets into `<engine_dir>/kernels/`, so a cold start compiles nothing.

    >>> from kiln.build.kernels import tune_engine_kernels
    >>> summary = tune_engine_kernels("engines/llama2-7b")   # on the GPU model that will serve it

Rules:
- The work runs in a fresh child process (`python -m kiln.build.kernels`) whose TRITON_CACHE_DIR is a new
  empty directory: a process that already ran a kernel holds it in Triton's in-memory cache and would
  never write it to that directory, and the engine the child loads (most of the GPU's memory, CUDA
  graphs) is gone with it. The parent then saves the directory with the profile (kernel_cache.py).
- The child tunes first and applies the result before the engine loads, so the memory profile, the CUDA
  graph capture and the warm-up steps (`warm_steps`) compile the tuned variants. It runs with
  KILN_ENGINE_KERNELS=off so an older kernels/ in the directory is not used meanwhile.
- The kernels match this GPU architecture and Triton build only (see kiln.kernels.kernel_cache).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln import kernels
from kiln.config import DTYPES, EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.engine_dir import EngineManifest
from kiln.errors import BackendUnavailableError, InvalidEngineError, KilnError
from kiln.kernels import tile_sweep
from kiln.kernels.kernel_cache import cache_entries, count_compiled_kernels, write_kernels_dir
from kiln.kernels.tiles import AttentionConfig, KernelProfile, apply_profile, current_target
from kiln.version import __version__

MAX_TUNE_CONTEXT = 2048  # decode contexts and prefill lengths of the sweep (at most the engine's limits)


class KernelTuningError(KilnError):
    """The tuning child process failed."""


@dataclass(slots=True)
class TuneSummary:
    kernels_dir: Path
    seconds: float  # all of it, child start to kernels/ in place
    tune_seconds: float  # the attention sweep
    warm_seconds: float  # loading the engine (memory profile, CUDA graphs) and the warm-up steps
    num_kernels: int  # compiled GPU kernels saved
    num_entries: int  # Triton cache entries saved (kernels and their host-side launchers)
    decode: AttentionConfig
    prefill: AttentionConfig


def check_tunable(engine_dir: Path, device: str = "cuda") -> EngineManifest:
    """The engine's manifest, once it is known to be a native engine on a machine with a CUDA GPU;
    InvalidEngineError or BackendUnavailableError (both saying what to do) otherwise."""
    manifest = EngineManifest.load(Path(engine_dir))
    if manifest.backend != "native":
        raise InvalidEngineError(
            f"{engine_dir} holds a {manifest.backend!r} engine: only native engines run Triton kernels "
            "(TensorRT-LLM picks its kernels when it builds the engine)"
        )
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailableError(
            "tuning kernels needs a CUDA GPU and none is visible here: build the engine anywhere, then run "
            "`kiln tune ENGINE_DIR` on a machine with the GPU model that will serve it"
        )
    return manifest


def tune_engine_kernels(
    engine_dir: str | Path, *, device: str = "cuda", progress: bool = True
) -> TuneSummary:
    """Tune and compile into `<engine_dir>/kernels/` (replacing an older one only once the new is whole).
    `progress` shows the child's output as it runs; otherwise it is kept for the error message."""
    engine_dir = Path(engine_dir).resolve()
    check_tunable(engine_dir, device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as tmp:
        cache, result = Path(tmp) / "triton-cache", Path(tmp) / "result.json"
        env = dict(os.environ, TRITON_CACHE_DIR=str(cache), KILN_ENGINE_KERNELS="off")
        for name in ("TRITON_CACHE_MANAGER", "TRITON_REMOTE_CACHE_BACKEND", "TRITON_ALWAYS_COMPILE"):
            env.pop(name, None)  # the child must compile into `cache` through Triton's own file cache
        package_root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "kiln.build.kernels", str(engine_dir), "--device", device]
        command += ["--result", str(result)] + ([] if progress else ["--quiet"])
        done = subprocess.run(command, env=env, capture_output=not progress, text=True)
        if done.returncode != 0:
            tail = "" if progress else "\n" + (done.stdout + done.stderr)[-4000:]
            raise KernelTuningError(f"kernel tuning failed (exit status {done.returncode}){tail}")
        data = json.loads(result.read_text())
        profile = KernelProfile.from_dict(data["profile"])
        kernels_dir = write_kernels_dir(engine_dir, profile, cache)
        num_kernels, num_entries = count_compiled_kernels(cache), len(cache_entries(cache))
    return TuneSummary(
        kernels_dir=kernels_dir,
        seconds=time.perf_counter() - start,
        tune_seconds=profile.tune_seconds,
        warm_seconds=data["warm_seconds"],
        num_kernels=num_kernels,
        num_entries=num_entries,
        decode=profile.decode,
        prefill=profile.prefill,
    )


def tune_and_warm(engine_dir: Path, device: str, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The child's work (Triton's cache dir already set): tune, apply, load the engine, warm it up.
    Returns the profile and the warm-up time as JSON-ready data."""

    manifest = check_tunable(engine_dir, device)
    config, limits = manifest.model, manifest.limits
    max_len = min(limits.resolved_max_seq_len(config), config.max_position_embeddings)
    target = current_target(device)
    say(f"tuning attention tiles on {target.name} ...")
    result = tile_sweep.tune_attention(
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        block_size=limits.block_size,
        dtype=DTYPES[manifest.dtype],
        device=device,
        max_context=min(MAX_TUNE_CONTEXT, max_len),
        max_tokens=min(MAX_TUNE_CONTEXT, limits.max_num_tokens, max_len),
        log=lambda line: say(f"  {line}"),
        kv_cache_dtype=torch.float8_e4m3fn if manifest.kv_cache_dtype == "fp8" else None,
    )
    profile = KernelProfile(
        gpu_name=target.name,
        compute_capability=target.compute_capability,
        triton_version=target.triton_version,
        torch_version=torch.__version__,
        kiln_version=__version__,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        block_size=limits.block_size,
        dtype=manifest.dtype,
        kv_cache_dtype=manifest.kv_cache_dtype,
        decode=result.decode,
        prefill=result.prefill,
        timings=result.timings,
        cases=result.cases,
        tune_seconds=result.seconds,
    )
    say(f"chose decode {profile.decode}, prefill {profile.prefill} ({result.seconds:.1f} s)")
    apply_profile(profile, target)
    start = time.perf_counter()
    say("loading the engine (memory profile, CUDA graph capture) and compiling every step's kernels ...")
    engine = LLMEngine.from_path(engine_dir, EngineConfig(device=device, load_progress=False))
    steps = warm_steps(engine, max_num_tokens=limits.max_num_tokens, max_num_seqs=limits.max_batch_size)
    torch.cuda.synchronize()
    warm_seconds = time.perf_counter() - start
    say(f"ran {steps} warm-up steps ({warm_seconds:.1f} s)")
    return {"profile": profile.to_dict(), "warm_seconds": warm_seconds}


def warm_steps(engine: LLMEngine, *, max_num_tokens: int, max_num_seqs: int, seed: int = 0) -> int:
    """Drive `engine` through the kinds of step a server meets, so the Triton variants they need compile
    now: prefills of assorted lengths (1 to max_num_tokens), a prompt longer than a step's budget
    (chunked) and another reading its cached blocks, ragged steps mixing prefills into running decodes,
    then, with the decode CUDA graphs set aside, eager decode at odd batch sizes, each also at every
    context length where its attention variant changes (`decode_lengths`: what an `enforce_eager` server,
    a mixed step's leading decodes and batches beyond the graphs run),
    and last the structured outputs' mask kernel on its own. Greedy, EOS ignored, random token ids.
    Returns the number of steps run."""

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    longest = max(1, engine.max_model_len - 8)  # room for the (at most 8) tokens a request here generates

    def prompt(length: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(1, min(length, longest)))]

    def add(prompts: list[list[int]], max_tokens: int = 2) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for ids in prompts:
            engine.add_request(None, params=params, prompt_token_ids=ids)

    def drain(limit: int | None = None) -> int:
        steps = 0
        while engine.has_unfinished_requests() and (limit is None or steps < limit):
            engine.step()
            steps += 1
        return steps

    steps = 0
    for length in dict.fromkeys(min(n, longest) for n in (1, 7, 16, 100, 128, 1000, max_num_tokens)):
        add([prompt(length)])
        steps += drain()
    chunked = prompt(max_num_tokens + max_num_tokens // 2 + 5)
    add([chunked])
    steps += drain()
    add([chunked[: max(1, len(chunked) - 3)] + prompt(3), chunked[:40] + prompt(5)])  # prefix hits
    steps += drain()
    add([prompt(n) for n in (3, 17, 40, 64, 5, 90)][:max_num_seqs], max_tokens=8)
    steps += drain(limit=2)
    add([prompt(n) for n in (33, 300, 7)], max_tokens=4)  # join the running decodes
    steps += drain()
    runner = getattr(engine, "runner", None)
    graphs = getattr(runner, "graphs", None)
    if graphs is not None:
        runner.graphs = None  # type: ignore[union-attr]  (restored below)
    try:
        for batch in (1, 3, 5, 17, 33):
            if batch <= max_num_seqs:
                add([prompt(rng.randint(5, 200)) for _ in range(batch)], max_tokens=4)
                steps += drain()
                for length in decode_lengths(engine, batch):
                    # Decoding over about `length` keys, all together once the last prompt is in: each makes
                    # enough tokens to outlast the prefill steps the batch's prompts take.
                    chunks = -(-batch * length // max_num_tokens)
                    add([prompt(length - 1) for _ in range(batch)], max_tokens=min(8, chunks + 2))
                    steps += drain()
    finally:
        if graphs is not None:
            runner.graphs = graphs  # type: ignore[union-attr]
    # Structured outputs' mask kernel: one variant for every shape, so any logits and mask compile it.
    kernels.apply_token_bitmask(
        torch.zeros((1, vocab), device=engine.device),
        torch.zeros((1, 1), dtype=torch.int32, device=engine.device),
    )
    return steps


def decode_lengths(engine: LLMEngine, batch: int) -> list[int]:
    """The shortest context of a decode batch of `batch` requests for each attention variant it can meet:
    each split count `choose_num_splits` gives, in each class of context whose decode tile differs
    (`kernels.decode_context_bounds`: an fp8 cache's tile changes past 512 keys). None off CUDA, where no
    Triton kernel runs, and for an engine whose model runs in worker processes."""
    runner = getattr(engine, "runner", None)
    if engine.device.type != "cuda" or runner is None:
        return []
    from kiln.kernels.triton_attention import choose_num_splits  # Triton: CUDA machines only

    sms = torch.cuda.get_device_properties(engine.device).multi_processor_count
    kv_heads = engine.model_config.num_key_value_heads
    bounds = kernels.decode_context_bounds(runner.kv_caches[0][0])
    longest = min(engine.max_model_len - 6, 64 * 33)  # 32 splits of 64 keys at most
    return variant_lengths(lambda n: choose_num_splits(batch, kv_heads, n, sms), bounds, longest)


def variant_lengths(num_splits: Callable[[int], int], bounds: Sequence[int], longest: int) -> list[int]:
    """The shortest context from 2 to `longest` keys for each pair (split count, tile class): the class is
    how many of the ascending `bounds` the context exceeds."""
    first: dict[tuple[int, int], int] = {}
    for length in range(2, longest + 1):
        first.setdefault((num_splits(length), bisect.bisect_left(bounds, length)), length)
    return sorted(first.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The child process of tune_engine_kernels.")
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write the outcome to")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if torch.device(args.device).index is not None:
        torch.cuda.set_device(args.device)  # Triton launches on the current device
    data = tune_and_warm(args.engine_dir, args.device, say)
    args.result.write_text(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
