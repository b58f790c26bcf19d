"""Kiln SamplingParams -> tensorrt_llm SamplingParams keywords (no tensorrt_llm needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kiln.engine.sampling_params import SamplingParams, StructuredOutput
from kiln.errors import RequestValidationError
from kiln.trtllm.params import (
    TrtLlmRequestLimits,
    make_trtllm_sampling_params,
    resolve_max_tokens,
    trtllm_sampling_kwargs,
)

LIMITS = TrtLlmRequestLimits(
    max_seq_len=128, max_batch_size=8, vocab_size=100, eos_token_ids=[2, 7], gather_generation_logits=True
)


def kwargs(params: SamplingParams, *, prompt_len: int = 10, limits: TrtLlmRequestLimits = LIMITS) -> dict:
    return trtllm_sampling_kwargs(params, prompt_len=prompt_len, limits=limits, fallback_seed=1234)


@dataclass(slots=True, kw_only=True)
class FakeTrtSamplingParams:
    """The fields of tensorrt_llm 1.2's SamplingParams that Kiln uses (dataclass, like the library's)."""

    end_id: int | None = None
    max_tokens: int = 32
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    embedding_bias: torch.Tensor | None = None
    n: int = 1
    best_of: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_p: float | None = None
    prompt_ignore_length: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True


def test_greedy_becomes_top_k_one_without_top_p():
    kw = kwargs(SamplingParams(temperature=0.0, top_p=0.5, top_k=40, max_tokens=5))
    assert kw["top_k"] == 1 and kw["top_p"] is None and kw["temperature"] is None
    assert kw["max_tokens"] == 5 and kw["n"] == 1 and kw["best_of"] == 1


def test_sampling_always_passes_top_p_so_runtime_never_turns_greedy():
    kw = kwargs(SamplingParams(temperature=0.7, max_tokens=5))
    assert kw["temperature"] == 0.7 and kw["top_p"] == 1.0 and kw["top_k"] is None
    kw = kwargs(SamplingParams(temperature=0.7, top_k=0, top_p=0.9, min_p=0.05, max_tokens=5))
    assert kw["top_k"] is None and kw["top_p"] == 0.9 and kw["min_p"] == 0.05


def test_penalties_skip_prompt_for_presence_and_frequency_only():
    kw = kwargs(
        SamplingParams(presence_penalty=0.5, frequency_penalty=-0.3, repetition_penalty=1.2), prompt_len=17
    )
    assert kw["presence_penalty"] == 0.5 and kw["frequency_penalty"] == -0.3
    assert kw["prompt_ignore_length"] == 17 and kw["repetition_penalty"] == 1.2
    plain = kwargs(SamplingParams())
    assert not {"presence_penalty", "frequency_penalty", "prompt_ignore_length", "repetition_penalty"} & set(
        plain
    )


def test_seed_is_the_requests_or_a_fresh_fallback():
    assert kwargs(SamplingParams(seed=5))["seed"] == 5
    assert kwargs(SamplingParams())["seed"] == 1234


def test_max_tokens_none_fills_the_context_and_overflow_is_refused():
    assert kwargs(SamplingParams(max_tokens=None), prompt_len=28)["max_tokens"] == 100
    with pytest.raises(ValueError, match="max_tokens"):
        kwargs(SamplingParams(max_tokens=119), prompt_len=10)
    with pytest.raises(ValueError, match="no room"):
        resolve_max_tokens(SamplingParams(), 128, 128)


def test_stop_ids_and_extra_eos_ids_pass_but_stop_strings_stay_with_kiln():
    kw = kwargs(
        SamplingParams(stop=["\n\n"], stop_token_ids=[9], include_stop_str_in_output=True, min_tokens=3)
    )
    assert "stop" not in kw and "include_stop_str_in_output" not in kw  # matched on the text by the backend
    assert kw["end_id"] == 2 and kw["stop_token_ids"] == [9, 7]  # second EOS id becomes a stop id
    assert kw["min_tokens"] == 3
    kw = kwargs(SamplingParams(ignore_eos=True))
    assert kw["ignore_eos"] is True and "stop_token_ids" not in kw


def test_logprobs_zero_asks_for_one_and_needs_gathered_logits():
    assert kwargs(SamplingParams(logprobs=0))["logprobs"] == 1
    assert kwargs(SamplingParams(logprobs=5))["logprobs"] == 5
    no_logits = TrtLlmRequestLimits(128, 8, 100, [2], gather_generation_logits=False)
    with pytest.raises(ValueError, match=r"^logprobs .*--trtllm-gather-logits"):
        kwargs(SamplingParams(logprobs=1), limits=no_logits)


def test_refusals_name_the_field():
    with pytest.raises(ValueError, match=r"^n "):
        kwargs(SamplingParams(n=9, temperature=1.0))
    with pytest.raises(ValueError, match=r"^n > 1 with temperature 0"):
        kwargs(SamplingParams(n=2, temperature=0.0))
    with pytest.raises(ValueError, match=r"^logit_bias"):
        kwargs(SamplingParams(logit_bias={100: 1.0}))
    with pytest.raises(ValueError, match=r"^allowed_token_ids .* native engine"):
        kwargs(SamplingParams(allowed_token_ids=[5]))
    with pytest.raises(ValueError, match=r"^prompt scoring .* native engine") as refused:
        kwargs(SamplingParams(prompt_logprobs=0))
    assert refused.value.field == "prompt_logprobs"


def test_make_params_builds_the_embedding_bias_tensor():
    kw = kwargs(SamplingParams(logit_bias={3: 5.0, 99: -100.0}, skip_special_tokens=False, max_tokens=4))
    sp = make_trtllm_sampling_params(FakeTrtSamplingParams, kw, vocab_size=100)
    assert isinstance(sp, FakeTrtSamplingParams)
    assert sp.embedding_bias.shape == (100,) and sp.embedding_bias.dtype == torch.float32
    assert (
        sp.embedding_bias[3] == 5.0
        and sp.embedding_bias[99] == -100.0
        and sp.embedding_bias.abs().sum() == 105.0
    )
    assert sp.skip_special_tokens is False and sp.max_tokens == 4 and sp.end_id == 2


def test_make_params_refuses_keywords_the_library_lacks_naming_the_kiln_field():
    @dataclass(slots=True, kw_only=True)
    class OldSamplingParams:  # a library without prompt_ignore_length
        max_tokens: int = 32
        presence_penalty: float | None = None

    kw = {"max_tokens": 4, "presence_penalty": 0.5, "prompt_ignore_length": 3}
    with pytest.raises(ValueError, match=r"^presence_penalty cannot be honoured"):
        make_trtllm_sampling_params(OldSamplingParams, kw, vocab_size=10)


def test_structured_outputs_are_refused_naming_the_field_until_mapped():
    with pytest.raises(RequestValidationError, match="not supported by the TensorRT-LLM backend") as refused:
        kwargs(SamplingParams(structured=StructuredOutput("regex", "a+")))
    assert refused.value.field == "structured"
