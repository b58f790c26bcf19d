"""Model and engine configuration records shared by the build stage, the model and the engine.

`ModelConfig` is Kiln's own, flat view of a Llama-family Hugging Face `config.json`. It is what
`engine.json` stores and what `kiln.models` builds from, so nothing downstream parses HF configs.

Rule: importing this module does not import torch (tests/unit/test_serve_imports.py). `kiln serve`
imports it before it starts the engine process, and torch's ~1 s import there would delay that start;
`DTYPES` (name -> torch.dtype) is built on first use, by the module's `__getattr__`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    DTYPES: dict[str, torch.dtype]

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the keys of DTYPES
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def __getattr__(name: str) -> Any:
    """`DTYPES`, built (and kept as a module global) on first use."""
    if name != "DTYPES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch  # deferred: see the module's rule

    table = {dtype: getattr(torch, dtype) for dtype in DTYPE_NAMES}
    globals()["DTYPES"] = table
    return table


def canonical_dtype(name: str) -> str:
    """'fp16' -> 'float16'; raises ValueError for anything Kiln cannot run."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise ValueError(
            f"unsupported dtype {name!r}; choose one of {sorted(DTYPE_NAMES)} (or fp32/fp16/bf16)"
        )
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


# Quantization names: Kiln's canonical spelling (what engine.json records, for both backends) and the
# spellings accepted for it (the issue's `int8-wo` / `int8-sq`, TensorRT-LLM's W8A16 / W8A8 names).
QUANTIZATION_NAMES = ("int8_wo", "fp8", "int8_sq")
QUANTIZATION_ALIASES = {
    "int8": "int8_wo",
    "int8-wo": "int8_wo",
    "w8a16": "int8_wo",
    "int8_weight_only": "int8_wo",
    "int8-sq": "int8_sq",
    "smoothquant": "int8_sq",
    "w8a8": "int8_sq",
}
# The schemes the native engine builds and runs.
NATIVE_QUANTIZATIONS = ("int8_wo", "fp8", "int8_sq")
# The packed linear layers a native quantized engine stores quantized, in every layer. Embeddings,
# norms and lm_head stay in the engine's dtype: they are a small share of the bytes of a decode step
# at 7B and the head's errors reach the logits unsmoothed.
QUANTIZED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# int8_sq's smoothing: a linear fed by an RMSNorm has 1/s folded into that norm's weight; the others
# (fed by attention, and by silu(gate) * up) keep s as an explicit float32 `...smooth_scale` [K] that
# the matmul divides its input by.
SMOOTH_FOLDED_INTO = {"self_attn.qkv_proj": "input_layernorm", "mlp.gate_up_proj": "post_attention_layernorm"}
SMOOTH_EXPLICIT = ("self_attn.o_proj", "mlp.down_proj")
DEFAULT_SMOOTHQUANT_ALPHA = 0.5


def canonical_quantization(name: str | None) -> str | None:
    """'int8-wo' / 'w8a16' -> 'int8_wo'; None, '' and 'none' -> None; ValueError naming the choices."""
    if name is None or name.lower() in ("", "none"):
        return None
    key = QUANTIZATION_ALIASES.get(name.lower(), name.lower())
    if key not in QUANTIZATION_NAMES:
        raise ValueError(
            f"unknown quantization {name!r}; choose one of fp8, int8-wo, int8-sq "
            f"(also spelled {', '.join(sorted(QUANTIZATION_NAMES))})"
        )
    return key


@dataclass(slots=True)
class QuantConfig:
    """How a native engine's weights are quantized: what `engine.json` records under `quant_config`.

    Rules (the loader and the build both follow them):
    - `int8_wo`: each quantized linear's `weight` is int8 [N, K], symmetric (no zero point), with
      `weight_scale` float32 [N] (per output channel, `group_size` None) or [N, K // group_size]
      (per group of `group_size` inputs); the weight is w ~= q * scale. Activations stay in the
      engine's dtype: the weight is dequantized inside the matmul.
    - `fp8`: `weight` is float8_e4m3fn [N, K] with `weight_scale` float32 [N] (per output channel);
      activations are quantized to e4m3 per token at run time (scale = amax / 448, dynamic).
    - `int8_sq` (SmoothQuant W8A8): `weight` is int8 [N, K] = quantize(W * s) per output channel, with s
      the smoothing factors of `smoothquant_alpha` (kiln.kernels.quant_reference.smoothing_factors)
      from a calibration pass over `calibration` ({"dataset", "sha256", "num_tokens"}); 1/s is folded
      into the RMSNorm feeding qkv_proj / gate_up_proj (SMOOTH_FOLDED_INTO), and o_proj / down_proj
      store s as `smooth_scale` (SMOOTH_EXPLICIT). Activations are quantized to int8 per token at run
      time (scale = amax / 127, dynamic) and the product is summed in int32.
    - `prequantized` (fp8 only): the weights and scales are a pre-quantized checkpoint's own (compressed-
      tensors), not quantized by Kiln; the record says the source and the checkpoint's scale strategy.
    - `linears` are the packed layers quantized in every decoder layer (QUANTIZED_LINEARS); biases,
      embeddings, norms and lm_head stay in the engine's dtype.
    """

    scheme: str  # "int8_wo" | "fp8" | "int8_sq"
    group_size: int | None = None  # int8_wo only; None: one scale per output channel
    linears: list[str] = field(default_factory=lambda: list(QUANTIZED_LINEARS))
    smoothquant_alpha: float | None = None  # int8_sq only (required there)
    calibration: dict[str, Any] | None = None  # int8_sq only: {"dataset", "sha256", "num_tokens"}
    # fp8 only: built from a pre-quantized checkpoint's own e4m3 weights (kiln.build.prequantized's record)
    prequantized: dict[str, Any] | None = None

    @property
    def weight_dtype(self) -> str:
        """The torch dtype name the quantized weights are stored in."""
        return "float8_e4m3fn" if self.scheme == "fp8" else "int8"

    @property
    def activations(self) -> str:
        """How activations enter the matmul: 'unquantized', 'fp8 per-token dynamic' or int8's."""
        if self.scheme == "int8_sq":
            return "int8 per-token dynamic, after SmoothQuant smoothing"
        return "fp8 per-token dynamic" if self.scheme == "fp8" else "unquantized"

    def explicit_smoothing(self, linear: str) -> bool:
        """Whether the quantized `linear` stores its own `smooth_scale` (int8_sq's SMOOTH_EXPLICIT)."""
        return self.scheme == "int8_sq" and linear in SMOOTH_EXPLICIT and linear in self.linears

    @property
    def scale_layout(self) -> str:
        return "per-channel" if self.group_size is None else f"per-group of {self.group_size}"

    def validate(self, model: ModelConfig | None = None) -> None:
        """ValueError naming what is wrong: a scheme the native engine does not run, a group size that
        is not positive, given for fp8, or that does not divide every quantized layer's input size."""
        if self.scheme not in NATIVE_QUANTIZATIONS:
            raise ValueError(
                f"quantization {self.scheme!r} is not one the native backend runs ({list(NATIVE_QUANTIZATIONS)})"
            )
        unknown = sorted(set(self.linears) - set(QUANTIZED_LINEARS))
        if unknown or not self.linears:
            raise ValueError(f"quantized linears must be a non-empty subset of {list(QUANTIZED_LINEARS)}")
        alpha = self.smoothquant_alpha
        if self.scheme == "int8_sq":
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
                raise ValueError(f"int8_sq needs a SmoothQuant alpha in [0, 1], got {alpha!r}")
        elif alpha is not None or self.calibration is not None:
            raise ValueError(f"a SmoothQuant alpha and calibration apply to int8_sq only, not {self.scheme}")
        if self.prequantized is not None and (
            self.scheme != "fp8" or not isinstance(self.prequantized, dict)
        ):
            raise ValueError(f"a pre-quantized record applies to fp8 only (an object), not {self.scheme}")
        if self.group_size is None:
            return
        if self.scheme != "int8_wo":
            raise ValueError(
                f"a group size applies to int8_wo only; {self.scheme} weight scales are per channel"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.group_size!r}")
        if model is not None:
            inputs = {"hidden_size": model.hidden_size, "q_size (o_proj input)": model.q_size}
            inputs["intermediate_size"] = model.intermediate_size
            bad = {name: size for name, size in inputs.items() if size % self.group_size}
            if bad:
                raise ValueError(
                    f"group size {self.group_size} does not divide the layers' input sizes {bad}"
                )

    def to_dict(self) -> dict[str, Any]:
        # The derived facts too, so a reader of engine.json sees the whole scheme without this code.
        data = dataclasses.asdict(self)
        if self.prequantized is None:
            del data["prequantized"]
        if self.scheme != "int8_sq":
            del data["smoothquant_alpha"], data["calibration"]
        else:
            data["smoothing"] = {
                "folded_into_norm": {k: v for k, v in SMOOTH_FOLDED_INTO.items() if k in self.linears},
                "explicit_smooth_scale": [k for k in SMOOTH_EXPLICIT if k in self.linears],
            }
        return {
            **data,
            "weight_dtype": self.weight_dtype,
            "scale_dtype": "float32",
            "scale_layout": self.scale_layout,
            "activations": self.activations,
            "unquantized": "embed_tokens, norms, lm_head and biases, in the engine's dtype",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Parse `to_dict`'s output (derived keys ignored); ValueError when it does not validate."""
        if not isinstance(data, dict) or "scheme" not in data:
            raise ValueError(f"quant_config must be an object with a 'scheme', got {data!r}")
        config = cls(
            scheme=data["scheme"],
            group_size=data.get("group_size"),
            linears=list(data.get("linears", QUANTIZED_LINEARS)),
            smoothquant_alpha=data.get("smoothquant_alpha"),
            calibration=data.get("calibration"),
            prequantized=data.get("prequantized"),
        )
        config.validate()
        return config


# KV-cache dtypes (vLLM's `--kv-cache-dtype` names): "auto" stores K and V in the model's dtype, "fp8" in
# float8 E4M3 with one float32 scale per layer for K and one for V (KVCacheConfig).
KV_CACHE_DTYPES = ("auto", "fp8")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8", "fp8-e4m3": "fp8"}
FP8_E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
KV_SCALE_LAYOUTS = ("per_tensor",)


def canonical_kv_cache_dtype(name: str | None) -> str:
    """None / 'auto' -> 'auto'; 'fp8' / 'fp8_e4m3' -> 'fp8'; ValueError naming the choices otherwise
    (E5M2, vLLM's other fp8, is not built: E4M3's extra mantissa bit is the accurate one)."""
    if name is None:
        return "auto"
    key = KV_CACHE_DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV-cache dtype {name!r}; choose auto (the model's dtype) or fp8 (E4M3)")
    return key


@dataclass(slots=True)
class KVCacheConfig:
    """How a native engine's KV cache is quantized: what `engine.json` records under `kv_cache_config`
    (beside `kv_cache_dtype` "fp8"); an engine without one caches K and V in its own dtype.

    Rules (the build, the loader and the kernels follow them):
    - `dtype` "fp8": the cache tensors are float8_e4m3fn. Layer i has two float32 [1] tensors,
      `model.layers.{i}.self_attn.k_scale` and `v_scale` (`scale_layout` "per_tensor": one scale for all
      of a layer's K, every head and token, and one for its V, as vLLM's k_scale / v_scale and ModelOpt's
      FP8 KV cache). A key or value x is stored as e4m3(clamp(x / scale, -448, 448)), rounded to nearest
      even, and read back as stored * scale. K is quantized after the rotary embedding (what the cache holds).
    - The build measures scale = amax / FP8_E4M3_MAX per layer, amax over every K (V) the engine computes
      on `calibration`'s text ({"dataset", "sha256", "num_tokens"}, kiln.build.calibrate); a layer whose
      amax is 0 gets scale 1. `calibration` None: the scales came from elsewhere (a random-weight bench
      engine's are 1.0).
    - `checkpoint` (instead of a calibration): the scales are a pre-quantized checkpoint's own
      (kiln.build.modelopt, kiln.build.prequantized; the string names its layout), used as stored.
    """

    dtype: str = "fp8"
    scale_layout: str = "per_tensor"
    calibration: dict[str, Any] | None = None
    checkpoint: str | None = None

    @property
    def storage_dtype(self) -> str:
        """The torch dtype name of the cache tensors."""
        return "float8_e4m3fn"

    def validate(self) -> None:
        """ValueError naming what is wrong: a dtype other than fp8 (auto needs no record), a scale layout
        Kiln does not run, or a calibration record that is not an object."""
        if self.dtype != "fp8":
            raise ValueError(f"a KV-cache quantization record is for dtype fp8, got {self.dtype!r}")
        if self.scale_layout not in KV_SCALE_LAYOUTS:
            raise ValueError(
                f"KV-cache scale layout {self.scale_layout!r} is not one of {list(KV_SCALE_LAYOUTS)}"
            )
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise ValueError(f"KV-cache calibration must be an object, got {self.calibration!r}")
        if self.calibration is not None and self.checkpoint is not None:
            raise ValueError("KV-cache scales are calibrated or a checkpoint's, not both")

    def to_dict(self) -> dict[str, Any]:
        # The derived facts too, so a reader of engine.json sees the whole layout without this code.
        return {
            **dataclasses.asdict(self),
            "storage_dtype": self.storage_dtype,
            "scale_dtype": "float32",
            "scale_tensors": "model.layers.{i}.self_attn.k_scale, model.layers.{i}.self_attn.v_scale: [1]",
            "scale_rule": "amax / 448 over the calibration text, K after the rotary embedding"
            if self.checkpoint is None
            else "the checkpoint's own k/v scales, used as stored",
            "stored": "e4m3(clamp(x / scale, -448, 448)), round to nearest even; read as stored * scale",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCacheConfig:
        """Parse `to_dict`'s output (derived keys ignored); ValueError when it does not validate."""
        if not isinstance(data, dict) or "dtype" not in data:
            raise ValueError(f"kv_cache_config must be an object with a 'dtype', got {data!r}")
        config = cls(
            dtype=data["dtype"],
            scale_layout=data.get("scale_layout", "per_tensor"),
            calibration=data.get("calibration"),
            checkpoint=data.get("checkpoint"),
        )
        config.validate()
        return config


def knob(default: Any, help: str, **bounds: float) -> Any:
    """An `EngineConfig` field: its one default, its help text (the `kiln serve` and `kiln bench` flag help)
    and its range (`ge`, `gt`, `le`, as pydantic spells them), so every front end reads the same three."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    return field(default=default, metadata={"help": help, **bounds})


# Range keys of a knob's metadata: the rule each states, for the error a value outside it gets.
BOUNDS: dict[str, tuple[str, Any]] = {
    "ge": (">=", lambda value, bound: value >= bound),
    "gt": (">", lambda value, bound: value > bound),
    "le": ("<=", lambda value, bound: value <= bound),
}


DEFAULT_PREFILL_GRAPH_TOKENS = 512  # EngineConfig.prefill_graph_tokens


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Runtime knobs of an engine. Each field has one default, help text and range, and `kiln serve`'s
    settings (flags, `KILN_*` variables), the benchmarks' flags and `kiln.LLM(...)` keywords all derive
    from these fields, so they cannot drift apart. None means "take it from the engine directory's limits
    or from the model"; `resolve` fills every None once, when an engine is built. Frozen: change one with
    `dataclasses.replace`."""

    dtype: str | None = knob(None, "Weight dtype (default: the engine directory's).")
    device: str | None = knob(None, "Device, e.g. cuda or cpu (default: cuda if available).")
    max_num_seqs: int | None = knob(
        None, "Most requests running at once (default: the engine's max batch size).", ge=1
    )
    max_num_batched_tokens: int | None = knob(
        None, "Token budget of one engine step (default: the engine's max tokens).", ge=1
    )
    max_model_len: int | None = knob(
        None, "Prompt plus completion tokens per request (default: the engine's).", ge=1
    )
    block_size: int | None = knob(None, "Tokens per KV-cache block (default: engine's).", ge=1)
    num_kv_blocks: int | None = knob(
        None, "Exact KV-cache size in blocks; overrides the memory budget.", ge=1
    )
    kv_cache_memory_bytes: int | None = knob(None, "Memory for the KV cache (CPU default: 1 GiB).", ge=1)
    gpu_memory_utilization: float = knob(
        0.90, "On CUDA: fraction of GPU memory for weights, activations and KV.", gt=0, le=1
    )
    enable_prefix_caching: bool = knob(True, "Reuse KV blocks of shared prompt prefixes.")
    # See SchedulerConfig.
    admission_interval: int = knob(
        1,
        "While requests run, admit new ones every this many steps, together: fewer steps mix prefills "
        "into decodes (the slower kind of step), each arrival waits up to that many steps more.",
        ge=1,
    )
    enforce_eager: bool = knob(False, "On CUDA: run decode eagerly, without capturing CUDA graphs.")
    # kiln.engine.piecewise_graphs: under a steady stream of arrivals nearly every step is a mixed one.
    piecewise_graphs: bool = knob(
        True,
        "On CUDA: also run steps that mix prompts and decodes (up to 1,024 tokens) as CUDA graphs, "
        "piece by piece around attention.",
    )
    # kiln.engine.cuda_graphs.PrefillLayout: a graph per power-of-two bucket up to it, all captured at
    # start-up. At most kiln.kernels.long_prompts.LONG_PROMPT_TOKENS - 1: longer fresh prompts take cuDNN,
    # which a graph captured for another prompt would not.
    prefill_graph_tokens: int = knob(
        DEFAULT_PREFILL_GRAPH_TOKENS,
        "On CUDA: a prompt of up to this many tokens that prefills alone in its step replays one CUDA "
        "graph (its time to first token); each power of two below it is captured at start-up too. 0: none; "
        "another value without CUDA graphs is an error.",
        ge=0,
        le=8191,
    )
    # Off on CPU: nothing runs asynchronously there, so it would only cost the extra step a stopping
    # request takes.
    async_scheduling: bool | None = knob(
        None,
        "Prepare each step while the GPU runs the previous one (default: on with CUDA, off on CPU).",
    )
    served_model_name: str | None = knob(
        None, "Name clients send as `model` (default: the engine's own name)."
    )
    # Seeds the process (kiln.engine.process_setup.prepare_process), not the engine: see why there.
    seed: int = knob(0, "Global sampling seed for requests that send none.")
    load_progress: bool = knob(True, "Show a progress bar while the weights load.")
    # kiln.engine.tp_workers: rank 0 is the engine's process, ranks 1..N-1 are worker processes.
    tensor_parallel_size: int | None = knob(
        None,
        "Native engines: shard the model over this many processes, Megatron-style (one GPU each on CUDA, "
        "NCCL; gloo on the CPU); unquantized engines only (default: what `kiln build --tp-size` recorded, "
        "else 1).",
        ge=1,
    )
    # Only the chooser (kiln.clients.open) reads it; an engine built directly runs where it is built.
    engine_process: bool = knob(
        True,
        "Run the native engine's step loop in its own process, so streaming many responses does not slow "
        "it down (off: one process, engine on a thread).",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, bool):
                continue
            for key, (rule, holds) in BOUNDS.items():
                if key in f.metadata and not holds(value, f.metadata[key]):
                    raise ValueError(f"{f.name} must be {rule} {f.metadata[key]}, got {value!r}")

    def resolve(
        self,
        limits: EngineLimits,
        model_config: ModelConfig,
        device: torch.device,
        size_kv_pool: Callable[[int, int, int, int], int],
        kv_cache_dtype: str = "auto",
    ) -> ResolvedEngineConfig:
        """Every None filled, once: from these knobs, else the engine's limits, else the model.

        `size_kv_pool(block_size, max_num_batched_tokens, max_num_seqs, cap)` gives the KV blocks the
        memory budget allows when `num_kv_blocks` is not set (the engine profiles memory for it); cap is
        what max_num_seqs requests of max_model_len tokens could use. A pool smaller than one request's
        context shortens max_model_len to what fits (tests force preemption this way). `kv_cache_dtype`
        is the model's ("auto" or "fp8", fixed when the engine was built: kiln.config.KVCacheConfig), and
        `size_kv_pool` counts blocks of that dtype.
        """
        block_size = self.block_size or limits.block_size
        max_model_len = min(
            self.max_model_len or limits.resolved_max_seq_len(model_config),
            model_config.max_position_embeddings,
        )
        max_num_seqs = self.max_num_seqs or limits.max_batch_size
        max_num_batched_tokens = self.max_num_batched_tokens or limits.max_num_tokens
        blocks_per_seq = -(-max_model_len // block_size)
        num_kv_blocks = self.num_kv_blocks or size_kv_pool(
            block_size, max_num_batched_tokens, max_num_seqs, max_num_seqs * blocks_per_seq
        )
        if num_kv_blocks < blocks_per_seq:
            max_model_len = num_kv_blocks * block_size
        on_cuda = device.type == "cuda"
        cuda_graphs = on_cuda and not self.enforce_eager
        if not cuda_graphs and self.prefill_graph_tokens not in (0, DEFAULT_PREFILL_GRAPH_TOKENS):
            why = "enforce_eager is set" if on_cuda else f"the engine runs on {device.type}"
            raise ValueError(
                f"prefill_graph_tokens {self.prefill_graph_tokens} sizes CUDA graphs, and this engine "
                f"captures none ({why})"
            )
        # A prompt alone fits one step and leaves room for a token.
        prefill_graph_tokens = min(self.prefill_graph_tokens, max_num_batched_tokens, max_model_len - 1)
        return ResolvedEngineConfig(
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=self.enable_prefix_caching,
            admission_interval=self.admission_interval,
            cuda_graphs=cuda_graphs,
            piecewise_graphs=cuda_graphs and self.piecewise_graphs,
            prefill_graph_tokens=prefill_graph_tokens if cuda_graphs else 0,
            async_scheduling=on_cuda if self.async_scheduling is None else self.async_scheduling,
            seed=self.seed,
            kv_cache_dtype=canonical_kv_cache_dtype(kv_cache_dtype),
        )


@dataclass(frozen=True, slots=True)
class ResolvedEngineConfig:
    """What an engine runs with: `EngineConfig.resolve`'s answer, nothing left to look up."""

    block_size: int
    max_model_len: int  # prompt + output tokens of one request
    max_num_seqs: int
    max_num_batched_tokens: int
    num_kv_blocks: int
    enable_prefix_caching: bool
    admission_interval: int
    cuda_graphs: bool  # decode (and single-prompt) steps replay CUDA graphs
    piecewise_graphs: bool  # mixed steps too, piece by piece around attention
    prefill_graph_tokens: int  # prompts alone up to this many tokens replay a graph (0: none)
    async_scheduling: bool
    seed: int  # what the process's global RNG is seeded with (prepare_process)
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": E4M3 with per-layer scales
