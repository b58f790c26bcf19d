"""What the chat and completions handlers share: how a request starts and how it is answered.

Rules:
- `begin_request` runs first in a handler, before any of the request's own work: the deadline counts
  from its start; a draining server (503) or a wrong model (404) is answered before the prompt is
  tokenized; unknown fields are logged once (`log_unknown_fields`).
- `answer` submits the generation at once (`Generation.start`), then streams it as SSE, or collects
  it and answers with JSON; a client gone before the collection ends gets 499 and frees the request
  (`cancel_on_disconnect`). Either way the generation is closed exactly once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request, Response
from pydantic import BaseModel

from kiln.serve.generation import Deadline, Generation, new_completion_id, request_deadline
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest
from kiln.serve.responses_protocol import ResponsesRequest
from kiln.serve.sampling import log_unknown_fields
from kiln.serve.sse import ClientDisconnected, cancel_on_disconnect, sse_response
from kiln.serve.state import ServerState, server_state


@dataclass(slots=True)
class RequestStart:
    """A request's server, ids and deadline, fixed when its handler began."""

    state: ServerState
    http_request_id: str  # the X-Request-Id the middleware gave the HTTP request (logs, SSE)
    request_id: str  # the response's id, also the engine request id
    deadline: Deadline | None


def begin_request(
    body: ChatCompletionRequest | CompletionRequest | ResponsesRequest,
    request: Request,
    timeout_header: float | None,
    id_prefix: str,
) -> RequestStart:
    """Start a generation request, its id `id_prefix` and hex digits (module rules)."""
    started = time.monotonic()
    state = server_state(request)
    http_request_id = request.state.request_id
    request_id = new_completion_id(id_prefix)
    state.admission.check_accepting()
    state.check_model(body.model)
    log_unknown_fields(body, http_request_id)
    deadline = request_deadline(started, body.timeout, timeout_header, state.settings)
    return RequestStart(state, http_request_id, request_id, deadline)


async def answer(
    start: RequestStart,
    request: Request,
    generation: Generation,
    *,
    stream: Callable[[], AsyncIterator[str]] | Callable[[], AsyncIterator[tuple[str, str]]] | None,
    collect: Callable[[], Awaitable[BaseModel]],
    done_event: bool = True,
) -> Response:
    """Start `generation`, then answer with `stream()`'s chunks as SSE when given, else with the JSON
    of `collect()` (module rules). `done_event`: the stream ends with `data: [DONE]` (kiln.serve.sse)."""
    generation.start()  # the engine gets the request now, not when the response first reads
    if stream is not None:
        return sse_response(
            stream(),
            settings=start.state.settings,
            request_id=start.http_request_id,
            on_close=generation.aclose,
            done_event=done_event,
        )
    try:
        result = await cancel_on_disconnect(request, collect())
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await generation.aclose()  # also when the collection never ran: the handler was cancelled first
    return Response(result.model_dump_json(), media_type="application/json")
