"""Stored responses: `GET` and `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, and
the input items a response keeps for the last.

Rules: a response not stored (never, deleted, or gone to make room) is a 404. Input items are listed
as OpenAI lists them: each with an id (the one it was sent with, else a new one), messages with their
text as parts, newest first unless `order=asc`, `limit` (1–100) of them after the item `after`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query, Request, Response

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
    RefusalPart,
    ResponsesRequest,
)
from kiln.serve.state import server_state


def _stored(request: Request, response_id: str) -> StoredResponse:
    stored = server_state(request).responses.get(response_id)
    if stored is None:
        raise NotFoundError(f"no response '{response_id}' is stored here", param="response_id")
    return stored


async def get_response(response_id: str, request: Request) -> Response:
    return Response(_stored(request, response_id).response.model_dump_json(), media_type="application/json")


async def delete_response(response_id: str, request: Request) -> DeletedResponse:
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
    for value in include or ():
        if value not in INCLUDABLE:
            raise InvalidRequestError(f"unknown include '{value}'", param="include")
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
