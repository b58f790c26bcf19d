"""TrtLlmEngine and the build driver against a fake `tensorrt_llm` shaped like the 1.2 library.

The fakes copy the library's observable contract only: a streaming result is an async iterator of one
mutable RequestOutput whose CompletionOutputs expose `*_diff` properties computed from `_last_*_len`
(tensorrt_llm/executor/result.py); `abort()` cancels; `get_stats_async()` yields iteration-stats dicts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kiln.build.trtllm import build_trtllm_engine
from kiln.clients.protocol import EngineClient
from kiln.clients.trtllm import TrtLlmEngine, runtime_llm_kwargs
from kiln.config import EngineConfig, EngineLimits
from kiln.engine.outputs import Logprob
from kiln.engine.sampling_params import SamplingParams
from kiln.engine_dir import EngineManifest
from kiln.errors import InvalidEngineError
from kiln.trtllm import compat
from kiln.trtllm.outputs import OutputTranslator, engine_stats_from_trtllm, translate_logprobs

# -- fakes shaped like tensorrt_llm 1.2 --------------------------------------------------------------

# The library's SamplingParams is a kw-only dataclass; these are the fields Kiln sets.
FakeTrtSamplingParams = dataclasses.make_dataclass(
    "FakeTrtSamplingParams",
    [
        (name, Any, dataclasses.field(default=None))
        for name in [
            "end_id",
            "max_tokens",
            "stop",
            "stop_token_ids",
            "include_stop_str_in_output",
            "embedding_bias",
            "n",
            "best_of",
            "top_k",
            "top_p",
            "seed",
            "temperature",
            "min_tokens",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "min_p",
            "prompt_ignore_length",
            "logprobs",
            "ignore_eos",
            "detokenize",
            "skip_special_tokens",
        ]
    ],
    kw_only=True,
)


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


@dataclass
class FakeCompletion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _last_text_len: int = 0
    _last_token_ids_len: int = 0
    _last_logprobs_len: int = 0

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> list[Any]:
        return self.logprobs[self._last_logprobs_len :]


@dataclass
class FakeOutput:
    outputs: list[FakeCompletion]
    finished: bool = False
    cached_tokens: int = 0


def script(n: int, steps: list[list[tuple]]) -> list[FakeOutput]:
    """steps[k] lists (index, token_ids, text, finish_reason, stop_reason[, logprob entries]) added at step k."""
    state = FakeOutput([FakeCompletion(i) for i in range(n)])
    snapshots = []
    for step in steps:
        for c in state.outputs:  # the library marks what the previous response already carried
            c._last_text_len, c._last_token_ids_len, c._last_logprobs_len = (
                len(c.text),
                len(c.token_ids),
                len(c.logprobs),
            )
        for index, tokens, text, finish, stop, *lps in step:
            c = state.outputs[index]
            c.token_ids += tokens
            c.text += text
            c.finish_reason, c.stop_reason = finish, stop
            c.logprobs += lps[0] if lps else []
        state.finished = all(c.finish_reason for c in state.outputs)
        copies = [
            dataclasses.replace(c, token_ids=list(c.token_ids), logprobs=list(c.logprobs))
            for c in state.outputs
        ]
        snapshots.append(dataclasses.replace(state, outputs=copies))
    return snapshots


class FakeResult:
    def __init__(self, outputs: list[FakeOutput], hang: bool = False) -> None:
        self._outputs = outputs
        self._hang = hang
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1

    async def __aiter__(self):
        for out in self._outputs:
            await asyncio.sleep(0)
            if self.aborted:
                return
            yield out
        while self._hang and not self.aborted:
            await asyncio.sleep(0.001)


class FakeLLM:
    """tensorrt_llm._tensorrt_engine.LLM: records its constructor, serves scripted streams."""

    instances: list[FakeLLM] = []  # noqa: RUF012

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any) -> None:
        self.model, self.tokenizer, self.kwargs = model, tokenizer, kwargs
        self.calls: list[tuple[list[int], Any]] = []
        self.results: list[FakeResult] = []
        self.next_outputs: list[FakeOutput] = []
        self.hang = False
        self.stats: list[Any] = []
        self.shut_down = False
        FakeLLM.instances.append(self)

    def save(self, engine_dir: str) -> None:
        Path(engine_dir).mkdir(parents=True)
        (Path(engine_dir) / "config.json").write_text(json.dumps({"version": "1.2.0"}))
        (Path(engine_dir) / "rank0.engine").write_bytes(b"\0" * 64)

    def shutdown(self) -> None:
        self.shut_down = True

    def generate_async(self, prompt_token_ids, sampling_params=None, streaming=False):
        assert streaming is True
        self.calls.append((prompt_token_ids, sampling_params))
        self.results.append(FakeResult(self.next_outputs, hang=self.hang))
        return self.results[-1]

    async def get_stats_async(self, timeout: float = 2):
        for stat in self.stats:
            yield stat


class FakeConfig(types.SimpleNamespace):
    pass


class FakeBuildConfig:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.plugin_config = FakeConfig(
            dtype="float16",
            gpt_attention_plugin="auto",
            gemm_plugin=None,
            remove_input_padding=True,
            paged_kv_cache=None,
            tokens_per_block=32,
            context_fmha=True,
            use_paged_context_fmha=True,
            multiple_profiles=False,
        )


def kw_record(**kwargs: Any) -> FakeConfig:
    return FakeConfig(**kwargs)


@pytest.fixture
def fake_trtllm(monkeypatch):
    root = types.ModuleType("tensorrt_llm")
    root.__version__ = "1.2.0"
    root.SamplingParams = FakeTrtSamplingParams
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine.LLM = FakeLLM
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.BuildConfig = FakeBuildConfig
    llmapi.CalibConfig = llmapi.KvCacheConfig = llmapi.QuantConfig = kw_record
    llmapi.QuantAlgo = types.SimpleNamespace(
        W8A16="W8A16", FP8="FP8", W8A8_SQ_PER_CHANNEL="W8A8_SQ_PER_CHANNEL"
    )
    for name, module in [
        ("tensorrt_llm", root),
        ("tensorrt_llm._tensorrt_engine", engine),
        ("tensorrt_llm.llmapi", llmapi),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(compat, "probe_gpu", lambda: compat.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 1))
    FakeLLM.instances = []
    return root


LIMITS = EngineLimits(max_batch_size=8, max_num_tokens=256, max_seq_len=64)


@pytest.fixture
def engine_dir(fake_trtllm, tiny_gqa_dir, tmp_path) -> Path:
    out = tmp_path / "engine"
    build_trtllm_engine(
        tiny_gqa_dir, out, dtype="fp16", limits=LIMITS, quantization="int8_wo", gather_logits=True
    )
    return out


def collect(engine: TrtLlmEngine, params: SamplingParams, request_id: str = "r1", ids=(1, 2, 3)) -> list:
    async def run():
        return [out async for out in engine.generate(list(ids), params, request_id)]

    return asyncio.run(run())


# -- build driver ----------------------------------------------------------------------------------


def test_build_writes_engine_tokenizer_and_manifest(engine_dir: Path, tiny_gqa_dir: Path):
    (llm,) = FakeLLM.instances
    assert llm.shut_down and llm.model == str(tiny_gqa_dir) and llm.kwargs["dtype"] == "float16"
    build_config = llm.kwargs["build_config"]
    assert build_config.kwargs["max_seq_len"] == 64 and build_config.kwargs["max_batch_size"] == 8
    plugins = build_config.plugin_config
    assert plugins.gpt_attention_plugin == "float16" and plugins.gemm_plugin == "float16"
    assert plugins.paged_kv_cache is True and plugins.tokens_per_block == 16 and plugins.multiple_profiles
    assert llm.kwargs["quant_config"].quant_algo == "W8A16" and "calib_config" not in llm.kwargs
    assert llm.kwargs["gather_generation_logits"] is True and llm.kwargs["enable_chunked_prefill"] is True

    manifest = EngineManifest.load(engine_dir, verify_checksums=True)
    assert manifest.backend == "trtllm" and manifest.quantization == "int8_wo" and manifest.dtype == "float16"
    assert set(manifest.weight_files) == {"trtllm/config.json", "trtllm/rank0.engine"}
    assert "config.json" in manifest.tokenizer_files and (engine_dir / "tokenizer_config.json").is_file()
    assert manifest.extra["tensorrt_llm_version"] == "1.2.0" and manifest.extra["compute_capability"] == "9.0"
    assert not [p for p in engine_dir.parent.iterdir() if p.name.startswith(".engine.building")]


def test_build_refuses_a_non_empty_output_dir(fake_trtllm, tiny_gqa_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_trtllm_engine(tiny_gqa_dir, tmp_path, limits=LIMITS)


# -- loading -------------------------------------------------------------------------------------


def test_from_engine_dir_loads_with_runtime_settings(engine_dir: Path):
    options = EngineConfig(max_num_seqs=4, gpu_memory_utilization=0.8, enable_prefix_caching=False)
    engine = TrtLlmEngine.from_engine_dir(engine_dir, options)
    assert isinstance(engine, EngineClient)
    llm = FakeLLM.instances[-1]
    assert llm.model == str(engine_dir / "trtllm") and llm.tokenizer == str(engine_dir)
    kv = llm.kwargs["kv_cache_config"]
    assert kv.free_gpu_memory_fraction == 0.8 and kv.enable_block_reuse is False
    assert llm.kwargs["max_batch_size"] == 4 and "max_seq_len" not in llm.kwargs  # Kiln enforces it
    assert llm.kwargs["tensor_parallel_size"] == 1 and llm.kwargs["gather_generation_logits"] is True
    info = TrtLlmEngine.from_engine_dir(engine_dir, EngineConfig(max_model_len=32)).model_info
    assert info.max_model_len == 32
    with pytest.raises(ValueError, match="max_tokens"):
        collect(
            TrtLlmEngine.from_engine_dir(engine_dir, EngineConfig(max_model_len=32)),
            SamplingParams(max_tokens=30),
        )
    info = engine.model_info
    assert (
        info.backend == "trtllm"
        and info.max_model_len == 64
        and info.extra["tensorrt_llm_version"] == "1.2.0"
    )


def test_from_engine_dir_refuses_another_library_version(engine_dir: Path, fake_trtllm):
    fake_trtllm.__version__ = "1.2.1"
    with pytest.raises(InvalidEngineError, match=r"built with tensorrt_llm 1\.2\.0"):
        TrtLlmEngine.from_engine_dir(engine_dir)


def test_from_engine_dir_refuses_a_native_engine(engine_dir: Path):
    manifest = EngineManifest.load(engine_dir)
    manifest.backend = "native"
    manifest.save(engine_dir)
    with pytest.raises(InvalidEngineError, match="'native' engine"):
        TrtLlmEngine.from_engine_dir(engine_dir)


def test_runtime_options_may_only_lower_the_built_limits(engine_dir: Path):
    manifest = EngineManifest.load(engine_dir)
    with pytest.raises(ValueError, match="max_model_len 65 exceeds the 64"):
        runtime_llm_kwargs(manifest, EngineConfig(max_model_len=65))
    with pytest.raises(ValueError, match="max_num_seqs 9"):
        runtime_llm_kwargs(manifest, EngineConfig(max_num_seqs=9))
    with pytest.raises(ValueError, match="block_size 32"):
        runtime_llm_kwargs(manifest, EngineConfig(block_size=32))
    with pytest.raises(ValueError, match="compiled for float16"):
        runtime_llm_kwargs(manifest, EngineConfig(dtype="bfloat16"))
    with pytest.raises(ValueError, match="tensor_parallel_size 2: this TensorRT engine was built for 1"):
        runtime_llm_kwargs(manifest, EngineConfig(tensor_parallel_size=2))
    assert runtime_llm_kwargs(manifest, EngineConfig(tensor_parallel_size=1))["tensor_parallel_size"] == 1
    for knob in (
        {"enforce_eager": True},
        {"piecewise_graphs": False},
        {"prefill_graph_tokens": 1024},
        {"async_scheduling": False},
        {"admission_interval": 4},
    ):
        flag = "--" + next(iter(knob)).replace("_", "-")
        with pytest.raises(ValueError, match=f"{flag} .* applies to the native engine only"):
            runtime_llm_kwargs(manifest, EngineConfig(**knob))
    assert (
        runtime_llm_kwargs(manifest, EngineConfig(num_kv_blocks=10))["kv_cache_config"]["max_tokens"] == 160
    )
    m = manifest.model  # bytes per token: K and V, every layer, the KV heads, 2 bytes each (fp16)
    per_token = 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * 2
    kv = runtime_llm_kwargs(manifest, EngineConfig(kv_cache_memory_bytes=per_token * 100))["kv_cache_config"]
    assert kv["max_tokens"] == 100


# -- generation ----------------------------------------------------------------------------------


@pytest.fixture
def engine(engine_dir: Path) -> TrtLlmEngine:
    return TrtLlmEngine.from_engine_dir(engine_dir, EngineConfig(seed=0))


def test_stream_diffs_become_kiln_deltas(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    llm.next_outputs = script(
        1,
        [[(0, [5], "Hi", None, None)], [(0, [6, 7], " there", None, None)], [(0, [], "", "length", None)]],
    )
    outs = collect(engine, SamplingParams(temperature=0.0, max_tokens=3))
    assert [o.outputs[0].token_ids for o in outs] == [[5], [6, 7], []]
    assert "".join(o.outputs[0].text for o in outs) == "Hi there"
    assert [o.finished for o in outs] == [False, False, True] and outs[-1].outputs[
        0
    ].finish_reason == "length"
    assert outs[-1].metrics.first_token_time is not None and outs[-1].metrics.finished_time is not None
    ids, sp = llm.calls[0]
    assert (
        ids == [1, 2, 3]
        and sp.top_k == 1
        and sp.max_tokens == 3
        and sp.end_id in engine._limits.eos_token_ids
    )
    assert not engine._requests  # forgotten once finished


def test_n_completions_finish_once_each_and_eos_stop_reason_is_none(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    eos = engine._limits.eos_token_ids[0]
    llm.next_outputs = script(
        2,
        [
            [(0, [5], "a", None, None), (1, [6], "b", None, None)],
            [(0, [eos], "", "stop", eos), (1, [8], "c", None, None)],
            [(1, [9], "!", "stop", "!")],
        ],
    )
    outs = collect(engine, SamplingParams(n=2, temperature=1.0, max_tokens=4, stop=["!"]))
    assert [[c.index for c in o.outputs] for o in outs] == [[0, 1], [0, 1], [1]]
    assert outs[1].outputs[0].finish_reason == "stop" and outs[1].outputs[0].stop_reason is None
    assert outs[2].outputs[0].stop_reason == "!" and outs[2].finished


@pytest.mark.parametrize(("include", "second_text"), [(False, ""), (True, "\n\n")])
def test_stop_strings_are_matched_on_text_held_back_and_abort_the_library_request(
    engine: TrtLlmEngine, include: bool, second_text: str
):
    llm = FakeLLM.instances[-1]
    llm.next_outputs = script(1, [[(0, [5], "Hello\n", None, None)], [(0, [6], "\nWorld", None, None)]])
    params = SamplingParams(max_tokens=10, stop=["\n\n"], include_stop_str_in_output=include)
    outs = collect(engine, params)
    assert [o.outputs[0].text for o in outs] == ["Hello", second_text]  # the "\n" waited for the next step
    assert [o.outputs[0].token_ids for o in outs] == [[5], [6]]
    last = outs[-1]
    assert last.finished and last.outputs[0].finish_reason == "stop" and last.outputs[0].stop_reason == "\n\n"
    assert llm.results[0].aborted == 1  # the library was still generating: its KV blocks are freed now
    assert "stop" not in {k for k, v in vars(llm.calls[0][1]).items() if v is not None}


def test_held_back_text_is_released_when_the_request_ends_otherwise(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    llm.next_outputs = script(1, [[(0, [5], "xa", None, None)], [(0, [6], "", "length", None)]])
    outs = collect(engine, SamplingParams(max_tokens=2, stop=["ab"]))
    assert [o.outputs[0].text for o in outs] == ["x", "a"] and outs[-1].outputs[0].finish_reason == "length"
    assert llm.results[0].aborted == 0  # the library finished by itself


def test_closing_the_stream_aborts_the_request(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    llm.next_outputs, llm.hang = script(1, [[(0, [5], "a", None, None)]]), True

    async def run():
        stream = engine.generate([1, 2], SamplingParams(max_tokens=10), "gone")
        first = await stream.__anext__()
        assert "gone" in engine._requests
        await stream.aclose()
        return first

    assert asyncio.run(run()).outputs[0].token_ids == [5]
    assert llm.results[0].aborted == 1 and not engine._requests


def test_abort_by_id_stops_the_stream(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    llm.next_outputs, llm.hang = script(1, [[(0, [5], "a", None, None)]]), True

    async def run():
        outs = []
        async for out in engine.generate([1, 2], SamplingParams(max_tokens=10), "r"):
            outs.append(out)
            await engine.abort("r")
            await engine.abort("unknown-id")  # does nothing
        return outs

    assert len(asyncio.run(run())) == 1 and llm.results[0].aborted == 1


def test_bad_requests_raise_before_anything_is_queued(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    for params, ids, match in [
        (SamplingParams(max_tokens=100), [1, 2], "max_tokens"),
        (SamplingParams(), [], "empty"),
        (SamplingParams(), [10**6], "out of range"),
        (SamplingParams(n=2, temperature=0.0), [1], "n > 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            collect(engine, params, ids=ids)
    assert llm.calls == []


def test_logprobs_are_translated_and_trimmed(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    entries = [
        {5: FakeLogprob(-0.1, 1), 9: FakeLogprob(-2.5, 2)},
        {7: FakeLogprob(-1.0, 2), 3: FakeLogprob(-0.5, 1)},
    ]
    llm.next_outputs = script(1, [[(0, [5, 7], "ab", "length", None, entries)]])
    (out,) = collect(engine, SamplingParams(max_tokens=2, logprobs=0))
    assert out.outputs[0].logprobs == [{5: Logprob(-0.1, 1)}, {7: Logprob(-1.0, 2)}]
    assert llm.calls[0][1].logprobs == 1


def test_translate_logprobs_fills_missing_ranks_and_keeps_the_sampled_token():
    entry = {4: FakeLogprob(-3.0), 1: FakeLogprob(-0.2), 2: FakeLogprob(-1.0)}
    assert translate_logprobs([entry], [4], top_k=1) == [{1: Logprob(-0.2, 1), 4: Logprob(-3.0, 3)}]
    with pytest.raises(TypeError):
        translate_logprobs([-0.5], [4], top_k=1)


def test_translator_yields_nothing_for_an_empty_step():
    translator = OutputTranslator("r", None, [1], logprobs=None)
    (first,) = script(1, [[]])
    assert translator.step(first) is None


# -- stats and lifecycle -------------------------------------------------------------------------


STAT = {
    "iter": 3,
    "numActiveRequests": 2,
    "numQueuedRequests": 1,
    "inflightBatchingStats": {"numPausedRequests": 1},
    "kvCacheStats": {
        "maxNumBlocks": 100,
        "usedNumBlocks": 30,
        "tokensPerBlock": 16,
        "reusedBlocks": 4,
        "missedBlocks": 6,
    },
}


def test_stats_mapping_from_dict_and_json():
    for stat in (STAT, json.dumps(STAT)):
        s = engine_stats_from_trtllm(stat)
        assert (s.num_running, s.num_waiting, s.kv_blocks_total, s.kv_blocks_used) == (2, 2, 100, 30)
        assert (s.prefix_cache_queries, s.prefix_cache_hits) == (160, 64) and s.kv_usage == 0.3


def test_stats_are_polled_and_shutdown_stops_everything(engine: TrtLlmEngine):
    llm = FakeLLM.instances[-1]
    llm.stats = [STAT]
    engine.stats_interval_s = 0.001

    async def run():
        await engine.start()
        engine._requests["busy"] = FakeResult([])
        await asyncio.sleep(0.05)
        seen = engine.stats()
        await engine.shutdown()
        return seen

    seen = asyncio.run(run())
    assert seen.kv_blocks_used == 30 and seen.num_running == 2
    assert llm.shut_down and not engine._requests and engine._stats_task is None
    assert engine.stats().num_running == 0  # idle: no stale load


# -- through the rest of Kiln ----------------------------------------------------------------------


def test_open_engine_picks_the_trtllm_backend(engine_dir: Path):
    from kiln.clients.open import open_engine

    assert isinstance(open_engine(engine_dir, EngineConfig()), TrtLlmEngine)


@pytest.fixture
def served(fake_trtllm, tiny_gqa_dir, tmp_path):
    """A TestClient over the real app and a TrtLlmEngine on an engine built without gathered logits."""
    from fastapi.testclient import TestClient

    from kiln.serve.app import create_app
    from kiln.serve.settings import ServerSettings

    out = tmp_path / "no-logits"
    build_trtllm_engine(tiny_gqa_dir, out, limits=LIMITS, served_model_name="tiny-trt")
    engine = TrtLlmEngine.from_engine_dir(out, EngineConfig())
    with TestClient(create_app(engine, ServerSettings()), raise_server_exceptions=False) as client:
        yield client, FakeLLM.instances[-1]


def test_openai_server_streams_from_the_trtllm_backend(served):
    client, llm = served
    llm.next_outputs = script(1, [[(0, [5], "Hi", None, None)], [(0, [6], " there", "length", None)]])
    assert client.get("/ready").status_code == 200
    ok = client.post("/v1/completions", json={"model": "tiny-trt", "prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"] == "Hi there"
    assert ok.json()["choices"][0]["finish_reason"] == "length"
    assert llm.calls[0][1].max_tokens == 2


def test_openai_server_answers_an_unhonourable_parameter_with_400(served):
    client, _ = served
    body = {"model": "tiny-trt", "prompt": "hello", "max_tokens": 2, "logprobs": 1}
    refused = client.post("/v1/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs", refused.text
