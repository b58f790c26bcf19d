"""Stored responses: `GET` and `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`,
`POST /v1/responses/{id}/cancel`, and the input items a response keeps for the last.

Rules:
- A response not stored (never, deleted, or gone to make room) and not running in the background is a
  404; GET of a running one, its stream and cancel follow kiln.serve.background_responses' rules.
- GET answers a response as it was made: its `include` was applied then. The query's `include` is
  checked (an unknown value is a 400) and changes nothing.
- Input items are listed as OpenAI lists them: each with an id (the one it was sent with, else a new
  one), messages with their text as parts, newest first unless `order=asc`, `limit` (1–100) of them
  after the item `after`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Query, Request, Response

from kiln.serve.background_responses import Event, replay
from kiln.serve.errors import InvalidRequestError, NotFoundError
from kiln.serve.response_output import new_item_id
from kiln.serve.response_store import StoredResponse
from kiln.serve.responses_protocol import (
    INCLUDABLE,
    DeletedResponse,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItemList,
    InputText,
    MessageItem,
    ReasoningInputItem,
    RefusalPart,
    ResponsesRequest,
)
from kiln.serve.state import server_state


def _stored(request: Request, response_id: str) -> StoredResponse:
    stored = server_state(request).responses.get(response_id)
    if stored is None:
        raise NotFoundError(f"no response '{response_id}' is stored here", param="response_id")
    return stored


async def get_response(
    response_id: str,
    request: Request,
    stream: Annotated[
        bool, Query(description="A background response's events, replayed then followed.")
    ] = False,
    starting_after: Annotated[
        int | None, Query(ge=0, description="With stream: the events after this sequence number.")
    ] = None,
    include: Annotated[
        list[str] | None, Query(description="Checked; the response is answered as it was made.")
    ] = None,
) -> Response:
    _check_include(include)
    state = server_state(request)
    if starting_after is not None and not stream:
        raise InvalidRequestError("starting_after needs stream=true", param="starting_after")
    running = state.background_runs.get(response_id)
    if running is not None:  # background, not finished
        if stream:
            return replay(running.follow(starting_after), state, request)
        return Response(running.work.snapshot("in_progress").model_dump_json(), media_type="application/json")
    stored = _stored(request, response_id)
    if stream:
        if stored.events is None:
            raise InvalidRequestError(
                "only a background response's events can be streamed again", param="stream"
            )
        return replay(_after(stored.events, starting_after), state, request)
    return Response(stored.response.model_dump_json(), media_type="application/json")


async def _after(events: tuple[Event, ...], after: int | None) -> AsyncIterator[Event]:
    for event in events[0 if after is None else after + 1 :]:
        yield event


async def cancel_response(response_id: str, request: Request) -> Response:
    """Stop a background response (kiln.serve.background_responses' rules)."""
    running = server_state(request).background_runs.get(response_id)
    if running is not None:
        await running.cancel()
    stored = _stored(request, response_id)
    if not stored.response.background:
        raise InvalidRequestError(
            "only a background response can be cancelled (this one was finished when it was answered)",
            param="response_id",
        )
    return Response(stored.response.model_dump_json(), media_type="application/json")


async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    if response_id in server_state(request).background_runs:
        raise InvalidRequestError(
            f"response '{response_id}' is still being made in the background: cancel it first",
            param="response_id",
        )
    _stored(request, response_id)
    server_state(request).responses.delete(response_id)
    return DeletedResponse(id=response_id)


async def list_input_items(
    response_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100, description="How many items, 1 to 100.")] = 20,
    order: Annotated[Literal["asc", "desc"], Query(description="asc: oldest first; desc: newest.")] = "desc",
    after: Annotated[str | None, Query(description="List the items after the one with this id.")] = None,
    include: Annotated[list[str] | None, Query(description="As POST /v1/responses takes it.")] = None,
) -> InputItemList:
    _check_include(include)
    items = list(_stored(request, response_id).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequestError(f"no input item '{after}' in response '{response_id}'", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return InputItemList(
        data=page,
        first_id=page[0]["id"] if page else None,
        last_id=page[-1]["id"] if page else None,
        has_more=len(items) > limit,
    )


def _check_include(include: list[str] | None) -> None:
    for value in include or ():
        if value not in INCLUDABLE:
            raise InvalidRequestError(f"unknown include '{value}'", param="include")


def input_items(body: ResponsesRequest) -> tuple[dict[str, Any], ...]:
    """The request's input as the items `input_items` lists (module rules)."""
    if isinstance(body.input, str):
        return (_message(None, "user", [{"type": "input_text", "text": body.input}]),)
    items: list[dict[str, Any]] = []
    for item in body.input:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            content = item.content
            parts = (
                [{"type": kind, "text": content}] if isinstance(content, str) else [_part(p) for p in content]
            )
            items.append(_message(item.id, item.role, parts))
        elif isinstance(item, FunctionCallItem):
            call = item.model_dump(include={"call_id", "name", "arguments"})
            items.append(
                {"id": item.id or new_item_id("fc_"), "type": "function_call", **call, "status": "completed"}
            )
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else [_part(p) for p in item.output]
            items.append(
                {
                    "id": item.id or new_item_id("fco_"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": output,
                    "status": "completed",
                }
            )
        elif isinstance(item, ReasoningInputItem):
            items.append({**item.model_dump(exclude_none=True), "id": item.id or new_item_id("rs_")})
    return tuple(items)


def _message(item_id: str | None, role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id or new_item_id("msg_"),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": content,
    }


def _part(part: InputText | RefusalPart) -> dict[str, Any]:
    return part.model_dump(include={"type", "text", "refusal"})
