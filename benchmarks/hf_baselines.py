"""Hugging Face transformers baselines on the same random-weight shapes as Kiln's runs.

Modes (each in its own process, so compiled graphs and caches do not leak between them):
- eager:          `generate`, batch 1, 128 in / 64 out, Llama-2-7B fp16 -> ms per token
- static_compile: `generate(cache_implementation="static")` (transformers compiles the decode step),
                  batch 1, 128 in / 128 out, Llama-2-7B fp16 -> ms per token
- batch:          continuous batching `generate_batch`, N requests of 128 in / 128 out,
                  Llama-3.1-8B bf16 -> output tokens per second

ms per token = (time to generate N tokens - time to generate 1) / (N - 1), greedy, EOS ignored
(min_new_tokens = max_new_tokens), the best of 3 timed runs after a warm-up run.
Run: `python -m benchmarks.hf_baselines --out benchmarks/results/results.json [--modes eager ...]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.timing import Result, write_results
from kiln.bench.workload import RANDOM_SHAPES

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def build_hf_model(shape: str):
    """transformers' LlamaForCausalLM at a preset shape, random weights made on the GPU in the shape's dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype_name, hf = RANDOM_SHAPES[shape]
    config = LlamaConfig(**hf)
    dtype = DTYPES[dtype_name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in half precision directly: no float32 copy of 7-8B weights
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _prompt(batch: int, length: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (batch, length), generator=gen).cuda()


def _time_generate(model, input_ids, new_tokens: int, **kwargs) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **kwargs,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - start


def ms_per_token(model, input_len: int, output_len: int, **kwargs) -> float:
    input_ids = _prompt(1, input_len, model.config.vocab_size)
    _time_generate(model, input_ids, output_len, **kwargs)  # warm-up (and compilation)
    _time_generate(model, input_ids, 1, **kwargs)
    full = min(_time_generate(model, input_ids, output_len, **kwargs) for _ in range(3))
    first = min(_time_generate(model, input_ids, 1, **kwargs) for _ in range(3))
    return 1000 * (full - first) / (output_len - 1)


def batch_throughput(model, num_requests: int, input_len: int, output_len: int) -> tuple[float, int, float]:
    from transformers import GenerationConfig

    prompts = _prompt(num_requests, input_len, model.config.vocab_size).tolist()
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[:8], generation_config=config)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = sum(len(out.generated_tokens) for out in outputs.values())
    return generated / elapsed, generated, elapsed


def run_mode(mode: str, out: Path, num_requests: int) -> None:
    import transformers

    note = f"transformers {transformers.__version__}"
    if mode == "eager":
        model = build_hf_model("llama2-7b")
        value = ms_per_token(model, 128, 64)
        result = Result(
            "hf", "hf/generate_eager", "llama2-7b batch 1, 128 in / 64 out", "ms_per_token", value, note=note
        )
    elif mode == "static_compile":
        model = build_hf_model("llama2-7b")
        value = ms_per_token(model, 128, 128, cache_implementation="static")
        result = Result(
            "hf",
            "hf/generate_static_compiled",
            "llama2-7b batch 1, 128 in / 128 out",
            "ms_per_token",
            value,
            note=note,
        )
    elif mode == "batch":
        model = build_hf_model("llama3.1-8b")
        value, generated, elapsed = batch_throughput(model, num_requests, 128, 128)
        result = Result(
            "hf",
            "hf/generate_batch",
            f"llama3.1-8b {num_requests} req 128 in / 128 out",
            "output_tok_per_s",
            value,
            {"output_tokens": generated, "elapsed_s": elapsed},
            note=note,
        )
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print(f"{result.name:32s} {result.shape:40s} {result.metric:18s} {result.value:10.2f}", flush=True)
    write_results(out, [result])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/results.json"))
    parser.add_argument("--modes", nargs="+", default=["eager", "static_compile", "batch"])
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--in-process", action="store_true", help="run the single given mode here")
    args = parser.parse_args(argv)
    if args.in_process:
        run_mode(args.modes[0], args.out, args.num_requests)
        return 0
    status = 0
    for mode in args.modes:
        command = [sys.executable, "-m", "benchmarks.hf_baselines", "--in-process", "--modes", mode]
        command += ["--out", str(args.out), "--num-requests", str(args.num_requests)]
        print("$", " ".join(command), flush=True)
        status |= subprocess.call(command)
    return status


if __name__ == "__main__":
    sys.exit(main())
