"""`GenerationService`: the `kiln.v1.Generation` servicer, each call one in-process REST request.

Rules:
- A call runs the REST request its message maps to (kiln.serve.grpc.convert) through the app
  (kiln.serve.grpc.rest_call): same validation, defaults, admission, errors, usage and metrics. The
  `authorization` and `x-request-id` metadata go along as the headers of the same names, so API keys
  (`Authorization: Bearer <key>`) and request ids work as over HTTP.
- Each streamed REST chunk is one response message; usage comes last, in a message with no choices.
- However the call ends — finished, failed, cancelled by the client, or past its deadline (grpc.aio
  cancels the handler then) — the REST request is ended as a disconnected client's is, so the engine
  request is aborted and its KV blocks freed.
- The client's deadline (`context.time_remaining()`, less `DEADLINE_MARGIN_SECONDS`) becomes the REST
  request's X-Request-Timeout: the engine request is stopped at it, counted as a `timeout`, and the call
  ends with DEADLINE_EXCEEDED and REST's message. (Past the longest X-Request-Timeout, a day, gRPC's own
  cancellation at the deadline ends it, as above.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from starlette.types import ASGIApp

from kiln.serve.generation import TIMEOUT_HEADER
from kiln.serve.grpc import kiln_pb2 as pb
from kiln.serve.grpc import kiln_pb2_grpc as pb_grpc
from kiln.serve.grpc.convert import (
    ConversionError,
    chat_body,
    chat_response,
    completion_body,
    completion_response,
    error_metadata,
    error_status,
)
from kiln.serve.grpc.rest_call import RestCall
from kiln.serve.protocol import MAX_REQUEST_TIMEOUT_SECONDS

_FORWARDED = ("authorization", "x-request-id")  # metadata passed on as the REST request's headers
DEADLINE_MARGIN_SECONDS = 0.05  # the REST deadline comes this much before the client's (at most 1/10 of it)


def _peer(context: grpc.aio.ServicerContext) -> tuple[str, int] | None:
    """The client's address from gRPC's peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`)."""
    kind, _, address = (context.peer() or "").partition(":")
    host, _, port = address.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def Chat(  # the rpc's name in kiln.proto
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatResponse]:
        async for chunk in self._run("/v1/chat/completions", chat_body, request, context):
            yield chat_response(chunk)

    async def Complete(  # the rpc's name in kiln.proto
        self, request: pb.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CompletionResponse]:
        async for chunk in self._run("/v1/completions", completion_body, request, context):
            yield completion_response(chunk)

    async def _run(
        self,
        path: str,
        to_body: Callable[[Any], dict[str, Any]],
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[dict[str, Any]]:
        """The REST chunks of `request`, or the call aborted with the REST error's status."""
        try:
            body = to_body(request)
        except ConversionError as exc:
            context.set_trailing_metadata((("kiln-error-param", exc.param),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        headers = {key: value for key, value in context.invocation_metadata() or () if key in _FORWARDED}
        remaining = context.time_remaining()
        if remaining is not None and remaining <= MAX_REQUEST_TIMEOUT_SECONDS:
            # The REST request's own deadline, a little before the client's so that its answer (the
            # REST message, counted as a timeout) reaches the client before the client gives up.
            seconds = remaining - min(DEADLINE_MARGIN_SECONDS, remaining / 10)
            headers[TIMEOUT_HEADER.lower()] = f"{max(seconds, 0.001):.3f}"
        call = RestCall(self.app, path, body, headers, client=_peer(context))
        try:
            status, response_headers = await call.response()
            if status != 200:
                text = "".join([event async for event in call.events()])
                await _abort(context, _error_of(text), status, response_headers)
            async for event in call.events():
                data = json.loads(event)
                if "error" in data:  # an error after the stream began (deadline, engine down, drain)
                    await _abort(context, data["error"], None, response_headers)
                yield data
            if not call.complete:
                await context.abort(grpc.StatusCode.INTERNAL, "the response ended before it was complete")
        finally:
            await call.close()  # a cancelled call (client gone, deadline) ends as a disconnected client's


def _error_of(text: str) -> dict[str, Any]:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return {"message": text or "no response", "type": "server_error"}
    return error if isinstance(error, dict) else {"message": str(error)}


async def _abort(
    context: grpc.aio.ServicerContext, error: dict[str, Any], status: int | None, headers: dict[str, str]
) -> None:
    context.set_trailing_metadata(error_metadata(error, headers))
    await context.abort(error_status(error, status), error.get("message", ""))
