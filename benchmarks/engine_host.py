"""The engine's host time per decode step: what the GPU has to hide behind its own step.

    python -m benchmarks.engine_host --running 64 256 512 --steps 200 --out results.json

The real `LLMEngine` on the tiny random model (CPU): scheduler, KV-cache manager, input preparation, the
sampler's bookkeeping and argmax, output processing with detokenization. Only the model is stubbed:
its forward returns zeros and its logits are random over ordinary-text ids (`benchmarks.frontend`'s
range), so every step samples a token the detokenizer turns into text. Each point: `--running`
requests of 128 prompt tokens queued at once, stepped until all are decoding, a warm-up, then the mean
wall time of `--steps` decode steps. With overlapped steps on a GPU this host work runs while the
device computes the step before; where it takes longer than that step, the GPU waits. Results are this
machine's: the GPU host's cores are faster.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.frontend import VOCAB_HIGH, VOCAB_LOW, prompts
from benchmarks.timing import Result, write_results
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams

PROMPT_TOKENS = 128


def stubbed_model_engine(path: str, max_num_seqs: int, seed: int = 0) -> LLMEngine:
    """An LLMEngine on the tiny model at `path` whose forward pass computes nothing: hidden states are
    zeros and logits random over [VOCAB_LOW, VOCAB_HIGH)."""
    engine = LLMEngine.from_path(
        path, EngineConfig(device="cpu", max_num_seqs=max_num_seqs, max_num_batched_tokens=8192)
    )
    runner, hidden = engine.runner, engine.model_config.hidden_size
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(seed)

    def logits(states: torch.Tensor) -> torch.Tensor:
        out = torch.full((states.shape[0], vocab), float("-inf"))
        out[:, VOCAB_LOW:VOCAB_HIGH] = torch.rand((states.shape[0], VOCAB_HIGH - VOCAB_LOW), generator=gen)
        return out

    runner._forward = lambda inputs: torch.zeros((inputs.input_ids.shape[0], hidden))
    runner.model.compute_logits = logits
    return engine


def host_ms_per_step(path: str, running: int, steps: int, warmup: int = 10) -> float:
    """Mean wall milliseconds of `steps` decode steps with `running` requests decoding."""
    engine = stubbed_model_engine(path, running)
    max_tokens = engine.max_model_len - PROMPT_TOKENS
    if steps + warmup + 8 > max_tokens:
        raise ValueError(f"at most {max_tokens - warmup - 8} steps fit the tiny model's context")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts(running, PROMPT_TOKENS)):
        engine.add_request(f"h{i}", params=params, prompt_token_ids=prompt)
    while len(engine.scheduler.running) < running or any(
        r.num_computed_tokens < PROMPT_TOKENS for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(warmup):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return 1000 * (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    from kiln.build.tiny import write_tiny_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--running", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", type=Path, help="append the results to this JSON file")
    args = p.parse_args(argv)
    path = str(write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="kiln-host-")), seed=0))
    results = []
    for running in args.running:
        ms = host_ms_per_step(path, running, args.steps)
        print(
            f"{running:4d} running: {ms:6.2f} ms a step on the host, {1000 * ms / running:5.1f} us a request"
        )
        results.append(Result("engine_host", "decode_step", f"{running} running", "ms", ms))
    if args.out:
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
