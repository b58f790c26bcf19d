"""ASGI middleware: a request id on every request, HTTP status metrics, and the body size limit.

The id comes from the client's `X-Request-Id` header when it sends one (so logs line up across
services), else a fresh one; it is echoed in the response's `X-Request-Id` and used in error
messages and the request log.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.serve.errors import PayloadTooLargeError, error_response
from kiln.serve.metrics import ServerMetrics

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Request-Id", request_id)
                self.metrics.observe_http(_route_of(scope), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # ServerErrorMiddleware (outside this one) answers the 500; count it here.
            self.metrics.observe_http(_route_of(scope), 500)
            raise


def _route_of(scope: Scope) -> str:
    # The matched route's template keeps label cardinality bounded; unmatched paths share one label.
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class BodyTooLarge(HTTPException):
    # An HTTPException because FastAPI re-raises those from a body read as they are (anything else
    # becomes a generic 400); the error handlers turn it into OpenAI JSON.
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            error = PayloadTooLargeError(BodyTooLarge(self.max_bytes).detail)
            await error_response(error)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
