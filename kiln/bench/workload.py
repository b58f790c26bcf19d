"""What the benchmarks run: random-weight engines at preset shapes, random prompts, greedy requests.

Shared by `kiln bench`, its profilers (`kiln.bench.profile`) and the scripts in bench/.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from kiln.config import DTYPES, EngineConfig, EngineLimits, ModelConfig, canonical_dtype
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.models.loader import build_empty_model
from kiln.models.tokenizer import Tokenizer
from kiln.models.weights import expected_packed_shapes

# Hugging Face config.json fields of the preset shapes (the weights are random; the speed is not).
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2-7b": (
        "float16",
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "llama3.1-8b": (
        "bfloat16",
        {
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {
                "rope_theta": 500000.0,
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "bos_token_id": 128000,
            "eos_token_id": 128001,
        },
    ),
}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options every benchmark takes (read back by `engine_options`)."""
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig().gpu_memory_utilization)
    parser.add_argument("--admission-interval", type=int, default=1, help="admit new requests every N steps")
    parser.add_argument(
        "--piecewise-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="graph mixed steps piece by piece (default: on)",
    )


def engine_options(args: argparse.Namespace, **more: Any) -> EngineConfig:
    """EngineConfig from the arguments `add_engine_arguments` added, plus `more`."""
    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        admission_interval=args.admission_interval,
        piecewise_graphs=args.piecewise_graphs,
        **more,
    )


def build_random_engine(shape: str, options: EngineConfig, limits: EngineLimits | None = None):
    """An LLMEngine over random weights at a preset shape, made directly on the device (no disk
    but a throw-away tokenizer: the engine needs one to detokenize, and any will do for ids)."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(RANDOM_SHAPES)}")
    default_dtype, hf_config = RANDOM_SHAPES[shape]
    dtype = canonical_dtype(options.dtype or default_dtype)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = ModelConfig.from_hf({"model_type": "llama", **hf_config})
    model = build_empty_model(config, dtype=DTYPES[dtype], device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def random_weights():
        for name, size in expected_packed_shapes(config).items():
            if len(size) == 1:  # norms
                yield name, torch.ones(size, device=device)
            else:  # std 0.02 keeps activations finite through 32 layers in half precision
                yield name, torch.randn(size, device=device, generator=generator).mul_(0.02)

    model.load_weights(random_weights())
    tokenizer_dir = write_wordlevel_tokenizer(
        Path(tempfile.mkdtemp(prefix="kiln-bench-tok-")), config.vocab_size
    )
    return LLMEngine(
        model.eval(),
        config,
        Tokenizer(tokenizer_dir),
        limits=limits,
        options=options,
        model_name=f"random-{shape}",
        dtype=dtype,
    )


def write_wordlevel_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """A tokenizer with one word per id of the whole vocabulary, so every random token id detokenizes
    to text (the streaming server sends text, and the detokenizer's cost is part of what is measured)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="w0"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="w0").save_pretrained(out_dir)
    return out_dir


def random_prompts(n: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the lowest ids: special tokens there could change nothing here, but keep prompts "plain".
    return [[rng.randrange(10, vocab) for _ in range(lengths[i])] for i in range(n)]


def request_lengths(n: int, fixed: int, span: tuple[int, int] | None, seed: int) -> list[int]:
    if span is None:
        return [fixed] * n
    rng = random.Random(seed)
    return [rng.randint(span[0], span[1]) for _ in range(n)]


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
