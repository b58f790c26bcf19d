"""Every error the server returns, as OpenAI error JSON: `{"error": {"message", "type", "param", "code"}}`.

Rules:
- Handlers raise an `APIError` subclass; this module is the only place that turns exceptions into
  responses (`install_error_handlers`).
- Validation errors (pydantic's, or the engine's `RequestValidationError`) are 400 with `param` set
  to the offending field (pydantic's dotted path, the error's `field`); malformed JSON is 400 with code
  `invalid_json`.
- Anything unexpected is 500 with the request id in the message and no stack trace for the client
  (the trace goes to the server log).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from kiln.serve.protocol import ErrorBody, ErrorResponse
from kiln.serve.request_log import log_rejection

logger = logging.getLogger("kiln.serve")


class APIError(Exception):
    """An error the client is meant to see."""

    status_code = 400
    error_type = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.error_type, param=self.param, code=self.code)
        )


class InvalidRequestError(APIError):
    status_code = 400
    default_code = "invalid_value"


class AuthenticationError(APIError):
    status_code = 401
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    default_code = "not_found"


class PayloadTooLargeError(APIError):
    status_code = 413
    default_code = "body_too_large"


class OverloadedError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class UnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable"


class RequestTimeoutError(APIError):
    """The request ran past its deadline (kiln.serve.generation). 504, not 408: 408 says the server gave
    up waiting for the client's request (Kiln sends it for a slow request head), while here the server
    itself ran out of time, as a gateway's DEADLINE_EXCEEDED is 504. `x-should-retry: false` keeps the
    OpenAI SDKs, which retry a 5xx, from spending the deadline again on an automatic retry."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"x-should-retry": "false"})


class InternalError(APIError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "unknown"


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body().to_dict(), status_code=error.status_code, headers=error.headers)


def _logged_response(request: Request, error: APIError) -> JSONResponse:
    log_rejection(
        http_request_id=request_id_of(request),
        method=request.method,
        path=request.url.path,
        status=error.status_code,
        code=error.code,
    )
    return error_response(error)


# Union members show up in pydantic's error location as type names ("str", "list[int]", ...) or as
# their tags (named with a colon, "item:message"); they say which alternative failed, not where in the
# request, so `param` leaves them out.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_path(loc: tuple[int | str, ...]) -> str | None:
    parts = [
        str(p) for p in loc[1:] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or ":" in p))
    ]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError, content_type: str = "application/json") -> APIError:
    """The 400 for a request FastAPI could not validate; `content_type` is the request's header."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return InvalidRequestError(f"malformed JSON body: {detail}".rstrip(": "), code="invalid_json")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and first.get("type") == "model_attributes_type":
        # FastAPI reads a body as JSON only when the header says so: curl's `-d` alone sends a form.
        if "json" not in content_type.lower():
            sent = (
                f"this one was sent as {content_type!r}" if content_type else "this one had no Content-Type"
            )
            message = f"the request body must be JSON sent with Content-Type: application/json ({sent})"
        else:
            message = "the request body must be a JSON object"
        return InvalidRequestError(message, code="invalid_json")
    param = _param_path(loc)
    if first.get("type") == "missing" and param is None:
        return InvalidRequestError("request body is required (JSON object)", code="invalid_json")
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return InvalidRequestError(message, param=param, code="invalid_value")


def _flat_routes(routes: list[Any]) -> Iterator[Any]:
    """The routes, an included router's (FastAPI keeps it whole, as `original_router`) in its place."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat_routes(inner.routes)
        else:
            yield route


def _allowed_methods(request: Request) -> str:
    """The methods of every route whose path matches the request's, as an `Allow` header value."""
    methods: dict[str, None] = {}  # in the routes' order, as /openapi.json lists them
    for route in _flat_routes(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= dict.fromkeys(sorted(getattr(route, "methods", None) or ()))
    return ", ".join(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise to OpenAI error JSON."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return _logged_response(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _logged_response(request, validation_error(exc, request.headers.get("content-type", "")))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's own errors: unknown route (404), wrong method (405), body over the limit (413).
        # Its headers are kept; a 405's `Allow` lists the methods of every route on the path (RFC 9110),
        # where Starlette's names only the first route's (GET and DELETE /v1/responses/{id} are two).
        assert isinstance(exc, StarletteHTTPException)
        message, headers = str(exc.detail), exc.headers
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
            headers = {**(exc.headers or {}), "Allow": allowed}
            message = f"method {request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code)
        error = APIError(message, code=code, status_code=exc.status_code, headers=headers)
        return _logged_response(request, error)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        logger.error("request %s failed", request_id, exc_info=exc)
        return _logged_response(
            request, InternalError(f"internal server error (request id {request_id}); see the server log")
        )

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
