"""Connection limits of `kiln serve`'s HTTP front end: a request-head deadline, a head size limit and a
connection cap, in a subclass of uvicorn's httptools protocol (`limited_http_protocol`).

Rules:
- Head deadline (`header_timeout_seconds`): a connection has that long to send a complete request head
  (request line and headers) from when it opens, and on a keep-alive connection from when its previous
  response ended. Then it is closed: with a 408 if it sent part of a head, silently if it sent nothing
  (an idle keep-alive connection, which a client may be about to reuse: a 408 there would race its
  next request). So an idle keep-alive connection lasts the shorter of this and uvicorn's
  `timeout_keep_alive`. A request body has no deadline here.
- Head size (`max_header_bytes`): a head still incomplete after that many bytes gets 431 at once; the
  parser has then buffered at most the limit plus one read (<= 256 KiB), never the whole head. The
  answer is a lingering close: the 431 and a FIN go out, and what the client still sends is read and
  dropped for up to `LINGER_SECONDS`, so the client reads the 431 rather than a reset. A complete head
  over the limit (it can arrive in one read with the body behind it) is measured exactly (URL, header
  names and values, delimiters) and gets 431 through uvicorn's own response path, then a close.
- Connection cap (`max_connections`): the rule is "at the cap, a new connection evicts the connection
  that has waited longest for a request head; only if no connection is waiting for one is the new
  connection refused (503, closed)". Waiting for a head means half-open (connected, head incomplete)
  or idle keep-alive; a connection that was sent a 431 and is lingering counts as the longest waiting.
  Connections busy with a request (reading its body, running it, streaming its response) are never
  evicted. Why: a real client sends its head within milliseconds of connecting, so the connection
  that has waited longest is the likeliest attacker, or an idle pooled connection its client reopens
  transparently; refusing newcomers instead would hand the server to whoever holds the slots, and
  `/health` and `/ready` probes would fail (issue 13). A new connection is itself evicted only after
  `max_connections` more have arrived before its head completed. Eviction is oldest-first (an
  `OrderedDict`: O(1)), hence deterministic.
- File descriptors: an attack burst is accepted before it is evicted (uvloop accepts the whole listen
  backlog in one loop pass), so the process needs max_connections + backlog (uvicorn's 2048) + a few
  hundred descriptors; `warn_if_fd_limit_low` says so at startup when `ulimit -n` is lower.
- Cost: nothing per response chunk written (SSE streams untouched); per chunk received, one attribute
  test (more only while a head is awaited); per request, a few attribute and OrderedDict updates and
  the head's size summed over its headers. Each connection has one deadline timer at a time, re-armed
  when it fires rather than per request.
- httptools is required (a dependency of kiln): `kiln serve` always uses this class, never uvicorn's
  h11 fallback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger("kiln.serve.http")

# How long a connection answered 431 mid-head may keep sending (dropped) before it is cut.
LINGER_SECONDS = 2.0
# Descriptors besides the connections: the listening socket, logs, the engine's pipes and files.
FD_RESERVE = 256
# At most one warning per this many seconds while the limits act (an attack would flood the log).
WARNING_INTERVAL_SECONDS = 60.0
# Bytes of a head besides its URL and headers: method, spaces and HTTP version, the final blank line.
_REQUEST_LINE_OVERHEAD = 16


class ConnectionLimits:
    """One server's limits and the state its connections share (counts, the eviction order)."""

    def __init__(
        self,
        *,
        header_timeout: float,
        max_header_bytes: int,
        max_connections: int,
        retry_after_seconds: int = 1,
    ) -> None:
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.max_connections = max_connections
        self.retry_after_seconds = retry_after_seconds
        # Connections counted against the cap (not refused ones, not evicted ones still closing).
        self.open = 0
        # Connections waiting for a request head, longest-waiting first: the eviction order.
        self.waiting: OrderedDict[LimitedHttpToolsProtocol, None] = OrderedDict()
        # What the limits did since start. head_timeout: closed with 408 holding part of a head;
        # idle_timeout: closed having sent nothing since connecting or since the previous response.
        self.counts = dict.fromkeys(
            ("evicted", "refused", "head_timeout", "idle_timeout", "head_too_large"), 0
        )
        self._next_warning = 0.0

    def note(self, event: str, *, warn: bool = True) -> None:
        self.counts[event] += 1
        if warn and (now := time.monotonic()) >= self._next_warning:
            self._next_warning = now + WARNING_INTERVAL_SECONDS
            logger.warning(
                "connection limits acting (totals since start; reported at most every %.0f s): %s; "
                "%d connections open of --max-connections %d",
                WARNING_INTERVAL_SECONDS,
                ", ".join(f"{name} {n}" for name, n in self.counts.items()),
                self.open,
                self.max_connections,
            )


def error_json(message: str, *, error_type: str, code: str) -> bytes:
    """OpenAI error JSON, as every other error of the server (kiln.serve.errors)."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return json.dumps(body).encode()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus `ConnectionLimits` (see the module docstring).

    Use `limited_http_protocol(limits)`, which binds `limits` to a subclass.
    """

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True from the connection's start and from each request's end until the next head is
        # complete: received bytes then count towards max_header_bytes.
        self._awaiting_head = True
        self._head_bytes = 0
        # Loop time the wait for a head began (None: not waiting). One timer checks it, re-armed only
        # when it fires, not per request (see _check_deadline); once answered 431 mid-head, the timer
        # ends the linger instead.
        self._waiting_since: float | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = False  # counted in limits.open
        self._rejected = False  # answered (431 mid-head, 503 at the cap): drop what it sends

    # --- the connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        if limits.open >= limits.max_connections:
            if not limits.waiting:
                self._refuse()
                return
            victim, _ = limits.waiting.popitem(last=False)
            victim._evict()
        limits.open += 1
        self._counted = True
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._release()  # the connection leaves this protocol (and uvicorn's connection set)
        super().handle_websocket_upgrade()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.limits.open -= 1
        self._stop_waiting()
        self._cancel_deadline()

    def _wait_for_head(self) -> None:
        limits = self.limits
        self._waiting_since = self.loop.time()
        limits.waiting[self] = None
        if self._deadline is None:
            self._deadline = self.loop.call_later(limits.header_timeout, self._check_deadline)

    def _stop_waiting(self) -> None:
        self._waiting_since = None
        self.limits.waiting.pop(self, None)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _evict(self) -> None:
        """Make room for a new connection: this one has waited longest for a head."""
        self._release()
        self.limits.note("evicted")
        self.transport.abort()  # frees the descriptor now, whatever is unsent

    def _refuse(self) -> None:
        """At the cap with every connection busy: answer 503 and close (best effort: a client that
        already sent its request may see a reset instead)."""
        self._rejected = True
        limits = self.limits
        limits.note("refused")
        message = f"too many connections (--max-connections {limits.max_connections}); retry later"
        body = error_json(message, error_type="service_unavailable", code="too_many_connections")
        self._write_error(503, body, extra=((b"retry-after", str(limits.retry_after_seconds).encode()),))
        self.transport.close()

    def _check_deadline(self) -> None:
        self._deadline = None
        if self._waiting_since is None:
            return  # busy with a request: its response's end arms the timer again
        due = self._waiting_since + self.limits.header_timeout
        # Not due yet: the wait began after this timer was armed (1 ms: the loop clock's grain).
        if self.loop.time() < due - 0.001:
            self._deadline = self.loop.call_at(due, self._check_deadline)
            return
        self._stop_waiting()
        if self.transport.is_closing():
            return
        if self._head_bytes:
            self.limits.note("head_timeout")
            message = f"request head not complete within {self.limits.header_timeout:g} s"
            self._write_error(408, error_json(message, error_type="invalid_request_error", code="timeout"))
        else:
            self.limits.note("idle_timeout", warn=False)
        self.transport.close()

    def _write_error(self, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        content = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *extra]:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))

    # --- receiving -----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._awaiting_head:
            super().data_received(data)  # a request body, or pipelined bytes: uvicorn's path as is
            return
        if self._rejected:
            return  # lingering after a 431: drop it
        self._head_bytes += len(data)
        super().data_received(data)
        # Still no complete head (a head that completed in `data` was measured in on_headers_complete).
        if (
            self._awaiting_head
            and self._head_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._head_too_large()

    def _head_too_large(self) -> None:
        """Answer 431 to a head still incomplete past the limit, then close lingering."""
        limits = self.limits
        self._rejected = True
        self._stop_waiting()
        self._cancel_deadline()
        limits.note("head_too_large")
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # junk after a request whose response is going out: no room for a 431
            return
        message = f"request head over {limits.max_header_bytes} bytes (--max-header-bytes)"
        self._write_error(
            431, error_json(message, error_type="invalid_request_error", code="header_too_large")
        )
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        # First to be evicted if room is needed; cut at the end of the linger time at the latest.
        limits.waiting[self] = None
        limits.waiting.move_to_end(self, last=False)
        self._deadline = self.loop.call_later(LINGER_SECONDS, self.transport.abort)

    # --- parser callbacks ----------------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        limits = self.limits
        self._awaiting_head = False
        self._waiting_since = None  # _stop_waiting(), inline: once per request
        limits.waiting.pop(self, None)
        size = len(self.url) + _REQUEST_LINE_OVERHEAD
        for name, value in self.headers:
            size += len(name) + len(value) + 4  # ": " and CRLF
        if size <= limits.max_header_bytes:
            super().on_headers_complete()
            return
        # The whole head came in at once, over the limit: answer 431 in place of the app.
        limits.note("head_too_large")
        app = self.app
        self.app = _too_large_app(limits.max_header_bytes)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn armed its keep-alive timer: the connection stays open with nothing pipelined, so it
        # now waits for its next head.
        if self.timeout_keep_alive_task is not None and not self._rejected:
            self._wait_for_head()


def _too_large_app(max_header_bytes: int) -> Any:
    message = f"request head over {max_header_bytes} bytes (--max-header-bytes)"
    body = error_json(message, error_type="invalid_request_error", code="header_too_large")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 431, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def limited_http_protocol(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`: one per server, bound to `limits`."""
    return type("KilnHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def warn_if_fd_limit_low(max_connections: int, backlog: int) -> None:
    """Warn when the open-file limit cannot hold the cap, an accepted burst and the rest of the process."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + backlog + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "the open-file limit (%d) is below --max-connections %d + the listen backlog %d + %d spare: "
            "a connection flood can exhaust file descriptors before the cap acts; raise `ulimit -n` "
            "to at least %d or lower --max-connections",
            soft,
            max_connections,
            backlog,
            FD_RESERVE,
            needed,
        )
