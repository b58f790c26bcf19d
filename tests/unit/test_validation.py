"""Request validation: every refusal is a RequestValidationError naming its field."""

from __future__ import annotations

import pickle

import pytest

from kiln.engine.sampling_params import SamplingParams
from kiln.engine.validation import validate_request
from kiln.errors import RequestValidationError

VOCAB, CONTEXT = 100, 16


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], {}, "prompt"),
        ([1, 100], {}, "prompt"),
        ([-1], {}, "prompt"),
        (list(range(16)), {"max_tokens": None}, "prompt"),
        ([1, 2], {"max_tokens": 15}, "max_tokens"),
        ([1, 2], {"max_tokens": 2, "logit_bias": {100: 1.0}}, "logit_bias"),
        ([1, 2], {"max_tokens": 2, "stop_token_ids": [5, 100]}, "stop_token_ids"),
        ([1, 2], {"max_tokens": 2, "allowed_token_ids": [5, 100]}, "allowed_token_ids"),
    ],
)
def test_validate_request_names_the_field(prompt: list[int], params: dict, field: str) -> None:
    with pytest.raises(RequestValidationError) as caught:
        validate_request(prompt, SamplingParams(**params), vocab_size=VOCAB, max_model_len=CONTEXT)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)  # what callers of the engines have always caught


def test_a_runnable_request_passes() -> None:
    params = SamplingParams(max_tokens=14, logit_bias={99: 1.0}, stop_token_ids=[0])
    validate_request([1, 2], params, vocab_size=VOCAB, max_model_len=CONTEXT)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ({"logit_bias": {5: 500.0}}, "logit_bias"),
    ],
)
def test_sampling_params_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(RequestValidationError) as caught:
        SamplingParams(**params)
    assert caught.value.field == field


def test_the_field_survives_pickling() -> None:
    # The process driver sends errors from its engine process as pickles.
    error = pickle.loads(pickle.dumps(RequestValidationError("bad", "max_tokens")))
    assert isinstance(error, RequestValidationError) and error.field == "max_tokens" and str(error) == "bad"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"seed": 2**64}, "seed"),  # overflowed torch.Generator.manual_seed inside a step
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),  # sequence 1 would use seed + 1
        ({"n": 129}, "n"),
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": ["x" * 4097]}, "stop"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ({"logit_bias": {t: 1.0 for t in range(1025)}}, "logit_bias"),
        ({"allowed_token_ids": list(range(1025))}, "allowed_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),  # nothing could be sampled
        ({"temperature": float("nan")}, "temperature"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
    ],
)
def test_what_one_request_may_ask_for_is_bounded(params: dict, field: str) -> None:
    with pytest.raises(RequestValidationError) as caught:
        SamplingParams(**params)
    assert caught.value.field == field


def test_the_bounds_themselves_are_accepted() -> None:
    SamplingParams(seed=2**63 - 2, n=2)
    SamplingParams(seed=-(2**63), n=128)
    SamplingParams(stop=["x" * 4096] * 64, stop_token_ids=list(range(1024)))
