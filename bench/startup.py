"""Start-to-ready of a native engine directory: from a fresh process's start to ready, and to first token.

    python -m bench.startup --random llama2-7b --dir /tmp/kiln-llama2-7b --out results.json

Writes (once) an engine directory of random weights at a preset shape (sharded safetensors, checksums,
a word-level tokenizer, engine.json), then starts a fresh Python process that opens it with
`LLMEngine.from_path` (imports, loading the weights, the memory profile, the KV cache, CUDA-graph
capture) and runs one 128-token request. Reported: seconds from the process start to the engine being
ready, and to its first token. The weight files were just written, so they come from the page cache: a
cold disk adds its read time (13 GB for Llama-2-7B fp16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
engine = LLMEngine.from_path(sys.argv[1])
ready = time.time()
engine.add_request("r", params=SamplingParams(temperature=0, max_tokens=1), prompt_token_ids=list(range(10, 138)))
while engine.has_unfinished_requests():
    engine.step()
print(json.dumps({"ready": ready, "first_token": time.time()}))
"""


def write_random_engine(shape: str, out: Path, max_shard_bytes: int = 2 << 30) -> None:
    """An engine directory of random weights at `shape`, made on the GPU and written shard by shard."""
    import torch
    from safetensors.torch import save_file

    from kiln.bench import RANDOM_SHAPES, write_wordlevel_tokenizer
    from kiln.build.manifest import EngineManifest, sha256_file
    from kiln.config import DTYPES, ModelConfig
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


def measure(engine_dir: Path) -> dict[str, float]:
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(engine_dir)], capture_output=True, text=True, check=True
    )
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "start_to_ready_s": marks["ready"] - start,
        "start_to_first_token_s": marks["first_token"] - start,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", choices=["llama2-7b", "llama3.1-8b"], default="llama2-7b")
    p.add_argument("--dir", type=Path, required=True, help="engine directory (written if it holds none)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from kiln.build.manifest import is_engine_dir

    if not is_engine_dir(args.dir):
        t = time.time()
        write_random_engine(args.random, args.dir)
        print(f"wrote {args.dir} in {time.time() - t:.1f} s", flush=True)
    runs = [measure(args.dir) for _ in range(args.repeats)]
    for run in runs:
        print(json.dumps(run), flush=True)
    if args.out:
        data = json.loads(args.out.read_text()) if args.out.exists() else {"device": {}, "results": []}
        note = "python -m bench.startup " + " ".join(sys.argv[1:] if argv is None else argv)
        for i, run in enumerate(runs):
            for metric, value in run.items():
                data["results"].append(
                    {
                        "suite": "startup",
                        "name": "kiln/startup",
                        "shape": f"{args.random} run {i + 1}",
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
