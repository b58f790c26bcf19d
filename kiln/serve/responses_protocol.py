"""OpenAI's Responses API on the wire (`/v1/responses`): the request, validated, and the response.

Rules (kiln.serve.protocol's hold here too: unknown fields are logged and ignored, known ones strictly
typed, and a field that asks for what Kiln cannot do is declared and refused with a 400 naming it):
- Input is text: a string, or items: messages (content a string or text parts: input_text,
  output_text, refusal), function_call, function_call_output and reasoning (taken and left out of the
  prompt, as chat templates drop past reasoning). Image, file and audio parts and every other item
  type (item_reference, hosted tools' calls) are refused by their type.
- Tools are functions (`{"type": "function", "name", "parameters", ...}`); a hosted tool (web search,
  file search, MCP, ...) is refused by its type, and so is a tool_choice naming one.
- `include` takes OpenAI's values: "message.output_text.logprobs" puts logprobs (with `top_logprobs`
  alternatives) on the output text; the others ask for parts of items Kiln never makes (hosted tools'
  results, input images, encrypted reasoning) and add nothing. An unknown value is a 400.
- `max_tool_calls` bounds calls to hosted tools, of which Kiln makes none: taken, and it changes nothing.
- Refused when set: conversation, prompt (stored prompt templates), reasoning effort or
  summary, text.verbosity, service tiers but auto/default, obfuscated streams.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from kiln.serve.protocol import (
    MAX_REQUEST_TIMEOUT_SECONDS,
    METADATA_MAX_PAIRS,
    ChatTokenLogprob,
    FunctionDef,
    JsonSchemaFormat,
    LenientModel,
    Metadata,
    refuse_unless_taken,
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# OpenAI's `include` values; all but LOGPROBS_INCLUDE name parts of items Kiln never makes.
INCLUDABLE = (
    LOGPROBS_INCLUDE,
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
)

# ---------------------------------------------------------------------------------------------------
# input


class InputText(LenientModel):
    """A text part: the user's (`input_text`) or an earlier reply's (`output_text`)."""

    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(LenientModel):
    type: Literal["refusal"]
    refusal: str


TextContent = Annotated[InputText | RefusalPart, Field(discriminator="type")]


def _text_parts_only(content: Any) -> Any:
    """An image, file or audio part is refused by its type, not as "not a valid string"."""
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in ("input_text", "output_text", "refusal"):
                raise PydanticCustomError(
                    "unsupported",
                    "content parts of type '{kind}' are not supported: Kiln's models read text only",
                    {"kind": kind},
                )
    return content


def content_text(content: str | list[InputText | RefusalPart]) -> str:
    """A message's (or a tool output's) text, its parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p.text if isinstance(p, InputText) else p.refusal for p in content)


class MessageItem(LenientModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextContent]
    id: str | None = None
    status: str | None = None

    _parts = field_validator("content", mode="before")(_text_parts_only)


class FunctionCallItem(LenientModel):
    """A call the model made earlier (an output item sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(LenientModel):
    """The caller's result of a function call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextContent]
    id: str | None = None
    status: str | None = None

    _parts = field_validator("output", mode="before")(_text_parts_only)


class ReasoningInputItem(LenientModel):
    """An earlier output's reasoning sent back: taken, and left out of the prompt (chat templates drop
    past reasoning)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class _UnsupportedItem(LenientModel):
    """Any other item: refused by its type (left out of the schema, which lists what is taken)."""

    type: Any = None

    @model_validator(mode="after")
    def _refuse(self) -> _UnsupportedItem:
        if not isinstance(self.type, str):
            raise PydanticCustomError("invalid", "an input item is a message (with a role) or names its type")
        raise PydanticCustomError(
            "unsupported",
            "input items of type '{kind}' are not supported: Kiln reads messages, function_call, "
            "function_call_output and reasoning items",
            {"kind": self.type},
        )


_ITEM_TAGS = {
    "message": "item:message",
    "function_call": "item:call",
    "function_call_output": "item:output",
    "reasoning": "item:reasoning",
}


def _item_tag(item: Any) -> str:
    """The union member of an input item (the tags hold a colon: errors leave them out of `param`)."""
    if isinstance(item, dict):
        kind = item.get("type", "message" if "role" in item else None)
    else:
        kind = getattr(item, "type", None)
    return _ITEM_TAGS.get(kind, "item:other") if isinstance(kind, str) else "item:other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("item:message")]
    | Annotated[FunctionCallItem, Tag("item:call")]
    | Annotated[FunctionCallOutputItem, Tag("item:output")]
    | Annotated[ReasoningInputItem, Tag("item:reasoning")]
    | Annotated[SkipJsonSchema[_UnsupportedItem], Tag("item:other")],
    Discriminator(_item_tag),
]


def _function_type(data: Any, refusal: str) -> Any:
    """A before-validator's body: an object of another type than "function" is refused by its type
    (hosted tools), not by the fields it lacks."""
    kind = data.get("type") if isinstance(data, dict) else None
    if isinstance(kind, str) and kind != "function":
        raise PydanticCustomError("unsupported", refusal, {"kind": kind})
    return data


class FunctionTool(FunctionDef):
    """A function the model may call: chat's `function` object, flattened, with its type."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data: Any) -> Any:
        return _function_type(
            data, "tools of type '{kind}' are not supported: Kiln calls only the functions a request defines"
        )


class FunctionChoice(LenientModel):
    type: Literal["function"]
    name: str

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data: Any) -> Any:
        return _function_type(data, "tool_choice of type '{kind}' is not supported: name a function")


class TextFormat(JsonSchemaFormat):
    """`text.format`: chat's `response_format`, its json_schema's fields beside the type."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _schema_named(self) -> TextFormat:
        if self.type == "json_schema" and self.name is None:
            raise PydanticCustomError("missing", "a json_schema format needs its name")
        return self


class TextConfig(LenientModel):
    format: TextFormat | None = None
    verbosity: str | None = Field(None, description="Refused: Kiln does not steer an answer's length.")

    @field_validator("verbosity")
    @classmethod
    def _no_verbosity(cls, verbosity: str | None) -> str | None:
        if verbosity is not None:
            raise PydanticCustomError("unsupported", "verbosity is not supported: Kiln does not steer it")
        return verbosity


class ReasoningConfig(LenientModel):
    """Taken only as asking for nothing: Kiln's models do not reason apart (effort "none" says so)."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None

    @model_validator(mode="after")
    def _no_reasoning(self) -> ReasoningConfig:
        for name in ("effort", "summary", "generate_summary"):
            if getattr(self, name) not in (None, "none" if name == "effort" else None):
                raise PydanticCustomError(
                    "unsupported",
                    "reasoning {name} is not supported: Kiln does not steer reasoning",
                    {"name": name},
                )
        return self


class ResponsesStreamOptions(LenientModel):
    include_obfuscation: bool = Field(False, description="Only false: Kiln does not pad its deltas.")

    @field_validator("include_obfuscation")
    @classmethod
    def _plain(cls, obfuscated: bool) -> bool:
        if obfuscated:
            raise PydanticCustomError("unsupported", "obfuscated streams are not supported")
        return obfuscated


# Fields refused when set to anything but the value that asks for nothing, and why.
_REFUSED = {
    "conversation": "conversations are not supported: chain responses with previous_response_id",
    "prompt": "stored prompt templates are not supported: send the input",
    "service_tier": "service tier '{value}' is not supported: Kiln has one ('auto' or 'default'); "
    "its `priority` field orders requests",
}
_TAKEN: dict[str, tuple[Any, ...]] = {
    "service_tier": ("auto", "default"),
}


class ResponsesRequest(LenientModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"input": "Say hello.", "max_output_tokens": 8},
                {
                    "instructions": "Answer briefly.",
                    "input": [{"role": "user", "content": "Count to three."}],
                    "max_output_tokens": 8,
                    "stream": True,
                },
            ]
        }
    )

    model: str | None = None
    input: Annotated[
        Annotated[str, Tag("str")] | Annotated[list[InputItem], Tag("list")],
        Discriminator(lambda v: "str" if isinstance(v, str) else "list"),
    ]
    instructions: str | None = Field(None, description="A system message before the input (not carried on).")
    previous_response_id: str | None = Field(
        None, description="Continue a stored response: its conversation comes before this input."
    )
    store: bool | None = Field(
        None,
        description="Keep the response for GET and previous_response_id (default: when the server keeps any).",
    )
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = Field(None, ge=1, description="Bounds hosted tools' calls: Kiln makes none.")
    text: TextConfig | None = None
    metadata: Metadata | None = Field(
        None, description=f"Up to {METADATA_MAX_PAIRS} string pairs, as on chat; written to the log line."
    )
    user: str | None = Field(None, description="Written to the request's log line.")
    safety_identifier: str | None = Field(None, description="Written to the request's log line.")
    prompt_cache_key: str | None = Field(
        None, description="Taken: Kiln's prefix cache finds shared prompt starts on its own."
    )
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    reasoning: ReasoningConfig | None = None
    background: bool = Field(
        False,
        description="Made by the server on its own: the POST answers at once (status queued), GET and "
        "cancel follow it; needs store.",
    )
    conversation: str | dict[str, Any] | None = Field(None, description="Refused: use previous_response_id.")
    prompt: dict[str, Any] | None = Field(None, description="Refused: no stored prompt templates.")
    truncation: Literal["auto", "disabled"] = Field(
        "disabled",
        description='"auto": when the conversation does not fit the context, its oldest turns are left '
        'out (it then starts at a user message); "disabled": it is a 400.',
    )
    service_tier: str | None = Field(
        None, description='Only "auto" or "default"; `priority` orders requests.'
    )
    # vLLM's and Kiln's extensions, as on chat completions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_REQUEST_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="Kiln's extension: seconds this request may take from its arrival (as on chat).",
    )

    @field_validator(*_REFUSED)
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_taken(value, info, _REFUSED, _TAKEN)

    @field_validator("include")
    @classmethod
    def _known_includes(cls, include: list[str] | None) -> list[str] | None:
        for value in include or ():
            if value not in INCLUDABLE:
                raise PydanticCustomError(
                    "invalid",
                    "unknown include '{value}'; known: {known}",
                    {"value": value, "known": ", ".join(INCLUDABLE)},
                )
        return include

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def log_tags(self) -> dict[str, Any]:
        """The fields that go into the request's log line and nowhere else, those that were set."""
        tags = {name: getattr(self, name) for name in ("user", "safety_identifier", "metadata")}
        return {name: value for name, value in tags.items() if value}


# ---------------------------------------------------------------------------------------------------
# response


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatTokenLogprob] | None = Field(None, exclude_if=lambda v: v is None)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionToolCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOutput(BaseModel):
    """The model's thinking before its answer (with --reasoning-parser)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[OutputMessage | FunctionToolCall | ReasoningOutput, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str | None
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ReasoningOut(BaseModel):
    effort: None = None
    summary: None = None


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    error: ResponseError | None = None  # "failed" (a background response's; others answer an error)
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningOut = Field(default_factory=ReasoningOut)
    store: bool
    temperature: float
    top_p: float
    top_logprobs: int
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: Literal["auto", "disabled"]
    background: bool
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    system_fingerprint: str | None = Field(None, exclude_if=lambda v: v is None)  # Kiln's, as on chat


class InputItemList(BaseModel):
    """`GET /v1/responses/{id}/input_items`: a page of the input items a response was made from."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class StreamEvent(BaseModel):
    """One event of a streamed response (its fields beside these depend on `type`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int
