"""Translations between `kiln.v1` messages and the REST API's JSON.

Rules:
- A request becomes the REST body a JSON client would send: set fields only (proto3 `optional` fields left
  unset, empty lists and maps are left out, so the REST defaults apply; the required `messages` and
  `prompt` are sent even empty), always streamed with usage, so the REST code validates it and the gRPC
  caller gets REST's defaults and messages.
- What JSON has and protobuf spells differently is translated here, and only that: `sampling` flattened
  into the body, tool calls and tools in OpenAI's nesting, a named `tool_choice_function`, `logit_bias` keys
  as text, a prompt of one text or token list sent bare (a batch as a list, mixed or not: REST decides).
- A REST error becomes a gRPC status by its HTTP status (`STATUS_CODES`; an error event mid-stream by its
  `type`), with REST's message as the details and its `code`, `param` and Retry-After as trailing metadata.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf.message import Message

from kiln.serve.grpc import kiln_pb2 as pb

# The gRPC status of each REST status (anything else: UNKNOWN). 413 is what gRPC itself answers a
# message over its size limit with.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# An error event inside a stream carries no HTTP status, only OpenAI's error `type` (kiln.serve.errors).
TYPE_CODES = {
    "invalid_request_error": grpc.StatusCode.INVALID_ARGUMENT,
    "rate_limit_error": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "service_unavailable": grpc.StatusCode.UNAVAILABLE,
    "server_error": grpc.StatusCode.INTERNAL,
    "timeout_error": grpc.StatusCode.DEADLINE_EXCEEDED,
}


class ConversionError(ValueError):
    """A request that has no REST form (INVALID_ARGUMENT); `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def fields(message: Message) -> dict[str, Any]:
    """The fields set in `message`, as JSON values (nested messages as dicts, maps as dicts)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.is_repeated:
            out[field.name] = [fields(v) if entry is not None else v for v in value]
        elif entry is not None:
            out[field.name] = fields(value)
        else:
            out[field.name] = value
    return out


def _sampling(request: pb.ChatRequest | pb.CompletionRequest) -> dict[str, Any]:
    out = fields(request.sampling)
    if "logit_bias" in out:
        out["logit_bias"] = {str(token): bias for token, bias in out["logit_bias"].items()}
    return out


def _json_text(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{param}: not JSON text: {exc}", param) from None


def chat_body(request: pb.ChatRequest) -> dict[str, Any]:
    """The /v1/chat/completions body of `request`."""
    body = {k: v for k, v in fields(request).items() if k not in ("sampling", "tool_choice_function")}
    body |= _sampling(request)
    body["messages"] = body.get("messages", [])  # protobuf has no "left out" for a list: it is empty
    for message in body["messages"]:
        if "tool_calls" in message:
            message["tool_calls"] = [
                {
                    "id": call.get("id", ""),
                    "type": "function",
                    "function": {"name": call.get("name", ""), "arguments": call.get("arguments", "")},
                }
                for call in message["tool_calls"]
            ]
    if "tools" in body:
        tools = []
        for i, tool in enumerate(body["tools"]):
            if "parameters" in tool:
                tool["parameters"] = _json_text(tool["parameters"], f"tools.{i}.parameters")
            tools.append({"type": "function", "function": tool})
        body["tools"] = tools
    if request.HasField("tool_choice_function"):
        if request.HasField("tool_choice"):
            raise ConversionError("give tool_choice or tool_choice_function, not both", "tool_choice")
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice_function}}
    return body | {"stream": True, "stream_options": {"include_usage": True}}


def completion_body(request: pb.CompletionRequest) -> dict[str, Any]:
    """The /v1/completions body of `request`."""
    body = {k: v for k, v in fields(request).items() if k != "sampling"}
    body |= _sampling(request)
    prompts: list[Any] = [
        p["text"] if "text" in p else p.get("token_ids", {}).get("ids", []) for p in body.pop("prompt", [])
    ]
    body["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    return body | {"stream": True, "stream_options": {"include_usage": True}}


def _usage(usage: dict[str, Any] | None) -> pb.Usage | None:
    if usage is None:
        return None
    return pb.Usage(
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
    )


def _top(alternatives: list[dict[str, Any]]) -> list[pb.TopLogprob]:
    return [pb.TopLogprob(token=t["token"], logprob=t["logprob"]) for t in alternatives]


def chat_response(chunk: dict[str, Any]) -> pb.ChatResponse:
    """A `chat.completion.chunk` as a ChatResponse."""
    choices = []
    for c in chunk["choices"]:
        delta = c["delta"]
        calls = [
            pb.ToolCallDelta(
                index=call["index"],
                id=call.get("id"),
                name=call.get("function", {}).get("name"),
                arguments=call.get("function", {}).get("arguments") or "",
            )
            for call in delta.get("tool_calls") or []
        ]
        logprobs = [
            pb.TokenLogprob(token=t["token"], logprob=t["logprob"], top_logprobs=_top(t["top_logprobs"]))
            for t in (c.get("logprobs") or {}).get("content") or []
        ]
        choices.append(
            pb.ChatChoice(
                index=c["index"],
                role=delta.get("role"),
                content=delta.get("content") or "",
                reasoning_content=delta.get("reasoning_content") or "",
                tool_calls=calls,
                logprobs=logprobs,
                finish_reason=c.get("finish_reason"),
            )
        )
    return pb.ChatResponse(
        id=chunk["id"], model=chunk["model"], choices=choices, usage=_usage(chunk.get("usage"))
    )


def _completion_logprobs(logprobs: dict[str, Any] | None) -> list[pb.TokenLogprob]:
    if not logprobs:
        return []
    return [
        pb.TokenLogprob(
            token=token,
            logprob=logprob,
            top_logprobs=[pb.TopLogprob(token=t, logprob=lp) for t, lp in (top or {}).items()],
            text_offset=offset,
        )
        for token, logprob, top, offset in zip(
            logprobs["tokens"],
            logprobs["token_logprobs"],
            logprobs["top_logprobs"],
            logprobs["text_offset"],
            strict=True,
        )
    ]


def completion_response(chunk: dict[str, Any]) -> pb.CompletionResponse:
    """A `text_completion` chunk as a CompletionResponse."""
    choices = [
        pb.CompletionChoice(
            index=c["index"],
            text=c["text"],
            logprobs=_completion_logprobs(c.get("logprobs")),
            finish_reason=c.get("finish_reason"),
        )
        for c in chunk["choices"]
    ]
    return pb.CompletionResponse(
        id=chunk["id"], model=chunk["model"], choices=choices, usage=_usage(chunk.get("usage"))
    )


def error_status(error: dict[str, Any], http_status: int | None) -> grpc.StatusCode:
    """The gRPC status of a REST error (`{"message", "type", "param", "code"}`)."""
    if http_status is not None:
        return STATUS_CODES.get(http_status, grpc.StatusCode.UNKNOWN)
    return TYPE_CODES.get(error.get("type", ""), grpc.StatusCode.UNKNOWN)


def error_metadata(error: dict[str, Any], headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a REST error: its code and param, and the Retry-After it came with."""
    items = [("kiln-error-code", error.get("code")), ("kiln-error-param", error.get("param"))]
    items.append(("retry-after", headers.get("retry-after")))
    return tuple((key, str(value)) for key, value in items if value is not None)
