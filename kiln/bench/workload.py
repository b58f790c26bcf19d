"""What the benchmarks run: random-weight engines at preset shapes, random prompts, greedy requests.

Shared by `kiln bench`, its profilers (`kiln.bench.profile`) and the harness scripts in benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kiln.config import (
    DEFAULT_SMOOTHQUANT_ALPHA,
    DTYPES,
    EngineConfig,
    EngineLimits,
    KVCacheConfig,
    ModelConfig,
    QuantConfig,
    canonical_dtype,
    canonical_kv_cache_dtype,
    canonical_quantization,
)
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.kernels import quant_reference
from kiln.models.loader import build_empty_model
from kiln.models.quant_linear import check_device_supports, check_kv_cache_supports
from kiln.models.tokenizer import Tokenizer
from kiln.models.weights import (
    expected_packed_shapes,
    kv_scale_names,
    quantized_weight_names,
    scale_name,
    smooth_name,
)

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


# What a random-weight engine is "built" for: its limits are what the EngineConfig knobs left unset
# resolve to (as an engine directory's limits are for `kiln serve`).
RANDOM_ENGINE_LIMITS = EngineLimits(max_batch_size=256, max_num_tokens=8192)


def add_engine_arguments(parser: argparse.ArgumentParser, *, skip: Iterable[str] = ()) -> None:
    """One flag per `EngineConfig` field but `skip` (read back by `engine_config`), generated from the
    field: `max_num_seqs` -> `--max-num-seqs`, its type, its one default and its help; booleans get
    `--x/--no-x`. The knob's range is checked when `engine_config` builds the EngineConfig."""
    types = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")
        kind = next(a for a in typing.get_args(types[f.name]) or (types[f.name],) if a is not type(None))
        if kind is bool:  # BooleanOptionalAction appends the default itself
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            if f.default is not None:
                help_text += " (default: %(default)s)"
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)


def engine_config(args: argparse.Namespace, **more: Any) -> EngineConfig:
    """EngineConfig from the flags `add_engine_arguments` added, plus `more`; ValueError (naming the
    field) for a value outside a knob's range."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**(given | more))


def random_quant_config(quantization: str | None, group_size: int | None = None) -> QuantConfig | None:
    """The QuantConfig of a random-weight engine quantized `quantization` (any spelling; None: none).
    int8_sq's alpha is recorded as the default, but a random engine is not calibrated: its smoothing
    factors are all 1 (see `build_random_engine`)."""
    scheme = canonical_quantization(quantization)
    if scheme is None:
        if group_size is not None:
            raise ValueError("a quantization group size needs --quantization int8-wo")
        return None
    alpha = DEFAULT_SMOOTHQUANT_ALPHA if scheme == "int8_sq" else None
    quant = QuantConfig(scheme=scheme, group_size=group_size, smoothquant_alpha=alpha)
    quant.validate()
    return quant


# What a random engine's fp8 KV cache scales are: no calibration text exists for random weights, so every
# k_scale and v_scale is 1.0, vLLM's default for a checkpoint without KV scales. The time of a step does
# not depend on the scales' values.
RANDOM_KV_SCALES = "1.0 (uncalibrated: vLLM's default without checkpoint scales)"


def random_kv_cache_config(kv_cache_dtype: str | None) -> KVCacheConfig | None:
    """The KVCacheConfig of a random-weight engine's `--kv-cache-dtype` (None: auto, the model's dtype);
    its scales are RANDOM_KV_SCALES (see `build_random_engine`)."""
    return KVCacheConfig() if canonical_kv_cache_dtype(kv_cache_dtype) == "fp8" else None


def build_random_engine(
    shape: str,
    config: EngineConfig,
    limits: EngineLimits = RANDOM_ENGINE_LIMITS,
    tokenizer_dir: Path | None = None,
    quant: QuantConfig | None = None,
    kv_cache: KVCacheConfig | None = None,
) -> LLMEngine:
    """An LLMEngine over random weights at a preset shape, made directly on the device (no disk
    but a throw-away tokenizer: the engine needs one to detokenize, and any will do for ids).
    `tokenizer_dir`: a real tokenizer instead (structured outputs need one that spells text); its ids
    past the model's vocabulary are never sampled.

    With `quant` (`random_quant_config`) the linears it names are quantized on the device from their
    random weights by the build's own functions (kiln.kernels.quant_reference), one at a time, so the
    engine runs exactly the kernels a built quantized engine runs. int8_sq has no calibration data here:
    its smoothing factors are all 1 (the folded norms keep weight 1, `smooth_scale` is 1), which costs
    the same time as any other factors. With `kv_cache` (`random_kv_cache_config`: an fp8 KV cache) every
    layer's k_scale and v_scale is 1.0 (RANDOM_KV_SCALES)."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(RANDOM_SHAPES)}")
    default_dtype, hf_config = RANDOM_SHAPES[shape]
    dtype = canonical_dtype(config.dtype or default_dtype)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_config = ModelConfig.from_hf({"model_type": "llama", **hf_config})
    if quant is not None:
        quant.validate(model_config)
    check_device_supports(quant, device)
    check_kv_cache_supports(kv_cache, device)
    model = build_empty_model(
        model_config, dtype=DTYPES[dtype], device=device, quant=quant, kv_cache=kv_cache
    )
    generator = torch.Generator(device=device).manual_seed(0)
    quantized = set(quantized_weight_names(model_config, quant))
    derived = {scale_name(n) for n in quantized} | {smooth_name(n) for n in quantized}
    kv_scales = set(kv_scale_names(model_config, kv_cache))

    def random_weights():
        for name, size in expected_packed_shapes(model_config, quant, kv_cache).items():
            if name in derived:  # yielded with its weight
                continue
            if name in kv_scales:  # float32 [1]
                yield name, torch.ones(size, dtype=torch.float32, device=device)
                continue
            if len(size) == 1:  # norms
                yield name, torch.ones(size, device=device)
                continue
            # std 0.02 keeps activations finite through 32 layers in half precision
            weight = torch.randn(size, device=device, generator=generator).mul_(0.02)
            if name not in quantized:
                yield name, weight
                continue
            assert quant is not None
            if quant.scheme == "fp8":
                q, scale = quant_reference.quantize_fp8(weight)
            else:
                q, scale = quant_reference.quantize_int8(weight, quant.group_size)
            del weight
            yield name, q
            yield scale_name(name), scale
            if quant.explicit_smoothing(name.split(".", 3)[3].removesuffix(".weight")):
                yield smooth_name(name), torch.ones(size[1], device=device)

    model.load_weights(random_weights())
    if tokenizer_dir is None:
        tokenizer_dir = write_wordlevel_tokenizer(
            Path(tempfile.mkdtemp(prefix="kiln-bench-tok-")), model_config.vocab_size
        )
    return LLMEngine(
        model.eval(),
        model_config,
        Tokenizer(tokenizer_dir),
        limits=limits,
        config=config,
        model_name=config.served_model_name or f"random-{shape}",
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
