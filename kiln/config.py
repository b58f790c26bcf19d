"""Model and engine configuration records shared by the build stage, the model and the engine.

`ModelConfig` is Kiln's own, flat view of a Llama-family Hugging Face `config.json`. It is what
`engine.json` stores and what `kiln.models` builds from, so nothing downstream parses HF configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def canonical_dtype(name: str) -> str:
    """'fp16' -> 'float16'; raises ValueError for anything Kiln cannot run."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPES)} (or fp32/fp16/bf16)")
    return name


@dataclass(slots=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 1/2/3, SmolLM, TinyLlama, ...)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF `rope_scaling` / `rope_parameters` minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...};
    # None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "LlamaForCausalLM"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4.x and 5.x spellings)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise ValueError(f"model_type {model_type!r} is not a Llama-family model Kiln can run")
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        # transformers 5 folds rope_theta into `rope_parameters`; 4.x keeps `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=archs[0],
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        return cls(**data)


@dataclass(slots=True)
class EngineLimits:
    """The limits an engine is built for (TensorRT-LLM calls this the optimization profile).

    The native engine treats them as defaults that `kiln serve` flags may lower; a TensorRT engine
    cannot exceed them.
    """

    max_batch_size: int = 64  # most requests running at once
    max_num_tokens: int = 2048  # most tokens computed in one step (prefill chunks + decodes)
    max_seq_len: int | None = None  # prompt + generated; None: the model's max_position_embeddings
    block_size: int = 16  # tokens per KV-cache block

    def resolved_max_seq_len(self, model: ModelConfig) -> int:
        return self.max_seq_len or model.max_position_embeddings

    def validate(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")


@dataclass(slots=True)
class EngineConfig:
    """Runtime knobs of a native engine, set by `kiln serve` flags / KILN_* variables, `kiln.LLM(...)` or the
    benchmarks' flags. None means "take it from the engine directory's limits or from the model"."""

    dtype: str | None = None  # None: the engine dir's dtype; float32 for an HF dir on CPU
    device: str | None = None  # None: cuda if available, else cpu
    max_num_seqs: int | None = None  # cap on running requests (default: engine limits.max_batch_size)
    max_num_batched_tokens: int | None = None  # token budget per step (default: limits.max_num_tokens)
    max_model_len: int | None = None  # prompt + output tokens (default: limits / model max positions)
    block_size: int | None = None  # tokens per KV block (default: limits.block_size)
    num_kv_blocks: int | None = None  # exact KV pool size; overrides the memory budget below
    kv_cache_memory_bytes: int | None = None  # KV budget (CPU default: 1 GiB)
    gpu_memory_utilization: float = 0.90  # on CUDA: fraction of GPU memory for weights + activations + KV
    enable_prefix_caching: bool = True
    # While requests run, admit waiting ones every this many steps (see SchedulerConfig).
    admission_interval: int = 1
    enforce_eager: bool = False  # on CUDA: skip capturing decode CUDA graphs
    # On CUDA: also graph steps that mix prefills and decodes, piece by piece around attention
    # (kiln.engine.piecewise_graphs): under a steady stream of arrivals nearly every step is one.
    piecewise_graphs: bool = True
    # Schedule and launch step N+1 before reading step N's tokens (overlaps host work with the GPU).
    # None: on for CUDA, off on CPU (where nothing runs asynchronously, so it would only cost the
    # extra step a stopping request takes).
    async_scheduling: bool | None = None
    served_model_name: str | None = None
    seed: int = 0  # global RNG seed for requests without their own
    load_progress: bool = False  # show a progress bar while the weights load
    # Run the engine's step loop in a child process (ProcessEngine), so a server's HTTP work does not
    # share the GIL with it. Only open_engine (kiln serve) looks at it.
    engine_process: bool = False
