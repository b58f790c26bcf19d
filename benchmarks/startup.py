"""Start-to-ready of a native engine directory: from a fresh process's start to ready, and to first token.

    python -m benchmarks.startup --random llama2-7b --dir /tmp/kiln-llama2-7b --out results.json

Writes (once) an engine directory of random weights at a preset shape (sharded safetensors, checksums,
a word-level tokenizer, engine.json), then starts fresh Python processes that open it with
`LLMEngine.from_path` (imports, loading the weights, the memory profile, the KV cache, CUDA-graph
capture) and run one 128-token request. Each child gets an EMPTY Triton cache (TRITON_CACHE_DIR set to a
new directory), as on a fresh machine, and runs twice per repeat: without the engine directory's
`kernels/` (KILN_ENGINE_KERNELS=off: every Triton kernel compiles) and with it (written once by
`kiln.build.kernels.tune_engine_kernels`, whose time is reported too). Reported: seconds from the
process start to the engine being ready, and to its first token, and the phases between (imports —
the interpreter's start, then importing the engine, whose module-by-module `-X importtime` report
`--import-profile DIR` keeps — then `LLMEngine.startup_seconds`: the engine's kernels, the weights,
what the tokenizer's thread (transformers' import) adds after them, the KV cache, CUDA graphs, and these
by family: piecewise, prefill, decode). `-X importtime` slows imports itself: figures to compare come
from runs without `--import-profile`. The weight files were just written, so they come from the page cache: a
cold disk adds its read time (13 GB for Llama-2-7B fp16). `--loading-only` instead times loading the weights onto the GPU in this process,
through pinned staging buffers and by plain copies, alternating. The engine's knobs (`--max-num-seqs`,
`--prefill-graph-tokens`, ...) reach the children; a run with any set away from its default is named after
them, so a figure for the default is never mixed with one for another setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kiln.bench.workload import add_engine_arguments, engine_config

CHILD = """
import time
started = time.time()
import json, sys
from kiln.engine.llm_engine import LLMEngine
imported = time.time()
from kiln.config import EngineConfig
from kiln.engine.process_setup import prepare_process
from kiln.engine.sampling_params import SamplingParams
engine = LLMEngine.from_path(sys.argv[1], EngineConfig(**json.loads(sys.argv[2])))
prepare_process(engine.config)
ready = time.time()
engine.add_request("r", params=SamplingParams(temperature=0, max_tokens=1), prompt_token_ids=list(range(10, 138)))
while engine.has_unfinished_requests():
    engine.step()
marks = {"started": started, "imported": imported, "ready": ready, "first_token": time.time()}
print(json.dumps({**marks, "phases": engine.startup_seconds, "graphs": engine.graph_capture_seconds}))
"""


def write_random_engine(shape: str, out: Path, max_shard_bytes: int = 2 << 30) -> None:
    """An engine directory of random weights at `shape`, made on the GPU and written shard by shard."""
    import torch
    from safetensors.torch import save_file

    from kiln.bench.workload import RANDOM_SHAPES, write_wordlevel_tokenizer
    from kiln.config import DTYPES, ModelConfig
    from kiln.engine_dir import EngineManifest, sha256_file
    from kiln.models.weights import expected_packed_shapes

    dtype, hf_config = RANDOM_SHAPES[shape]
    config = ModelConfig.from_hf({"model_type": "llama", **hf_config})
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape_ in expected_packed_shapes(config).items():
        if len(shape_) == 1:
            tensor = torch.ones(shape_, dtype=DTYPES[dtype])
        else:
            tensor = (
                torch.randn(shape_, device=device, generator=generator).mul_(0.02).to(DTYPES[dtype]).cpu()
            )
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_files, sizes = {}, {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name)
        weight_files[name] = sha256_file(out / name)
        sizes[name] = (out / name).stat().st_size
    before = set(p.name for p in out.iterdir())
    write_wordlevel_tokenizer(out, config.vocab_size)
    tokenizer_files = sorted(set(p.name for p in out.iterdir()) - before)
    for name in tokenizer_files:
        sizes[name] = (out / name).stat().st_size
    EngineManifest(
        backend="native",
        model=config,
        dtype=dtype,
        weight_files=weight_files,
        tokenizer_files=tokenizer_files,
        file_sizes=sizes,
        served_model_name=f"random-{shape}",
        source=f"random({shape})",
    ).save(out)


def measure(
    engine_dir: Path,
    *,
    empty_cache: bool = False,
    engine_kernels: bool = True,
    import_profile: Path | None = None,
    knobs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Times of one fresh child; `empty_cache` gives it a new empty Triton cache, `engine_kernels=False`
    makes it ignore the engine directory's kernels/, `import_profile` runs it under `-X importtime`,
    writing that report there, and `knobs` are EngineConfig fields it opens the engine with.
    `imports_s` splits into the interpreter's start (`interpreter_s`) and importing the engine
    (`engine_import_s`)."""
    env = dict(os.environ)
    if not engine_kernels:
        env["KILN_ENGINE_KERNELS"] = "off"
    with tempfile.TemporaryDirectory(prefix="kiln-startup-triton-") as cache:
        if empty_cache:
            env["TRITON_CACHE_DIR"] = cache
        start = time.time()
        profiling = ["-X", "importtime"] if import_profile else []
        done = subprocess.run(
            [
                sys.executable,
                *profiling,
                "-c",
                CHILD,
                str(engine_dir),
                json.dumps({"load_progress": False, **(knobs or {})}),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    if import_profile:
        import_profile.write_text(done.stderr)
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "start_to_ready_s": marks["ready"] - start,
        "start_to_first_token_s": marks["first_token"] - start,
        "imports_s": marks["imported"] - start,
        "interpreter_s": marks["started"] - start,
        "engine_import_s": marks["imported"] - marks["started"],
        **{f"{phase}_s": seconds for phase, seconds in marks["phases"].items()},
        **{f"graphs_{family}_s": seconds for family, seconds in marks["graphs"].items()},
    }


def loading_seconds(engine_dir: Path, rounds: int = 2) -> dict[str, list[float]]:
    """Seconds to load the engine directory's weights onto the GPU in this process, through the pinned
    staging buffers and by plain copies from pageable memory, alternating (staged first), `rounds` each."""
    import torch

    from kiln.models.loader import load_model

    times: dict[str, list[float]] = {"staged": [], "plain": []}
    for _ in range(rounds):
        for way in times:
            torch.cuda.synchronize()
            start = time.perf_counter()
            model, _ = load_model(engine_dir, device="cuda", staged=way == "staged")
            torch.cuda.synchronize()
            times[way].append(time.perf_counter() - start)
            del model
            torch.cuda.empty_cache()
    return times


def tune_once(engine_dir: Path) -> float | None:
    """Write the engine directory's kernels/ unless it has one; the seconds it took (None: it had one)."""
    from kiln.build.kernels import tune_engine_kernels

    if (engine_dir / "kernels" / "profile.json").is_file():
        return None
    return tune_engine_kernels(engine_dir, progress=True).seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", choices=["llama2-7b", "llama3.1-8b"], default="llama2-7b")
    p.add_argument("--dir", type=Path, required=True, help="engine directory (written if it holds none)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--import-profile",
        type=Path,
        help="directory: each child also runs under `python -X importtime` and leaves its report there",
    )
    p.add_argument(
        "--loading-only",
        action="store_true",
        help="only time loading the weights in this process, staged and plain (CUDA), not fresh processes",
    )
    # The engine's knobs, for the children; runs with any set away from its default are named after
    # them (`kiln/startup_engine_kernels[prefill_graph_tokens=4096]`), so the report judges the default's.
    add_engine_arguments(p, skip={"engine_process", "load_progress"})
    args = p.parse_args(argv)
    try:
        config = engine_config(args)
    except ValueError as exc:
        p.error(str(exc))
    knobs = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != f.default and f.name != "load_progress"
    }
    tag = "[" + ",".join(f"{k}={v}" for k, v in knobs.items()) + "]" if knobs else ""
    from kiln.engine_dir import is_engine_dir

    if not is_engine_dir(args.dir):
        t = time.time()
        write_random_engine(args.random, args.dir)
        print(f"wrote {args.dir} in {time.time() - t:.1f} s", flush=True)
    import torch

    variants = [("kiln/startup_empty_cache", False)]
    rows: list[tuple[str, str, dict[str, float]]] = []  # (name, shape, metrics)
    if args.loading_only:
        if not torch.cuda.is_available():
            p.error("--loading-only compares copies to a CUDA device: none here")
        torch.cuda.empty_cache()
        for way, seconds in loading_seconds(args.dir).items():
            print(json.dumps({"load_weights": way, "seconds": seconds}), flush=True)
            rows += [
                (f"kiln/load_weights_{way}", f"{args.random} run {i + 1}", {"seconds": t})
                for i, t in enumerate(seconds)
            ]
        variants = []
    elif torch.cuda.is_available():  # kernels/ holds CUDA kernels only
        torch.cuda.empty_cache()  # what writing the random weights reserved: the children need the memory
        variants.append(("kiln/startup_engine_kernels", True))
        tune_s = tune_once(args.dir)
        if tune_s is not None:
            print(json.dumps({"tune_kernels_s": tune_s}), flush=True)
            rows.append(("kiln/tune_kernels", args.random, {"seconds": tune_s}))
    for i in range(args.repeats if variants else 0):
        for name, kernels in variants:
            profile = None
            if args.import_profile:
                args.import_profile.mkdir(parents=True, exist_ok=True)
                profile = args.import_profile / f"{name.split('/')[-1]}-{i + 1}.txt"
            run = measure(
                args.dir, empty_cache=True, engine_kernels=kernels, import_profile=profile, knobs=knobs
            )
            print(json.dumps({"name": name + tag, **run}), flush=True)
            rows.append((name + tag, f"{args.random} run {i + 1}", run))
    if args.out:
        data = json.loads(args.out.read_text()) if args.out.exists() else {"device": {}, "results": []}
        note = "python -m benchmarks.startup " + " ".join(sys.argv[1:] if argv is None else argv)
        for name, shape, metrics in rows:
            for metric, value in metrics.items():
                data["results"].append(
                    {
                        "suite": "startup",
                        "name": name,
                        "shape": shape,
                        "metric": metric,
                        "value": value,
                        "params": {},
                        "note": note,
                    }
                )
        args.out.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
