"""The Llama decoder (Llama 1/2/3, MHA or GQA, tied or untied head) over Kiln's paged KV cache.

Parameter names are the packed checkpoint names of kiln.models.weights (fused `qkv_proj` and
`gate_up_proj`), so an engine directory loads with no renaming. Every kernel goes through
`kiln.kernels`, which picks Triton on CUDA and the PyTorch references elsewhere.

The model is stateless between calls: the KV cache and the AttentionMetadata describing where a
step's tokens live are passed into `forward` by the model runner.

`forward` is written as pieces around attention: piece 0 embeds and projects layer 0's query (storing
its K/V), piece i finishes layer i-1 (output projection, MLP) and projects layer i's query, piece L
finishes the last layer and the final norm. Attention is the only operation that reads per-request
metadata (query ranges, context lengths, block tables); every piece works token by token with the
slot mapping and positions alone, which is what lets the model runner replay the pieces as CUDA graphs
for any mix of requests (`kiln.engine.piecewise_graphs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from kiln import kernels
from kiln.config import KVCacheConfig, ModelConfig, QuantConfig
from kiln.errors import CheckpointError
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.quant_reference import QuantizedActivation
from kiln.models.parallel import TensorParallelGroup
from kiln.models.quant_linear import QuantizedLinear, make_linear
from kiln.models.rope import build_cos_sin_cache
from kiln.models.weights import expected_packed_dtypes, expected_packed_shapes, kv_scale_names

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]


def _linear(layer: nn.Module, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    # A quantized layer goes through its own dispatch (kiln.models.quant_linear.quantized_linear, the
    # seam for the quantized GPU kernels). Otherwise the kernel dispatch rather than nn.Linear: one
    # token takes the Triton GEMV on CUDA.
    if isinstance(layer, QuantizedLinear):
        return layer(x)
    return kernels.linear(x, layer.weight, layer.bias)  # type: ignore[arg-type]


def _quantization(layer: nn.Module, num_tokens: int) -> torch.dtype | None:
    """The 8-bit dtype `layer` takes its input in at `num_tokens` (the producing kernel quantizes)."""
    return layer.input_quantization(num_tokens) if isinstance(layer, QuantizedLinear) else None


def _for(linear: str, quant: QuantConfig | None) -> QuantConfig | None:
    """`quant` when it quantizes the packed linear `linear` (e.g. "mlp.down_proj"), else None."""
    return quant if quant is not None and linear in quant.linears else None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, quantize: torch.dtype | None = None
    ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor | None]:
        """(norm, new residual); with `quantize`, the norm quantized per token for an 8-bit matmul."""
        if quantize is not None:
            return kernels.rms_norm_quant(x, self.weight, self.eps, residual, quantize)
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, quant: QuantConfig | None = None, kv_cache: KVCacheConfig | None = None
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.qkv_proj = make_linear(
            config.hidden_size,
            self.q_size + 2 * self.kv_size,
            bias=bias,
            quant=_for("self_attn.qkv_proj", quant),
            name="self_attn.qkv_proj",
        )
        self.o_proj = make_linear(
            self.q_size,
            config.hidden_size,
            bias=bias,
            quant=_for("self_attn.o_proj", quant),
            name="self_attn.o_proj",
        )
        # An fp8 KV cache's per-layer scales (kiln.config.KVCacheConfig), float32 [1] whatever the model
        # dtype, read by the kernels from device memory; None for a cache in the model's dtype.
        self.k_scale: nn.Parameter | None = None
        self.v_scale: nn.Parameter | None = None
        self.storage_dtypes: dict[str, torch.dtype] = {}
        if kv_cache is not None:
            self.k_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)
            self.v_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)
            self.storage_dtypes = {"k_scale": torch.float32, "v_scale": torch.float32}

    def project(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,
        cos_sin_cache: torch.Tensor,
    ) -> torch.Tensor:
        """The rotated query [T, heads, head_dim]; K and V are rotated and written into the cache."""
        qkv = _linear(self.qkv_proj, hidden)
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        # Rotate q and k, write k and v into the paged cache (one fused launch on CUDA).
        return kernels.rotary_store_kv(
            positions,
            q,
            k,
            v,
            cos_sin_cache,
            k_cache,
            v_cache,
            slot_mapping,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )

    def attend(self, query: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of the rotated query over the cache: [T, heads, head_dim]."""
        return kernels.paged_attention(
            query, kv_cache[0], kv_cache[1], meta, self.scale, k_scale=self.k_scale, v_scale=self.v_scale
        )


class LlamaMLP(nn.Module):
    def __init__(
        self, config: ModelConfig, quant: QuantConfig | None = None, tp: TensorParallelGroup | None = None
    ) -> None:
        super().__init__()
        self.tp = tp
        inter, bias = config.intermediate_size, config.mlp_bias
        self.gate_up_proj = make_linear(
            config.hidden_size,
            2 * inter,
            bias=bias,
            quant=_for("mlp.gate_up_proj", quant),
            name="mlp.gate_up_proj",
        )
        self.down_proj = make_linear(
            inter, config.hidden_size, bias=bias, quant=_for("mlp.down_proj", quant), name="mlp.down_proj"
        )

    def forward(self, hidden: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        gate_up = _linear(self.gate_up_proj, hidden)
        quantize = _quantization(self.down_proj, gate_up.shape[0])
        if quantize is None:
            act = kernels.silu_and_mul(gate_up)
        else:
            act = kernels.silu_and_mul_quant(gate_up, quantize, self.down_proj.smooth_scale)
        out = _linear(self.down_proj, act)
        return out if self.tp is None else self.tp.all_reduce(out)  # row-parallel: partial sums


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        quant: QuantConfig | None = None,
        tp: TensorParallelGroup | None = None,
        kv_cache: KVCacheConfig | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.self_attn = LlamaAttention(config, quant, kv_cache)
        self.mlp = LlamaMLP(config, quant, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # The residual add is deferred into the next norm (fused add + RMSNorm), so the stream is
    # `hidden + residual` between layers; the first layer's input has no residual yet.
    def begin(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to attention: returns (rotated query, residual stream)."""
        quantize = _quantization(self.self_attn.qkv_proj, hidden.shape[0])
        if residual is None:
            residual = hidden
            normed, _ = self.input_layernorm(hidden, quantize=quantize)
        else:
            normed, residual = self.input_layernorm(hidden, residual, quantize)
        return self.self_attn.project(positions, normed, kv_cache, slot_mapping, cos_sin_cache), residual

    def finish(self, attended: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After attention: returns (this layer's output delta, the residual stream before it)."""
        hidden = _linear(self.self_attn.o_proj, attended.reshape(attended.shape[0], -1))
        if self.tp is not None:  # row-parallel: partial sums
            hidden = self.tp.all_reduce(hidden)
        quantize = _quantization(self.mlp.gate_up_proj, hidden.shape[0])
        normed, residual = self.post_attention_layernorm(hidden, residual, quantize)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        quant: QuantConfig | None = None,
        tp: TensorParallelGroup | None = None,
        kv_cache: KVCacheConfig | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, quant, tp, kv_cache) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama causal LM over a paged KV cache.

    Rules:
    - `forward` computes T flattened tokens of any mix of prefill chunks and decodes (layout in
      AttentionMetadata); it writes their K/V into `kv_caches` (one (k, v) pair per layer) and
      returns the final-norm hidden states [T, H]. Positions must be < `max_positions`.
    - `compute_logits` maps selected hidden rows to float32 logits [N, vocab].
    - `load_weights` takes packed names (kiln.models.weights) and is strict.
    - With `quant` (kiln.config.QuantConfig) the linears it names are `QuantizedLinear`s, which load
      the scheme's int8/fp8 weights and float32 scales; embeddings, norms and lm_head are unchanged.
    - With `kv_cache` (kiln.config.KVCacheConfig, an fp8 KV cache) every attention layer holds its
      float32 `k_scale` / `v_scale` and the caches passed in must be `kv_cache_dtype` (float8_e4m3fn);
      without it they are the model's dtype. Whoever allocates the caches asks `kv_cache_dtype`.
    - A module built under `torch.device("meta")` and moved with `to_empty(device=...)` is
      complete after `load_weights`, which also recomputes the RoPE table on the weights' device.
    - With `tp` (kiln.models.parallel) this is one rank's shard: `config` is its `shard_config`, the
      row-parallel outputs and the embedding are all-reduced and `compute_logits` gathers the whole
      vocabulary, so every rank returns what the unsharded model would. Without it, no collective runs.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_positions: int | None = None,
        quant: QuantConfig | None = None,
        tp: TensorParallelGroup | None = None,
        kv_cache: KVCacheConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.quant = quant
        self.kv_cache = kv_cache
        self.tp = tp
        self.max_positions = max_positions or config.max_position_embeddings
        self.model = LlamaModel(config, quant, tp, kv_cache)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # float32 whatever the model dtype (apply_rotary casts per use); not saved with the weights.
        self.register_buffer(
            "cos_sin_cache", self._build_rope_table(self.model.embed_tokens.weight.device), persistent=False
        )

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The dtype of the KV caches this model reads and writes: float8_e4m3fn for an fp8 KV cache,
        else the model's own dtype (its embedding's)."""
        if self.kv_cache is not None:
            return getattr(torch, self.kv_cache.storage_dtype)
        return self.model.embed_tokens.weight.dtype

    def _build_rope_table(self, device: torch.device) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(self.max_positions, self.config.head_dim, device="meta")
        return build_cos_sin_cache(self.config, self.max_positions, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        layers = self.model.layers
        if len(kv_caches) != len(layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(layers)} layers")
        query, residual = self.piece(0, positions, kv_caches, meta.slot_mapping, input_ids=input_ids)
        for index, layer in enumerate(layers, start=1):
            attended = layer.self_attn.attend(query, kv_caches[index - 1], meta)
            query, residual = self.piece(index, positions, kv_caches, meta.slot_mapping, attended, residual)
        return query

    @property
    def num_pieces(self) -> int:
        return len(self.model.layers) + 1

    def piece(
        self,
        index: int,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        slot_mapping: torch.Tensor,
        attended: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Piece `index` of the forward (see the module docstring). Piece 0 takes input_ids; piece i > 0
        takes layer i-1's attention output and the residual stream. Returns (layer i's rotated query,
        residual stream), or for the last piece (final hidden states [T, H], residual)."""
        layers = self.model.layers
        if index == 0:
            assert input_ids is not None
            embed = self.model.embed_tokens
            hidden = embed(input_ids) if self.tp is None else self.tp.embed(input_ids, embed.weight)
            residual = None
        else:
            assert attended is not None and residual is not None
            hidden, residual = layers[index - 1].finish(attended, residual)
        if index == len(layers):
            hidden, residual = self.model.norm(hidden, residual)
            assert residual is not None
            return hidden, residual
        return layers[index].begin(
            positions, hidden, residual, kv_caches[index], slot_mapping, self.cos_sin_cache
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = kernels.linear(hidden, head).float()
        return logits if self.tp is None else self.tp.gather_logits(logits)

    @torch.no_grad()
    def load_weights(
        self,
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        """Copy packed tensors into the parameters (cast to each parameter's dtype and device), through
        `copy(param, tensor)` when given (`kiln.models.upload.StagedUploader.copy`), else `param.copy_`.

        Accepts a mapping or a stream of (name, tensor) pairs, so a loader can feed tensors one at a
        time. Raises CheckpointError naming every missing, unexpected, duplicate or misshaped tensor,
        and a quantized weight or scale not stored in the scheme's dtype (casting a float weight into
        int8 would load garbage); on error the parameters may be partly loaded.
        """
        expected = expected_packed_shapes(self.config, self.quant, self.kv_cache)
        fixed_dtypes = expected_packed_dtypes(self.config, self.quant, self.kv_cache)
        params = dict(self.named_parameters())
        if set(params) != set(expected):  # the module and the packing rules must agree
            raise AssertionError(f"model parameters differ from packed names: {set(params) ^ set(expected)}")
        items = weights.items() if isinstance(weights, Mapping) else weights
        loaded: set[str] = set()
        for name, tensor in items:
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} for this model config")
            if name in loaded:
                raise CheckpointError(f"tensor {name!r} given twice")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                )
            if name in fixed_dtypes and tensor.dtype != getattr(torch, fixed_dtypes[name]):
                raise CheckpointError(
                    f"tensor {name!r} is {tensor.dtype}, the engine's {self._layout_of(name)} "
                    f"stores it as torch.{fixed_dtypes[name]}"
                )
            if copy is None:
                params[name].copy_(tensor)
            else:
                copy(params[name], tensor)
            loaded.add(name)
        missing = sorted(set(expected) - loaded)
        if missing:
            raise CheckpointError(f"checkpoint is missing tensors: {missing}")
        self.cos_sin_cache = self._build_rope_table(self.model.embed_tokens.weight.device)

    def _layout_of(self, name: str) -> str:
        """What fixes tensor `name`'s dtype, for load_weights' errors."""
        if name in kv_scale_names(self.config, self.kv_cache):
            return "fp8 KV cache"
        return f"{self.quant.scheme} quantization"  # type: ignore[union-attr]
