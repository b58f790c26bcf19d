"""Request fields -> `SamplingParams`, with the checks that need the model (context, vocabulary).

Rules:
- `max_tokens` omitted is the server's `default_max_tokens` if set (capped by the room left), else it
  fills the context: max_model_len - prompt tokens. Over the server's `max_tokens_limit` is a 400.
- prompt + max_tokens over max_model_len is a 400 that states both numbers (code
  `context_length_exceeded`), as OpenAI does.
- `SamplingParams.validate()` owns value ranges and `kiln.engine.validation` the vocabulary's; their
  `RequestValidationError.field` becomes `param` (`logprobs` is chat's `top_logprobs`).
- `logit_bias` keys are token ids written as strings.
- A sampling field the request omits (temperature, top_p, top_k, min_p, repetition_penalty; max_tokens
  beneath `default_max_tokens`) takes the model's default (`model_sampling_defaults`: its
  generation_config.json, as vLLM and Ollama do), else Kiln's; a field the request sends always wins,
  0 and -1 included (null is omitted). `--generation-config none` leaves the model's out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kiln.engine import validation
from kiln.engine.info import ModelInfo
from kiln.engine.sampling_params import SamplingParams, StructuredOutput
from kiln.engine.structured import grammar_text
from kiln.engine_dir import read_generation_defaults
from kiln.errors import KilnError, RequestValidationError
from kiln.serve.errors import InvalidRequestError
from kiln.serve.protocol import SamplingRequest

logger = logging.getLogger("kiln.serve")


def model_sampling_defaults(info: ModelInfo, mode: str) -> dict[str, float | int]:
    """The model's request defaults the server applies: none with `mode` "none" or without an engine
    directory; else its engine's `generation_defaults` (a Hugging Face directory: its
    generation_config.json). Defaults a request could not send are logged and left out, not applied."""
    if mode == "none" or info.engine_dir is None:
        return {}
    try:
        defaults = read_generation_defaults(Path(info.engine_dir))
        SamplingParams(**defaults).validate()  # type: ignore[arg-type]
    except (KilnError, ValueError, TypeError) as exc:  # RequestValidationError is a ValueError
        logger.warning("not applying the model's sampling defaults: %s", exc)
        return {}
    return defaults


def resolve_max_tokens(
    requested: int | None,
    *,
    param: str,
    prompt_tokens: int,
    max_model_len: int,
    prompt_param: str,
    default: int | None = None,
    limit: int | None = None,
) -> int:
    """The request's output budget: `requested`, else `default` (at most the room left), else the room
    left; 400 when it exceeds `limit` or the context."""
    room = max_model_len - prompt_tokens
    if requested is not None and limit is not None and requested > limit:
        raise InvalidRequestError(
            f"{param} ({requested}) is over this server's limit of {limit} (max_tokens_limit)", param=param
        )
    if requested is None:
        if default is not None and room >= 1:
            return min(default, room)
        if room < 1:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                f"{prompt_tokens} tokens, which leaves no room for a completion.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        return room
    if requested < 1:
        raise InvalidRequestError(f"{param} must be >= 1, got {requested}", param=param, code="invalid_value")
    if requested > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def check_token_ids(token_ids: list[int], *, vocab_size: int, param: str) -> None:
    """The engine's vocabulary check (`kiln.engine.validation`), as a 400 naming `param`."""
    try:
        validation.check_token_ids(token_ids, vocab_size=vocab_size, field=param)
    except RequestValidationError as exc:
        raise InvalidRequestError(str(exc), param=exc.field) from None


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        check_token_ids([token_id], vocab_size=vocab_size, param="logit_bias")
        bias[token_id] = value
    return bias


def to_sampling_params(
    body: SamplingRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    vocab_size: int,
    logprobs_param: str,
    structured: StructuredOutput | None = None,
    defaults: Mapping[str, float | int] | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """Build the engine's params, a field the body omits from `defaults` (the model's) else Kiln's;
    any invalid value raises a 400 naming its field. `prompt_logprobs`: the alternatives the endpoint
    needs per prompt token, at least the body's `prompt_logprobs`."""
    if body.prompt_logprobs is not None and body.stream:
        raise InvalidRequestError(
            "prompt_logprobs is not available with stream: true; ask without streaming",
            param="prompt_logprobs",
        )
    if body.prompt_logprobs is not None:
        prompt_logprobs = max(body.prompt_logprobs, prompt_logprobs or 0)
    check_token_ids(body.stop_token_ids or [], vocab_size=vocab_size, param="stop_token_ids")
    check_token_ids(body.allowed_token_ids or [], vocab_size=vocab_size, param="allowed_token_ids")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    defaults = defaults or {}

    def pick(name: str, kiln_default: float | None) -> Any:
        sent = getattr(body, name)
        return sent if sent is not None else defaults.get(name, kiln_default)

    top_k = pick("top_k", None)
    try:
        return SamplingParams(
            n=body.n,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            # -1 is vLLM's spelling of "no top-k"; Kiln's Python API says None.
            top_k=None if top_k == -1 else top_k,
            min_p=pick("min_p", 0.0),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=stop,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=_logit_bias(body.logit_bias, vocab_size),
            allowed_token_ids=None if body.allowed_token_ids is None else list(body.allowed_token_ids),
            structured=structured,
        )
    except RequestValidationError as exc:
        param = logprobs_param if exc.field == "logprobs" else exc.field
        raise InvalidRequestError(str(exc), param=param) from None


def structured_output(body: SamplingRequest) -> tuple[StructuredOutput | None, str | None]:
    """The output constraint a request asks for, and the field that asked (for a 400's `param`).

    Accepted: OpenAI's `response_format` (json_object, json_schema; `strict` or not, the schema is
    enforced), vLLM's `structured_outputs` (json, regex, choice, grammar, json_object) and its older
    `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. More than one is a 400: which
    should win is not for the server to guess."""
    asked: list[tuple[StructuredOutput, str]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        asked.append((StructuredOutput("json_object"), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise InvalidRequestError(
                "response_format json_schema needs its json_schema", param="response_format"
            )
        asked.append((StructuredOutput.json_schema(rf.json_schema.schema_), "response_format"))
    so = body.structured_outputs
    if so is not None:
        for name, value in (
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
        ):
            if value is not None:
                asked.append((_constraint(name, value), "structured_outputs"))
        if so.json_object:
            asked.append((StructuredOutput("json_object"), "structured_outputs"))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{name}")
        if value is not None:
            asked.append((_constraint(name, value), f"guided_{name}"))
    if len(asked) > 1:
        raise InvalidRequestError(
            "give one output constraint; this request has " + ", ".join(sorted({p for _, p in asked})),
            param=asked[1][1],
        )
    if not asked:
        return None, None
    structured, param = asked[0]
    try:
        grammar_text(structured)  # syntax errors now; what the tokenizer cannot follow, when it is added
    except RequestValidationError as exc:
        raise InvalidRequestError(str(exc), param=param) from None
    except (ValueError, RuntimeError) as exc:
        raise InvalidRequestError(f"{structured.kind}: {exc}", param=param) from None
    return structured, param


def _constraint(name: str, value: Any) -> StructuredOutput:
    if name == "json":
        return StructuredOutput.json_schema(value)
    if name == "choice":
        return StructuredOutput.choice(value)
    return StructuredOutput(name, value)  # type: ignore[arg-type]


def log_unknown_fields(body: BaseModel, request_id: str) -> None:
    """Unknown fields are ignored, not rejected; say so once per request so a typo is findable."""
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        logger.info("request %s: ignoring unknown fields %s", request_id, extra)
