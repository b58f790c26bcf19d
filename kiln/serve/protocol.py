"""OpenAI wire format: request models (validated) and response/chunk models (serialized).

Rules:
- Requests accept unknown fields (kept in `model_extra`); the handlers log and ignore them, as the
  issue asks, so newer clients never break on a field Kiln does not know.
- Types are checked here, strictly, as OpenAI checks them and as /openapi.json documents them (these
  models are its request schemas): `"0.7"` is not a number, `0` or `"true"` not a boolean, `2.0` not
  an integer. Value ranges are checked by `SamplingParams.validate()` so there is one source of truth
  for them. Both become a 400 naming the field as `param`.
- OpenAI fields that ask for what Kiln cannot do (`suffix` insertion, `best_of` above `n`, audio output,
  web search, image/audio/file content parts, stored completions, service tiers, reasoning effort,
  verbosity, predicted outputs) are declared, so /openapi.json shows them, and refused with a 400 naming
  the field: ignoring them would answer a different request than the one sent.
- `user` and chat's `metadata` are for whoever reads the server's logs: they go into the request's log
  line (`log_tags`), as OpenAI keeps them with its record of the request.
- `top_k: -1` (vLLM's spelling of "disabled") is accepted and means None.
- `timeout` (Kiln's extension: the request's deadline in seconds) is not a sampling field, so its
  range (> 0, finite, at most `MAX_REQUEST_TIMEOUT_SECONDS`) is checked here, in the schema.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kiln.engine.sampling_params import MAX_N

# The longest deadline a request may ask for (a day): the `timeout` field's and X-Request-Timeout's
# upper bound. A server's own --max-request-timeout-seconds may only make it shorter.
MAX_REQUEST_TIMEOUT_SECONDS = 86_400.0

# ---------------------------------------------------------------------------------------------------
# requests


class LenientModel(BaseModel):
    # Lenient about unknown fields, strict about the types of known ones.
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_omitted(cls, data: Any) -> Any:
        """`null` for a field with a default means the default, as in OpenAI's API (`"stream": null`,
        `"logprobs": null`, `"n": null`), which clients send for options they leave unset."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {
                k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()
            }
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # What `_null_is_omitted` accepts, the schema says: an optional field may be null.
        schema = handler.resolve_ref_schema(handler(core_schema))
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            if name in required or prop.get("type") == "null" or {"type": "null"} in prop.get("anyOf", []):
                continue
            outer = {k: v for k, v in prop.items() if k in ("default", "title", "description")}
            inner = {k: v for k, v in prop.items() if k not in outer}
            schema["properties"][name] = {**outer, "anyOf": [inner, {"type": "null"}]}
        return schema


class StreamOptions(LenientModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False,
        description="vLLM's extension: every chunk carries the usage so far (with include_usage only).",
    )

    @field_validator("continuous_usage_stats")
    @classmethod
    def _with_usage(cls, continuous: bool, info: ValidationInfo) -> bool:
        if continuous and not info.data.get("include_usage"):
            raise PydanticCustomError("invalid", "needs include_usage: true")
        return continuous


class TextPart(LenientModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(LenientModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(LenientModel):
    """A tool call in the history (an assistant message's `tool_calls`)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(LenientModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # validate_default: a missing (or null) content reaches `_content_required` too.
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """An image, audio or file part is refused by its type, not as "not a valid string"."""
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise PydanticCustomError(
                        "unsupported",
                        "content parts of type '{kind}' are not supported: Kiln's models read text only",
                        {"kind": kind},
                    )
        return content

    @field_validator("content")
    @classmethod
    def _content_required(cls, content: Any, info: ValidationInfo) -> Any:
        """Only an assistant message may go without content (OpenAI's rule: one carrying tool_calls)."""
        role = info.data.get("role")
        if content is None and role is not None and role != "assistant":
            raise PydanticCustomError(
                "missing", "a {role} message needs content (a string or a list of text parts)", {"role": role}
            )
        return content

    def text(self) -> str:
        """The message's text, text parts joined (the only part type a text model can read)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(LenientModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDef(LenientModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(LenientModel):
    name: str


class NamedToolChoice(LenientModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(LenientModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(LenientModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching `json_schema.schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(LenientModel):
    """vLLM's `structured_outputs`: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, in llguidance's dialect
    json_object: bool | None = None


class TemplateOptions(LenientModel):
    """vLLM's extensions to rendering a conversation with the chat template (chat and /tokenize)."""

    add_generation_prompt: bool | None = Field(
        None,
        description="vLLM's extension: end the render with the assistant turn's opening (default: true, "
        "false with continue_final_message).",
    )
    continue_final_message: bool = Field(
        False,
        description="vLLM's extension: end the render inside the last message, so the reply continues it "
        "(a prefilled answer); not with add_generation_prompt: true.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="vLLM's extension: more variables for the chat template (e.g. enable_thinking); not "
        "the rendering's own arguments (tokenize, chat_template, ...).",
    )
    chat_template: str | None = Field(
        None, description="Refused: Kiln renders with the model's own chat template (the engine's)."
    )

    @field_validator("chat_template")
    @classmethod
    def _own_template(cls, template: str | None) -> str | None:
        if template is not None:
            raise PydanticCustomError(
                "unsupported",
                "a chat template sent with the request is not supported: Kiln renders with the model's own",
            )
        return template

    @field_validator("continue_final_message")
    @classmethod
    def _one_ending(cls, continues: bool, info: ValidationInfo) -> bool:
        if continues and info.data.get("add_generation_prompt"):
            raise PydanticCustomError(
                "invalid",
                "cannot continue the final message and also open a new assistant turn: send "
                "add_generation_prompt false, or leave it out",
            )
        return continues

    def template_options(self) -> dict[str, Any]:
        """The keyword arguments of `Tokenizer.apply_chat_template` these fields ask for."""
        return {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "template_kwargs": self.chat_template_kwargs,
        }


class SamplingRequest(LenientModel):
    """Fields chat and completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    truncate_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="vLLM's extension: keep only the last this many prompt tokens (chat: of the rendered "
        "conversation), dropping the start; usage counts the kept ones.",
    )
    allowed_token_ids: list[int] | None = Field(
        None, description="vLLM's extension: only these token ids may be sampled (at most 1024)."
    )
    # vLLM's: special tokens' text left out (default) or kept; the stop string or stop token kept.
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = Field(None, description="Written to the request's log line.")
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="vLLM's extension: each prompt token's logprob given the tokens before it, with this "
        "many top alternatives, in the response's `prompt_logprobs` (completions: each choice's). Not "
        "with `stream`. The prompt is computed whole (no prefix-cache hits).",
    )
    return_tokens_as_token_ids: bool = Field(
        False,
        description="vLLM's extension: logprobs name each token `token_id:<id>` instead of by its text, "
        "so tokens whose texts collide (parts of one character all read U+FFFD) stay apart.",
    )
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)  # extension: passed to the engine's scheduler
    # Extension (kiln.serve.generation.request_timeout): the request's deadline, enforced by the server.
    timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_REQUEST_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="Kiln's extension: seconds this request may take from its arrival; past them it is "
        "stopped in the engine and answered with 504 `request_timeout` (a stream: an error event, then "
        "[DONE]). The shorter of this and the X-Request-Timeout header wins; the server's "
        "--max-request-timeout-seconds caps both. (The OpenAI SDK's `timeout` argument is its own "
        "client-side limit and is not sent.)",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Structured outputs (kiln.serve.sampling.structured_output): OpenAI's, vLLM's, vLLM's older names.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid", "only allowed when stream is true")
        return options

    def log_tags(self) -> dict[str, Any]:
        """The fields that go into the request's log line and nowhere else, those that were set."""
        return {"user": self.user} if self.user is not None else {}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Every chunk of the stream carries the usage so far (`stream_options.continuous_usage_stats`)."""
        return bool(self.include_usage and self.stream_options and self.stream_options.continuous_usage_stats)


# Chat fields refused when set, and why; those in `_TAKEN` are taken at the values that ask for nothing.
_REFUSED = {
    "audio": "audio output is not supported: Kiln writes text only",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning effort is not supported: Kiln does not steer how long a model reasons",
    "verbosity": "verbosity is not supported: Kiln does not steer the length of an answer",
    "prediction": "predicted outputs are not supported",
    "store": "stored completions are not supported: Kiln keeps none",
    "service_tier": "service tier '{value}' is not supported: Kiln has one ('auto' or 'default'); "
    "its `priority` field orders requests",
}
_TAKEN = {"store": (False,), "service_tier": ("auto", "default")}
# OpenAI's bounds on `metadata`: pairs, key length, value length.
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512


def refuse_unless_taken(
    value: Any, info: ValidationInfo, refused: dict[str, str], taken: dict[str, tuple[Any, ...]]
) -> Any:
    """A validator's body: a field of `refused` set to anything but its `taken` values is refused with
    its reason (which may name the `{value}`)."""
    name = info.field_name or ""
    if value is not None and value not in taken.get(name, ()):
        raise PydanticCustomError("unsupported", refused[name], {"value": value})
    return value


def _check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > METADATA_MAX_PAIRS:
        raise PydanticCustomError("invalid", f"at most {METADATA_MAX_PAIRS} pairs")
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY:
            raise PydanticCustomError(
                "invalid",
                f"keys are at most {METADATA_MAX_KEY} characters: '{{key}}…' is longer",
                {"key": key[:METADATA_MAX_KEY]},
            )
        if len(value) > METADATA_MAX_VALUE:
            raise PydanticCustomError(
                "invalid",
                f"values are at most {METADATA_MAX_VALUE} characters: the value of '{{key}}' is longer",
                {"key": key},
            )
    return metadata


# `metadata` within OpenAI's bounds (chat's and the Responses API's): pairs, key and value lengths.
Metadata = Annotated[dict[str, str], AfterValidator(_check_metadata)]


class ChatCompletionRequest(SamplingRequest, TemplateOptions):
    # Shown in /openapi.json (and sent first by schemathesis): a plain request and a streamed one.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
                {
                    "messages": [{"role": "user", "content": "Count to three."}],
                    "max_tokens": 8,
                    "logprobs": True,
                    "top_logprobs": 2,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    echo: bool = Field(
        False,
        description="vLLM's extension: when the last message is the assistant's, the reply's content starts "
        "with it (with continue_final_message: the whole message, prefill and continuation).",
    )
    max_completion_tokens: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    # A boolean here (strictly: `0` is a 400 naming it); completions' `logprobs` is a count.
    logprobs: bool = False
    top_logprobs: int | None = None
    # OpenAI's, taken only where they ask for nothing beyond text (see the module's rules).
    modalities: list[Literal["text", "audio"]] | None = Field(
        None, description='Only ["text"]: Kiln does not speak.'
    )
    audio: dict[str, Any] | None = Field(None, description="Refused: Kiln does not speak.")
    web_search_options: dict[str, Any] | None = Field(None, description="Refused: Kiln does not search.")
    reasoning_effort: str | None = Field(None, description="Refused: Kiln does not steer reasoning.")
    verbosity: str | None = Field(None, description="Refused: Kiln does not steer an answer's length.")
    prediction: dict[str, Any] | None = Field(None, description="Refused: no predicted outputs.")
    store: bool = Field(False, description="Only false: Kiln keeps no completions.")
    service_tier: str | None = Field(
        None, description='Only "auto" or "default"; `priority` orders requests.'
    )
    metadata: Metadata | None = Field(
        None,
        description=f"Up to {METADATA_MAX_PAIRS} string pairs (keys of at most {METADATA_MAX_KEY} characters, "
        f"values of at most {METADATA_MAX_VALUE}), written to the request's log line.",
    )

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, modalities: list[str] | None) -> list[str] | None:
        if modalities is not None and "audio" in modalities:
            raise PydanticCustomError("unsupported", _REFUSED["audio"])
        return modalities

    @field_validator(*_REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_taken(value, info, _REFUSED, _TAKEN)

    def log_tags(self) -> dict[str, Any]:
        tags = super().log_tags()
        if self.metadata:
            tags["metadata"] = self.metadata
        return tags


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 2},
                {"prompt": ["Once upon a time", "The end"], "max_tokens": 8, "n": 2, "stream": True},
            ]
        }
    )

    # a string, a batch of strings, one tokenized prompt, or a batch of tokenized prompts
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    # OpenAI's, taken only where they change nothing (see the module's rules).
    suffix: str | None = Field(None, description="Only empty: Kiln does not insert text.")
    best_of: int | None = Field(None, description="Only equal to n: Kiln returns every sample it draws.")

    @field_validator("suffix")
    @classmethod
    def _no_insertion(cls, suffix: str | None) -> str | None:
        if suffix:
            raise PydanticCustomError("unsupported", "insertion (a non-empty suffix) is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of < n:
            raise PydanticCustomError("invalid", "must be at least n ({n})", {"n": n})
        if best_of is not None and best_of > n:
            raise PydanticCustomError(
                "unsupported",
                "more samples than n (keeping the best) is not supported: ask for n choices",
            )
        return best_of


# ---------------------------------------------------------------------------------------------------
# responses


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class PromptTokenLogprob(BaseModel):
    """vLLM's entry of a prompt position, keyed by token id: the prompt's token and the top alternatives."""

    logprob: float
    rank: int
    decoded_token: str


# One entry per prompt token; the first has no context to score it (null).
PromptLogprobsOut = list[dict[str, PromptTokenLogprob] | None]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # vLLM's (and DeepSeek's): the thinking that came before the answer, with --reasoning-parser.
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # extension (as vLLM): the stop string or token that ended it


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None  # `<model>/<version>` when serving from a model repository
    usage: Usage
    prompt_logprobs: PromptLogprobsOut | None = Field(None, exclude_if=lambda v: v is None)


class ChatDelta(BaseModel):
    # Unset fields are left out, as OpenAI sends them: the finish chunk's delta is `{}`.
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)  # --reasoning-parser
    # One call's piece: {index, id, type, function: {name, arguments}} first, then argument fragments.
    tool_calls: list[dict[str, Any]] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None  # `<model>/<version>` when serving from a model repository
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobsOut | None = Field(None, exclude_if=lambda v: v is None)


class CompletionResponse(BaseModel):
    """Also the stream's chunk shape (OpenAI uses `text_completion` for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None  # `<model>/<version>` when serving from a model repository
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "kiln"
    max_model_len: int
    backend: str
    tool_call_format: str | None = None  # extension: how the model writes tool calls (hermes, llama3_json)
    reasoning_parser: str | None = None  # extension: how its reasoning is read apart (--reasoning-parser)
    # extension: the model's defaults of the sampling fields a request omits (--generation-config auto)
    sampling_defaults: dict[str, float | int] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    """/health's body: "ok" (200) while the process can serve or recover, "failed" (503) once the
    engine is down for good."""

    status: Literal["ok", "failed"]
    error: str | None = None  # with "failed": why


class ReadyStatus(BaseModel):
    """/ready's body: "ready" (200), or why the server takes no work now (503)."""

    status: Literal["ready", "loading", "restarting", "draining", "failed"]
    error: str | None = None  # with "restarting" and "failed": why


class ErrorBody(BaseModel):
    # `param` and `code` are always sent (null when they do not apply): required in the schema too.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()
