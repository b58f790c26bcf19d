"""The OpenAPI document (`/openapi.json`), generated from the code and true to what the server sends.

Rules:
- Every error is OpenAI error JSON (`ErrorResponse`), whatever the status. FastAPI's default 422 is
  never sent (validation errors are 400, kiln.serve.errors), so `finish_openapi` removes it.
- A route's own statuses are declared where it is registered (kiln.serve.app), with the `responses=`
  built here (`Responses`, and `key_responses` for the routes behind the API key).
- `finish_openapi` adds what every route shares: 500 (anything unexpected), 408 and 431 (a request head
  too slow or too large, kiln.serve.http_limits), 413 on routes that take a body (BodyLimitMiddleware),
  and the bearer scheme on the routes that document a 401.
- The completion routes' 200 has two media types: `application/json`, and `text/event-stream` for
  `"stream": true`. Before OpenAPI 3.2's `itemSchema`, an event stream's `schema` describes one event
  (as schemathesis reads it): a `data` field holding a chunk's JSON, an error's JSON (an error after
  the stream started, kiln.serve.sse), or the closing `[DONE]`.
- Request bodies are documented by the pydantic models that validate them (kiln.serve.protocol);
  value ranges are checked after that (`SamplingParams.validate`) and are 400s, not schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kiln.serve.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    HealthStatus,
    ReadyStatus,
)
from kiln.serve.responses_protocol import ResponseObject, StreamEvent
from kiln.serve.settings import ServerSettings

REF = "#/components/schemas/"

# What each error status means on this server (the `code` field tells the cases apart).
ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field's type or value (`param` names it), malformed JSON, or a prompt and "
    "max_tokens that do not fit the context (`context_length_exceeded`).",
    401: "Missing or unknown API key (`Authorization: Bearer <key>`).",
    404: "The model named in the request is not served here (`model_not_found`), or the stored response "
    "named is not kept (`not_found`, `previous_response_not_found`).",
    408: "The request head did not arrive within the server's header timeout (`timeout`).",
    413: "The request body is larger than the server's limit (`body_too_large`).",
    429: "Too many requests or tokens waiting (`queue_full`); retry after `Retry-After` seconds.",
    431: "The request head is larger than the server's limit (`header_too_large`).",
    500: "Unexpected server error; the message carries the request id to find it in the server log.",
    503: "The server takes no work now: the model is loading (`not_ready`), the engine is restarting "
    "(`engine_down`) or failed (`engine_failed`), the server is shutting down (`draining`), or every "
    "connection is busy (`too_many_connections`).",
    504: "The request ran past its deadline (`request_timeout`): its `timeout` field, its X-Request-Timeout "
    "header, or the server's --request-timeout-seconds / --max-request-timeout-seconds. It was stopped "
    "in the engine and what it had generated is dropped.",
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}

_NO_RETRY = {
    "x-should-retry": {
        "description": "`false`: the OpenAI SDKs do not retry this on their own (it used its whole deadline).",
        "required": True,
        "schema": {"type": "string", "const": "false"},
    }
}

# Models the documents reference but no route returns as a whole (one event's data of a chat stream;
# a completions stream's chunks are `CompletionResponse`, which the route's JSON 200 brings along).
_STREAM_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, StreamEvent)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries: each status with OpenAI error JSON."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses
    }


def key_responses(settings: ServerSettings, guarded: bool = True) -> dict[int | str, dict[str, Any]]:
    """A 401 for a route behind `require_api_key` (`guarded`) when the server has keys; else none."""
    return error_responses(401) if guarded and settings.api_keys else {}


def _event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    data_json = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": REF + chunk.__name__}, {"$ref": REF + "ErrorResponse"}]},
    }
    return {
        "type": "object",
        "description": f"One server-sent event: `data: <JSON>` with a {chunk.__name__} (or, for an error "
        "after the stream started, an ErrorResponse); the stream ends with `data: [DONE]`.",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data_json]}},
    }


def _named_event_schema() -> dict[str, Any]:
    data_json = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"$ref": REF + "StreamEvent"},
    }
    return {
        "type": "object",
        "description": "One server-sent event: `event: <type>` and `data: <JSON>` with a StreamEvent of "
        "that type (an error after the stream started is an event of type `error`); no `[DONE]`.",
        "required": ["event", "data"],
        "properties": {"event": {"type": "string"}, "data": data_json},
    }


def completion_responses(
    response: type[BaseModel], chunk: type[BaseModel] | None
) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a completion route: the JSON response, or an event stream of `chunk`s with
    `"stream": true` (None: of named events, as the Responses API streams), and the errors a completion
    can get."""
    stream = _event_schema(chunk) if chunk is not None else _named_event_schema()
    ok = {
        "model": response,
        "description": 'The completion (`application/json`), or with `"stream": true` its chunks as '
        "server-sent events (`text/event-stream`).",
        "content": {"text/event-stream": {"schema": stream}},
    }
    timeout = {**error_responses(504)[504], "headers": _NO_RETRY}
    return {200: ok, **error_responses(400, 404, 429, 503), 504: timeout}


def ok_responses(
    model: type[BaseModel], description: str, *errors: int, events: bool = False
) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that answers `model` as JSON (or, `events`, named server-sent events), or
    one of `errors`."""
    ok: dict[str, Any] = {"model": model, "description": description}
    if events:
        ok["content"] = {"text/event-stream": {"schema": _named_event_schema()}}
    return {200: ok, **error_responses(*errors)}


def probe_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`responses=` of /health and /ready: the same body with 200 and 503."""
    return {
        200: {"model": model, "description": "Up (liveness) or ready (readiness)."},
        503: {"model": model, "description": "Down for good (liveness) or taking no work now (readiness)."},
    }


class Responses:
    """Each route's `responses=` (its 200 when the handler returns a plain Response, and its errors)."""

    chat = completion_responses(ChatCompletionResponse, ChatCompletionChunk)
    completions = completion_responses(CompletionResponse, CompletionResponse)
    responses = completion_responses(ResponseObject, None)
    stored_response = ok_responses(
        ResponseObject,
        "The stored response (a running background one as it stands), or with `stream=true` a "
        "background response's events.",
        400,
        404,
        events=True,
    )
    cancel_response = ok_responses(ResponseObject, "The cancelled background response.", 400, 404)
    deleted_response = error_responses(404)
    input_items = error_responses(400, 404)
    models = error_responses(503)  # 503: the model is still loading
    model = error_responses(404, 503)
    health = probe_responses(HealthStatus)
    ready = probe_responses(ReadyStatus)
    version = error_responses(503)


def _operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return [op for item in doc.get("paths", {}).values() for m, op in item.items() if m in methods]


def finish_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """Make FastAPI's document true to this server (in place; returns `doc`)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    error = error_responses(408, 413, 431, 500)
    for op in _operations(doc):
        responses = op.setdefault("responses", {})
        responses.pop("422", None)
        statuses = [500, 408, 431, 413] if "requestBody" in op else [500, 408, 431]
        for status in statuses:
            responses.setdefault(
                str(status),
                {
                    "description": error[status]["description"],
                    "content": {"application/json": {"schema": {"$ref": REF + "ErrorResponse"}}},
                },
            )
        if "429" in responses:
            responses["429"].setdefault("headers", _RETRY_AFTER)
        if "401" in responses:
            op.setdefault("security", [{"apiKey": []}])
            doc["components"].setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the server's API keys (`--api-keys`).",
            }
        op["responses"] = dict(sorted(responses.items()))
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, extra = models_json_schema(
        [(model, "serialization") for model in (*_STREAM_MODELS, ErrorResponse)], ref_template=REF + "{model}"
    )
    for name, schema in extra.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    doc["components"]["schemas"] = dict(sorted(schemas.items()))
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `finish_openapi` of FastAPI's document as `app.openapi()` (and so /openapi.json)."""
    generate: Callable[[], dict[str, Any]] = app.openapi  # FastAPI's: builds once, then caches
    finished: list[dict[str, Any]] = []  # the document last finished

    def openapi() -> dict[str, Any]:
        doc = generate()
        if not finished or finished[0] is not doc:  # FastAPI builds a new one when routes change
            finished[:] = [finish_openapi(doc)]
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
