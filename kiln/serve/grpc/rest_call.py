"""`RestCall`: one REST request run in-process through the app, as uvicorn would run it, minus the socket.

Why: a gRPC call is the REST request it maps to, run by the same code (routing, the API-key check, pydantic
validation, admission, the handler, its error handlers, metrics and the request log), so the two APIs cannot
drift apart in defaults, errors or usage.

Rules:
- `response()` waits for the response head: (status, headers). `events()` then yields the JSON text of each
  server-sent event's `data:` line until `[DONE]` (keep-alive comments skipped), or the body whole once
  when the response is not an event stream (an error); `complete` says whether the response came whole
  (a stream the app ended after a disconnect has no `[DONE]`).
- `close()` (idempotent) tells the app the client is gone (`http.disconnect`, what a dropped TCP connection
  gives), which is how REST frees the engine request (`Generation`), then waits for the app to return;
  past `close_timeout` seconds the app's task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message

_DONE = object()  # put on the queue when the app's task ends


class RestCall:
    def __init__(
        self,
        app: ASGIApp,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        *,
        client: tuple[str, int] | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        data = json.dumps(body).encode()
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": raw_headers,
            "client": client,
            "server": None,
            "state": {},
        }
        self._body: bytes | None = data
        self._gone = asyncio.Event()
        self._sent: asyncio.Queue[Any] = asyncio.Queue()
        self._close_timeout = close_timeout
        self._event_stream = False
        self.complete = False  # the whole response came: `[DONE]`, or the last part of a plain body
        self._task = asyncio.ensure_future(app(scope, self._receive, self._send))
        self._task.add_done_callback(lambda _: self._sent.put_nowait(_DONE))

    async def _receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        self._sent.put_nowait(message)

    async def _next(self) -> Message | None:
        """The app's next message; None once it returned (its exception, if any, raised)."""
        message = await self._sent.get()
        if message is _DONE:
            self._sent.put_nowait(_DONE)  # every later read sees the end too
            self._task.result()
            return None
        return message

    async def response(self) -> tuple[int, dict[str, str]]:
        while True:
            message = await self._next()
            if message is None:
                raise RuntimeError("the app returned without a response")
            if message["type"] == "http.response.start":
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]}
                self._event_stream = headers.get("content-type", "").startswith("text/event-stream")
                return message["status"], headers

    async def events(self) -> AsyncIterator[str]:
        buffer = b""
        while True:
            message = await self._next()
            if message is None:
                break
            if message["type"] != "http.response.body":
                continue
            buffer += message.get("body", b"")
            if not self._event_stream:
                if not message.get("more_body", False):
                    self.complete = True
                    yield buffer.decode()
                    return
                continue
            # One event per `data:` line; events end at a blank line (kiln.serve.sse's LF framing).
            *whole, buffer = buffer.split(b"\n\n")
            for event in whole:
                for line in event.decode().split("\n"):
                    if not line.startswith("data:"):
                        continue  # a `: keep-alive` comment
                    data = line[5:].removeprefix(" ")
                    if data == "[DONE]":
                        self.complete = True
                        return
                    yield data
            if not message.get("more_body", False):
                break

    def disconnect(self) -> None:
        """The client is gone: the app sees `http.disconnect` (and ends the request as REST does)."""
        self._gone.set()

    async def close(self) -> None:
        self.disconnect()
        if not self._task.done():
            done, _ = await asyncio.wait({self._task}, timeout=self._close_timeout)
            if not done:
                self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task  # its exception (the 500 was answered) is retrieved here
