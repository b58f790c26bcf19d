"""The OpenAI protocol layer without a server: request models, parameter mapping, logprob shapes,
usage sums, admission limits, and error JSON."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from kiln.engine.outputs import CompletionOutput, Logprob, RequestOutput
from kiln.serve.admission import Admission
from kiln.serve.chat_tools import template_messages
from kiln.serve.errors import InvalidRequestError, OverloadedError, UnavailableError, validation_error
from kiln.serve.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_out
from kiln.serve.protocol import ChatCompletionRequest, ChatDelta, CompletionRequest
from kiln.serve.sampling import resolve_max_tokens, to_sampling_params
from kiln.serve.usage import UsageCounter

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSG, **fields})


def test_messages_text_parts_and_developer_role() -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert template_messages(body.messages, None, native=False) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "ab"},
    ]


def test_unknown_fields_are_kept_aside_not_rejected() -> None:
    body = chat(frobnicate=1)
    assert body.model_extra == {"frobnicate": 1}


def _refusal(model: type[BaseModel], body: dict) -> InvalidRequestError:
    """The 400 the server sends for `body` (FastAPI puts the body's fields under "body")."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    error = validation_error(RequestValidationError(errors))
    assert isinstance(error, InvalidRequestError)
    return error


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"modalities": ["text", "audio"]}, "modalities", "audio output is not supported"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio output is not supported"),
        ({"web_search_options": {}}, "web_search_options", "web search is not supported"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "reasoning effort is not supported"),
        ({"verbosity": "low"}, "verbosity", "verbosity is not supported"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "predicted outputs are not"),
        ({"store": True}, "store", "stored completions are not supported"),
        ({"service_tier": "flex"}, "service_tier", "service tier 'flex' is not supported"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16 pairs"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "keys are at most 64 characters: 'kkkk"),
        ({"metadata": {"k": "v" * 513}}, "metadata", "the value of 'k' is longer"),
        ({"metadata": {"k": 1}}, "metadata.k", "string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
            "content parts of type 'image_url' are not supported",
        ),
    ],
)
def test_chat_fields_asking_beyond_text_are_refused(fields: dict, param: str, says: str) -> None:
    error = _refusal(ChatCompletionRequest, {"messages": MSG, **fields})
    assert error.param == param and says in error.message


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"suffix": "tail"}, "suffix", "non-empty suffix"),
        ({"best_of": 3, "n": 2}, "best_of", "more samples than n"),
        ({"best_of": 1, "n": 2}, "best_of", "at least n (2)"),
    ],
)
def test_completion_fields_kiln_cannot_honour_are_refused(fields: dict, param: str, says: str) -> None:
    error = _refusal(CompletionRequest, {"prompt": "x", **fields})
    assert error.param == param and says in error.message


def test_openai_fields_that_change_nothing_are_taken() -> None:
    assert chat(modalities=["text"], audio=None, web_search_options=None).modalities == ["text"]
    for tier in ("auto", "default"):
        assert chat(service_tier=tier, store=False, reasoning_effort=None).model_extra == {}
    body = chat(user="u", metadata={"k" * 64: "v" * 512})
    assert body.log_tags() == {"user": "u", "metadata": {"k" * 64: "v" * 512}} and body.model_extra == {}
    assert chat().log_tags() == {} and CompletionRequest.model_validate(
        {"prompt": "x", "user": "u"}
    ).log_tags() == {"user": "u"}
    body = CompletionRequest.model_validate({"prompt": "x", "suffix": "", "best_of": 2, "n": 2})
    assert body.model_extra == {} and body.best_of == 2


def test_completion_prompt_forms() -> None:
    assert CompletionRequest.model_validate({"prompt": "x"}).prompt == "x"
    assert CompletionRequest.model_validate({"prompt": ["x", "y"]}).prompt == ["x", "y"]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompt == [1, 2]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompt == [[1], [2, 3]]


def test_sampling_params_mapping() -> None:
    body = chat(
        temperature=0,
        top_k=-1,
        stop="END",
        logit_bias={"7": -100},
        seed=3,
        presence_penalty=0.5,
        stop_token_ids=[2],
        ignore_eos=True,
        n=2,
    )
    params = to_sampling_params(
        body, max_tokens=9, logprobs=None, vocab_size=100, logprobs_param="top_logprobs"
    )
    assert params.greedy and params.top_k is None
    assert params.stop == ["END"] and params.logit_bias == {7: -100.0}
    assert params.seed == 3 and params.presence_penalty == 0.5 and params.max_tokens == 9
    assert params.stop_token_ids == [2] and params.ignore_eos and params.n == 2
    defaults = to_sampling_params(chat(), max_tokens=1, logprobs=None, vocab_size=100, logprobs_param="x")
    assert defaults.temperature == 1.0 and defaults.top_p == 1.0 and defaults.repetition_penalty == 1.0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_p": 2}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": -1}, "min_p"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"100": 1}}, "logit_bias"),
        ({"stop_token_ids": [100]}, "stop_token_ids"),
    ],
)
def test_invalid_sampling_values_name_the_field(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        to_sampling_params(chat(**fields), max_tokens=4, logprobs=None, vocab_size=100, logprobs_param="x")
    assert info.value.param == param and info.value.status_code == 400


def test_logprobs_range_error_names_the_request_field() -> None:
    with pytest.raises(InvalidRequestError) as info:
        to_sampling_params(chat(), max_tokens=4, logprobs=21, vocab_size=100, logprobs_param="top_logprobs")
    assert info.value.param == "top_logprobs"


def test_resolve_max_tokens() -> None:
    kw = {"param": "max_tokens", "max_model_len": 100, "prompt_param": "prompt"}
    assert resolve_max_tokens(None, prompt_tokens=30, **kw) == 70
    assert resolve_max_tokens(70, prompt_tokens=30, **kw) == 70
    with pytest.raises(InvalidRequestError, match=r"100 tokens.*101 tokens \(30 in the prompt, 71") as info:
        resolve_max_tokens(71, prompt_tokens=30, **kw)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as info:
        resolve_max_tokens(None, prompt_tokens=100, **kw)
    assert info.value.param == "prompt"


def test_validation_error_param_skips_union_tags() -> None:
    union_errors = [
        {"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "bad"},
        {"type": "list_type", "loc": ("body", "prompt", "list[int]"), "msg": "bad"},
    ]
    exc = RequestValidationError(union_errors)
    assert validation_error(exc).param == "prompt"
    nested = RequestValidationError(
        [{"type": "literal_error", "loc": ("body", "messages", 1, "role"), "msg": "m"}]
    )
    assert validation_error(nested).param == "messages.1.role"
    broken = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 3), "msg": "x", "ctx": {"error": "E"}}]
    )
    assert validation_error(broken).code == "invalid_json"


def test_chat_delta_leaves_out_unset_fields() -> None:
    assert ChatDelta().model_dump_json() == "{}"
    assert ChatDelta(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}


ENTRIES = [
    {5: Logprob(-0.1, 1, "a"), 6: Logprob(-2.5, 2, "bb")},
    {6: Logprob(-0.3, 1, "bb"), 9: Logprob(-3.0, 3, None), 5: Logprob(-1.0, 2, "a")},
]


def test_chat_logprobs_shape() -> None:
    raw = {5: b"a", 6: b"\xf0\x9f", 9: b"\x8e\x89"}  # token 6 then 9: the first and last bytes of U+1F389
    result = chat_logprobs(
        [5, 9], ENTRIES, top_n=2, token_text=lambda i: f"<{i}>", token_bytes=raw.__getitem__
    )
    first, second = result.content
    assert (first.token, first.logprob, first.bytes) == ("a", -0.1, [97])
    assert second.bytes == [0x8E, 0x89] and first.top_logprobs[1].bytes == [
        0xF0,
        0x9F,
    ]  # the token's, not "bb"'s
    assert [t.token for t in first.top_logprobs] == ["a", "bb"]
    assert (second.token, second.logprob) == ("<9>", -3.0)  # decoded by the tokenizer when missing
    assert [t.token for t in second.top_logprobs] == ["bb", "a"]  # best ranks, sampled one not among them


def test_completion_logprobs_shape_and_offsets() -> None:
    result, end = completion_logprobs([5, 6], ENTRIES, top_n=1, token_text=str, text_offset=10)
    assert result.tokens == ["a", "bb"]
    assert result.token_logprobs == [-0.1, -0.3]
    assert result.top_logprobs == [{"a": -0.1}, {"bb": -0.3}]
    assert result.text_offset == [10, 11] and end == 13
    none_top, _ = completion_logprobs([5], ENTRIES[:1], top_n=0, token_text=str, text_offset=0)
    assert none_top.top_logprobs == [None]


def test_tokens_named_by_id_keep_the_text_offsets() -> None:
    # Prompt scores first (position 0 unscored), then sampled tokens: names by id, offsets by text.
    result, end = completion_logprobs(
        [7, 5, 6], [None, *ENTRIES], top_n=2, token_text=str, text_offset=0, as_ids=True
    )
    assert result.tokens == ["token_id:7", "token_id:5", "token_id:6"]
    assert result.token_logprobs == [None, -0.1, -0.3]
    assert result.top_logprobs == [
        None,
        {"token_id:5": -0.1, "token_id:6": -2.5},
        {"token_id:6": -0.3, "token_id:5": -1.0},
    ]
    assert result.text_offset == [0, 1, 2] and end == 4  # "7", "a", "bb"
    chat = chat_logprobs([9], ENTRIES[1:], top_n=1, token_text=str, token_bytes=lambda i: b"x", as_ids=True)
    assert chat.content[0].token == "token_id:9" and chat.content[0].top_logprobs[0].token == "token_id:6"
    scores = prompt_logprobs_out([7, 6], [None, ENTRIES[1]], top_n=1, token_text=str, as_ids=True)
    assert scores[0] is None and {k: v.decoded_token for k, v in scores[1].items()} == {"6": "token_id:6"}


def test_usage_counts_prompts_once_and_every_choice() -> None:
    usage = UsageCounter()
    out = [CompletionOutput(index=0, token_ids=[1, 2]), CompletionOutput(index=1, token_ids=[3])]
    usage.add(RequestOutput("r", None, [1, 2, 3], out, num_cached_tokens=2))
    usage.add(RequestOutput("r", None, [1, 2, 3], [CompletionOutput(index=0, token_ids=[4])], finished=True))
    u = usage.usage()
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (3, 4, 7)


def test_admission_limits_and_tickets() -> None:
    a = Admission(max_waiting_sequences=4, max_waiting_tokens=100, retry_after_seconds=4)
    with pytest.raises(UnavailableError):
        a.admit(1, 1)  # not ready yet
    a.ready = True
    big = a.admit(1, 500)  # larger than the token limit, but nothing else waits: admitted
    with pytest.raises(OverloadedError) as info:
        a.admit(1, 1)
    assert info.value.headers == {"Retry-After": "4"} and info.value.status_code == 429
    big.started()
    big.release()  # idempotent
    assert (a.waiting_requests, a.waiting_sequences, a.waiting_tokens) == (0, 0, 0)
    t1, _t2 = a.admit(2, 10), a.admit(1, 10)  # a request is weighed by its sequences (prompts x n)
    assert (a.waiting_requests, a.waiting_sequences, a.waiting_tokens) == (2, 3, 20)
    with pytest.raises(OverloadedError, match="too many sequences"):
        a.admit(2, 1)
    a.admit(1, 1).release()  # one more still fits
    with pytest.raises(InvalidRequestError) as never:
        a.admit(5, 1)  # could never be admitted: 400, not 429
    assert never.value.status_code == 400 and never.value.param == "n"
    t1.release()
    a.draining = True
    with pytest.raises(UnavailableError) as drained:
        a.admit(1, 1)
    assert drained.value.code == "draining"
