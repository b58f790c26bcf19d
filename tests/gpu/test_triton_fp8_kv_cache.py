"""The fp8 (E4M3) KV cache on the GPU: Triton store_kv and rotary_store_kv into an fp8 cache, and
paged_attention over one (prefill, chunked prefill, decode over short and long contexts, split-K decode,
GQA, block sizes, head dims 64 and 128, fp16 and bf16), each against its PyTorch reference
(kiln.kernels.reference); a CUDA graph that replays with the scales' current values; and a tiny
`kiln build --tiny --kv-cache-dtype fp8` engine in float16 on CUDA against the same engine's float32 CPU
reference, through both families of its decode graphs.

Tolerances, and why:
- store_kv: bit for bit. The kernel widens x to float32, divides with an IEEE division (div_rn, as torch
  divides) and casts rounding to nearest even, as `reference.quantize_kv` does.
- rotary_store_kv: bit for bit the Triton rotation (`apply_rotary`) stored by `reference.store_kv`, and the
  value bit for bit. The Triton rotation itself differs from the reference's by one unit in the last
  16-bit place in a few percent of elements (tests/gpu/test_triton_small_kernels.py), which can move
  their e4m3 rounding: against the reference rotation the stored key is held to e4m3's own error
  (KEY_VS_REFERENCE).
- paged_attention: the 16-bit cache's bounds (test_triton_attention.py) over the same fp8 cache: every
  e4m3 value is exact in fp16 / bf16, and the scales fold into the softmax scale and the output.
- Under TRITON_INTERPRET=1 (CPU) Triton's interpreter rounds float32 -> e4m3 its own way: it rounds ties
  up and drops the carry of a mantissa that rounds up into the next power of two (giving half the value).
  The store tests accept exactly those two differences there, and only there.
Needs compute capability >= 8.9 (Triton's e4m3 conversions); skipped below it, as the loader refuses it.
"""

from __future__ import annotations

import codecs

import pytest
import torch
from kernel_cases import (
    DTYPES,
    INTERPRET,
    greedy_agreement,
    long_context,
    make_paged_batch,
    quant_steps,
    rel_error,
    rope_table,
    rotary_case,
    store_case,
)

from kiln.kernels import reference

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
BOUNDS = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # test_triton_attention.py's
HEAD_SHAPES = [(64, 1), (64, 4), (128, 1), (128, 8)]  # (head_dim, query heads per KV head)
KEY_VS_REFERENCE = 0.05  # e4m3 keeps 3 mantissa bits: about 2.6% relative error on random values
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def fp8_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("an fp8 KV cache needs compute capability >= 8.9")
    return device


def assert_e4m3_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """out and ref (fp8 tensors) bit for bit (NaN poison included); under the interpreter, but for its own
    rounding (see the module docstring)."""
    assert out.dtype == ref.dtype == FP8
    out, ref = out.cpu(), ref.cpu()
    if not INTERPRET:
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
        return
    ok = quant_steps(out, ref) <= 1
    ok |= out.float() * 2 == ref.float()  # the interpreter's lost carry
    assert ok.all(), f"{(~ok).sum().item()} values apart beyond the interpreter's rounding"


def _scales(k: torch.Tensor, v: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scales as the build computes them (amax / 448), a little off so clamping is exercised."""
    k_scale = torch.tensor([k.float().abs().max().item() / 448 * 0.9], device=device)
    v_scale = torch.tensor([v.float().abs().max().item() / 448 * 1.3], device=device)
    return k_scale, v_scale


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    """An fp8 cache shaped like `like`, every byte 0x7F (NaN): a slot written by mistake shows."""
    return torch.full(like.shape, 0x7F, dtype=torch.uint8, device=like.device).view(FP8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "num_kv_heads", "block_size"), [(64, 1, 16), (128, 8, 32), (128, 2, 1)])
def test_store_kv_into_fp8_is_the_reference_bit_for_bit(
    fp8_device, dtype, head_dim, num_kv_heads, block_size
):
    from kiln.kernels.triton_cache import store_kv

    batch = store_case(head_dim, num_kv_heads, block_size, dtype, fp8_device)
    # Strided inputs, as slices of a fused QKV projection output would be; keys larger than values.
    fused = torch.cat([4 * batch.key, batch.value], dim=1)
    key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads:]
    k_scale, v_scale = _scales(key, value, fp8_device)
    k_out, v_out = _poisoned(batch.k_cache), _poisoned(batch.v_cache)
    k_ref, v_ref = _poisoned(batch.k_cache), _poisoned(batch.v_cache)
    store_kv(key, value, k_out, v_out, batch.meta.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    reference.store_kv(key, value, k_ref, v_ref, batch.meta.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    assert_e4m3_equal(k_out, k_ref)
    assert_e4m3_equal(v_out, v_ref)
    written = (k_out.view(torch.uint8) != 0x7F).sum().item()
    assert written >= 28 * num_kv_heads * head_dim * 0.99  # 28 real tokens (a stored NaN is vanishingly rare)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads", "block_size"),
    [(64, 8, 8, 16), (128, 32, 8, 32), (128, 8, 1, 16)],
)
def test_rotary_store_kv_into_fp8_matches_rotary_then_store(
    fp8_device, dtype, head_dim, num_heads, num_kv_heads, block_size
):
    from kiln.kernels.triton_cache import apply_rotary, rotary_store_kv

    batch, positions, table = rotary_case(head_dim, num_heads, num_kv_heads, block_size, dtype, fp8_device)
    k_scale, v_scale = _scales(batch.key, batch.value, fp8_device)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    k_out, v_out = _poisoned(batch.k_cache), _poisoned(batch.v_cache)
    k_ref, v_ref = _poisoned(batch.k_cache), _poisoned(batch.v_cache)
    q_out = rotary_store_kv(
        positions, batch.query, batch.key, batch.value, table, k_out, v_out, batch.meta.slot_mapping, **scales
    )
    _, key_rotated = apply_rotary(positions, batch.query, batch.key, table)
    reference.store_kv(key_rotated, batch.value, k_ref, v_ref, batch.meta.slot_mapping, **scales)
    assert_e4m3_equal(k_out, k_ref)
    assert_e4m3_equal(v_out, v_ref)
    q_ref, key_ref = reference.apply_rotary(positions, batch.query, batch.key, table)
    assert rel_error(q_out, q_ref) < {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    if INTERPRET:
        return  # the interpreter's own e4m3 rounding (module docstring) is not held to e4m3's error
    real = batch.meta.slot_mapping >= 0  # padding tokens are not stored
    stored = reference.dequantize_kv(k_out.flatten(0, 1)[batch.meta.slot_mapping[real]], k_scale)
    limit = 448 * k_scale  # what the cache can hold
    assert rel_error(stored, key_ref[real].float().clamp(-limit, limit)) < KEY_VS_REFERENCE


def _fp8_batch(q_lens, contexts, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0):
    """make_paged_batch's ragged batch with its caches quantized to e4m3 by the reference, and the scales."""
    batch = make_paged_batch(
        q_lens, contexts, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=seed
    )
    k_scale, v_scale = _scales(3 * batch.k_cache, batch.v_cache, device)
    k8 = reference.quantize_kv(3 * batch.k_cache.float(), k_scale)
    v8 = reference.quantize_kv(batch.v_cache, v_scale)
    return batch, k8, v8, k_scale, v_scale


def _check(batch, k8, v8, k_scale, v_scale, dtype, num_splits=None):
    from kiln.kernels.triton_attention import paged_attention

    scale = batch.query.shape[-1] ** -0.5
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    out = paged_attention(batch.query, k8, v8, batch.meta, scale, num_splits=num_splits, **scales)
    ref = reference.paged_attention(batch.query, k8, v8, batch.meta, scale, **scales)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    err = rel_error(out, ref)
    assert err < BOUNDS[dtype], f"relative error {err:.2e}"
    # The scales are applied: the result is attention over the unquantized cache, within e4m3's error.
    unquantized = reference.paged_attention(batch.query, 3 * batch.k_cache, batch.v_cache, batch.meta, scale)
    assert rel_error(out, unquantized) < 0.1


# Decode tiles by the batch's longest context (attention_plan.builtin_config): up to 512 keys the
# short-context tile, beyond it the five-stage one.
DECODE_CONTEXTS = {
    "long": [long_context(4100), 0, 37, long_context(1999), 16, long_context(777)],
    "short": [511, 0, 37, 200, 16, 300, 64],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("head_dim", "group"), HEAD_SHAPES)
@pytest.mark.parametrize("lengths", ["long", "short"])
def test_decode_over_an_fp8_cache(fp8_device, lengths, head_dim, group, block_size, dtype):
    from kiln.kernels.attention_plan import SHORT_FP8_DECODE_KEYS, builtin_config, default_config

    num_kv_heads = 2 if group == 8 else 4
    contexts = DECODE_CONTEXTS[lengths]
    parts = _fp8_batch(
        [1] * len(contexts),
        contexts,
        num_kv_heads * group,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        fp8_device,
    )
    if lengths == "short":
        assert parts[0].meta.max_seq_len == SHORT_FP8_DECODE_KEYS
        short = default_config(True, head_dim, fp8_cache=True, max_seq_len=SHORT_FP8_DECODE_KEYS)
        assert short != builtin_config(True, head_dim, fp8_cache=True)
    _check(*parts, dtype)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_decode_over_an_fp8_cache(fp8_device, num_splits, dtype):
    # The splits' partials carry v_scale; the merge is linear in them, so every count gives the same answer.
    parts = _fp8_batch([1], [long_context(6000)], 32, 8, 128, 16, dtype, fp8_device, seed=1)
    _check(*parts, dtype, num_splits=num_splits)


@pytest.mark.skipif(INTERPRET, reason="bf16 is checked on a GPU only")
def test_a_bfloat16_query_beyond_float16s_range_over_an_fp8_cache(fp8_device):
    # A bf16 query's products with an fp8 cache run in float16: a power of two brings the tile's largest
    # |q| into range and the softmax scale takes it back, so a query float16 cannot hold still attends
    # as the reference does (here the first head of each group, ~1e5: its softmax nearly one key).
    parts = _fp8_batch(
        [1, 1, 7, 1], [long_context(900), 40, 30, 0], 16, 4, 128, 16, torch.bfloat16, fp8_device
    )
    batch, k8, v8, k_scale, v_scale = parts
    batch.query[:, ::4] *= 4e4
    assert batch.query.abs().max() > 65504
    scale = batch.query.shape[-1] ** -0.5
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    from kiln.kernels.triton_attention import paged_attention

    out = paged_attention(batch.query, k8, v8, batch.meta, scale, **scales)
    ref = reference.paged_attention(batch.query, k8, v8, batch.meta, scale, **scales)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < BOUNDS[torch.bfloat16]


# Prompts first: one launch. Decodes first (the bound lowered to 2 for this small batch): those in a launch
# of decode tiles, the rest in prefill tiles.
MIXED = {
    "prompts first": ([37, 64, 5, 1, 130, 1], [0, 96, 40, long_context(1500), 17, 0]),
    "decodes first": ([1, 1, 37, 64, 5, 130, 1], [long_context(1500), 300, 0, 96, 40, 17, 0]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("head_dim", "group"), HEAD_SHAPES)
@pytest.mark.parametrize("order", list(MIXED))
def test_prefill_chunks_and_decodes_over_an_fp8_cache(
    fp8_device, monkeypatch, order, head_dim, group, block_size, dtype
):
    from kiln.kernels import attention_plan

    monkeypatch.setattr(attention_plan, "MIN_SPLIT_DECODES", 2)
    q_lens, contexts = MIXED[order]
    parts = _fp8_batch(q_lens, contexts, 2 * group, 2, head_dim, block_size, dtype, fp8_device, seed=2)
    _check(*parts, dtype)


@needs_cuda
def test_a_cuda_graph_reads_the_scales_when_it_replays(fp8_device):
    """rotary_store_kv then split-K attention captured in one graph; changing the scale tensors in place
    changes what a replay stores and reads, exactly as the eager reference with the new scales does."""
    from kiln.kernels.triton_attention import paged_attention
    from kiln.kernels.triton_cache import rotary_store_kv

    dtype = torch.float16
    batch = make_paged_batch([1, 1, 1], [300, 37, 1000], 16, 4, 128, 16, dtype, fp8_device, seed=5)
    positions = batch.meta.seq_lens.long() - 1
    table = rope_table(128, 2048, fp8_device)
    k_scale, v_scale = _scales(batch.k_cache, batch.v_cache, fp8_device)
    k8, v8 = reference.quantize_kv(batch.k_cache, k_scale), reference.quantize_kv(batch.v_cache, v_scale)
    scales = {"k_scale": k_scale, "v_scale": v_scale}

    def step() -> torch.Tensor:
        q = rotary_store_kv(
            positions, batch.query, batch.key, batch.value, table, k8, v8, batch.meta.slot_mapping, **scales
        )
        return paged_attention(q, k8, v8, batch.meta, 128**-0.5, num_splits=4, **scales)

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for factor in (1.0, 0.5, 2.5):
        k_scale.mul_(factor)
        v_scale.mul_(1 / factor)
        graph.replay()
        q_ref, key_ref = reference.apply_rotary(positions, batch.query, batch.key, table)
        k_ref, v_ref = k8.clone(), v8.clone()
        reference.store_kv(key_ref, batch.value, k_ref, v_ref, batch.meta.slot_mapping, **scales)
        assert_e4m3_equal(v8, v_ref)
        want = reference.paged_attention(q_ref, k_ref, v_ref, batch.meta, 128**-0.5, **scales)
        assert rel_error(captured, want) < BOUNDS[dtype]


# The float16 CUDA engine against the same engine's float32 CPU reference. The tiny model's random weights
# make its logits chaotic: float16 rounding of K before its e4m3 rounding moves them this much on the CPU
# (measured with the references, 2026-12-05, 550 tokens: top-1 0.933, KL 0.031; the 16-bit cache 0.987,
# 0.0009). The gates leave room for a different rounding order; a broken scale gives near-zero agreement.
ENGINE_GATE = (0.85, 0.1)


@needs_cuda
@pytest.mark.whole_gpu
def test_tiny_fp8_kv_engine_on_cuda_tracks_the_reference(tmp_path, fp8_device):
    import this

    from kiln.bench.accuracy import agreement, prefill_logits, text_logits
    from kiln.build import build_tiny_engine
    from kiln.config import EngineConfig
    from kiln.engine.llm_engine import LLMEngine
    from kiln.engine.sampling_params import SamplingParams
    from kiln.models.loader import load_model
    from kiln.models.tokenizer import Tokenizer

    engine_dir = tmp_path / "engine"
    build_tiny_engine(engine_dir, kv_cache_dtype="fp8", calib_size=1)
    least_top1, most_kl = ENGINE_GATE
    # Prefill of a real text through the Triton store and attention over the fp8 cache.
    ids = Tokenizer(engine_dir).encode(codecs.decode(this.s, "rot13"))
    reference_logits = text_logits(engine_dir, ids)
    model, _ = load_model(engine_dir, dtype=torch.float16, device="cuda")
    assert model.kv_cache_dtype == FP8
    top1, kl = agreement(reference_logits, prefill_logits(model, ids).cpu())
    print(f"fp8 KV prefill on CUDA: top-1 {top1:.3f}, KL {kl:.4f}")
    assert top1 >= least_top1 and kl <= most_kl
    del model
    # Greedy decoding through the engine (decode, prefill and piecewise CUDA graphs), one request alone
    # then four together, each token scored against the reference given the same prefix.
    engine = LLMEngine.from_path(engine_dir, EngineConfig(device="cuda", dtype="float16", max_num_seqs=8))
    assert engine.config.cuda_graphs and engine.config.kv_cache_dtype == "fp8"
    assert all(k.dtype == FP8 for k, _ in engine.runner.kv_caches)
    # Decodes whose longest context is at most 512 replay the short-context family of decode graphs (its
    # own attention tile), longer ones the family for every length (attention_plan.decode_context_bounds).
    families = [*engine.runner.short_graphs, engine.runner.graphs]
    assert [g.layout.max_seq_len for g in families] == [512, engine.max_model_len]
    replays = dict.fromkeys((g.layout.name for g in families), 0)
    for graphs in families:
        graphs.run = _counted(graphs.run, graphs.layout.name, replays)
    agree, total = greedy_agreement(engine, engine_dir)
    print(f"fp8 KV greedy on CUDA: {agree}/{total} tokens the reference's argmax; replays {replays}")
    assert agree / total >= least_top1
    assert replays == {"decode (contexts <= 512)": replays["decode (contexts <= 512)"], "decode": 0}
    assert replays["decode (contexts <= 512)"] > 0
    long_prompt = torch.randint(3, 500, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    engine.add_request("long", params=SamplingParams(temperature=0, max_tokens=8, min_tokens=8),
                       prompt_token_ids=long_prompt)  # fmt: skip
    generated = [t for _ in range(64) if engine.has_unfinished_requests() for out in engine.step()
                 for t in out.outputs[0].token_ids]  # fmt: skip
    assert len(generated) == 8 and replays["decode"] > 0
    ref = text_logits(engine_dir, long_prompt + generated)[len(long_prompt) - 1 : -1]
    assert (ref.argmax(-1) == torch.tensor(generated)).float().mean().item() >= least_top1


def _counted(run, name: str, replays: dict[str, int]):
    def counting(*args):
        replays[name] += 1
        return run(*args)

    return counting
