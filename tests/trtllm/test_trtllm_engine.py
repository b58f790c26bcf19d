"""TensorRT-LLM end to end: build a tiny engine, serve it, check it against transformers.

Needs tensorrt_llm 1.2 and an NVIDIA GPU: run inside the NGC TensorRT-LLM release container with
`pytest -m trtllm tests/trtllm`. Everywhere else these tests are skipped with the reason.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kiln.config import EngineConfig, EngineLimits
from kiln.engine.sampling_params import SamplingParams
from kiln.engine_dir import EngineManifest
from kiln.errors import InvalidEngineError
from kiln.trtllm import compat

pytestmark = [
    pytest.mark.trtllm,
    pytest.mark.skipif(
        not compat.is_available(),
        reason="needs tensorrt_llm 1.2 and an NVIDIA GPU (run in the NGC TensorRT-LLM container)",
    ),
]

LIMITS = EngineLimits(max_batch_size=8, max_num_tokens=512, max_seq_len=256, block_size=32)
PROMPT = [1, 20, 30, 40, 50, 60, 70]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.build.tiny import write_tiny_checkpoint

    # head_dim 64: TensorRT-LLM's fused attention kernels do not cover the default tiny head_dim of 16.
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-trt"), seed=0, hidden_size=256, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512,
    )  # fmt: skip


@pytest.fixture(scope="module")
def engine_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.build.trtllm import build_trtllm_engine

    out = tmp_path_factory.mktemp("trt") / "engine"
    build_trtllm_engine(checkpoint, out, dtype="float16", limits=LIMITS, gather_logits=True)
    return out


def run(coro):
    return asyncio.run(coro)


async def generate(engine, params: SamplingParams, request_id: str = "r") -> list:
    await engine.start()
    try:
        return [out async for out in engine.generate(PROMPT, params, request_id)]
    finally:
        await engine.shutdown()


def test_manifest_records_where_the_engine_runs(engine_dir: Path):
    manifest = EngineManifest.load(engine_dir, verify_checksums=True)
    gpu = compat.probe_gpu()
    assert manifest.backend == "trtllm" and manifest.extra["compute_capability"] == gpu.sm
    assert any(name.endswith(".engine") for name in manifest.weight_files)
    assert manifest.extra["plugin_config"]["use_paged_context_fmha"] is True


def test_greedy_tokens_are_transformers_argmax(engine_dir: Path, checkpoint: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.clients.trtllm import TrtLlmEngine

    engine = TrtLlmEngine.from_engine_dir(engine_dir, EngineConfig())
    outs = run(generate(engine, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)))
    tokens = [t for o in outs for c in o.outputs for t in c.token_ids]
    assert len(tokens) == 8 and outs[-1].finished and outs[-1].outputs[-1].finish_reason == "length"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float16).cuda()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + tokens], device="cuda")).logits[0, len(PROMPT) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
    # TensorRT's greedy choice is transformers' argmax up to fp16 noise, and its logprobs agree.
    assert torch.all(chosen >= logprobs.max(dim=-1).values - 2e-2)
    trt_logprobs = torch.tensor(
        [c.logprobs[i][t].logprob for o in outs for c in o.outputs for i, t in enumerate(c.token_ids)]
    )
    assert torch.allclose(trt_logprobs, chosen.cpu(), atol=5e-2)


def test_closing_the_stream_aborts_and_frees_the_slot(engine_dir: Path):
    from kiln.clients.trtllm import TrtLlmEngine

    engine = TrtLlmEngine.from_engine_dir(engine_dir, EngineConfig())

    async def scenario():
        await engine.start()
        stream = engine.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True), "long")
        await stream.__anext__()
        await stream.aclose()
        again = [o async for o in engine.generate(PROMPT, SamplingParams(max_tokens=4), "next")]
        await engine.shutdown()
        return again

    assert run(scenario())[-1].finished and not engine._requests


def test_another_library_version_is_refused(engine_dir: Path, tmp_path: Path):
    import shutil

    from kiln.clients.trtllm import TrtLlmEngine

    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = EngineManifest.load(copy)
    manifest.extra["tensorrt_llm_version"] = "1.2.0.dev0-other"
    manifest.save(copy)
    with pytest.raises(InvalidEngineError, match="only run with the version that built them"):
        TrtLlmEngine.from_engine_dir(copy)


def test_int8_weight_only_engine_generates(checkpoint: Path, tmp_path: Path):
    from kiln.build.trtllm import build_trtllm_engine
    from kiln.clients.trtllm import TrtLlmEngine

    manifest = build_trtllm_engine(
        checkpoint, tmp_path / "int8", dtype="float16", limits=LIMITS, quantization="int8_wo"
    )
    assert manifest.quantization == "int8_wo" and manifest.extra["quant_algo"] == "W8A16"
    engine = TrtLlmEngine.from_engine_dir(tmp_path / "int8", EngineConfig())
    outs = run(generate(engine, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)))
    assert sum(len(c.token_ids) for o in outs for c in o.outputs) == 4
