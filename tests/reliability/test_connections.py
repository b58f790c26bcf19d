"""Connection limits (issue 13, kiln.serve.http_limits): a deadline for the request head, a head size
limit and a connection cap that evicts connections waiting for a head before refusing new ones, over
raw loopback sockets against the real server."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
from fakes import GatedEngine
from server_harness import LiveServer, run_live_server, wait_for

from kiln.clients.thread import AsyncEngine

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: kiln\r\nX-Slow: "
HEALTH = b"GET /health HTTP/1.1\r\nHost: kiln\r\n\r\n"


@contextmanager
def sockets(live: LiveServer) -> Iterator[list[socket.socket]]:
    """A list to put raw client sockets in, all closed on exit."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def connect(live: LiveServer, opened: list[socket.socket], data: bytes = b"") -> socket.socket:
    url = urlsplit(live.url)
    s = socket.create_connection((url.hostname, url.port), timeout=10)
    opened.append(s)
    if data:
        s.sendall(data)
    return s


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """All the server sends until it closes the connection or `timeout` passes: (bytes, closed)."""
    deadline = time.monotonic() + timeout
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def read_response(s: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    """One response with a Content-Length body, leaving the connection open: (status, body)."""
    s.settimeout(timeout)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = s.recv(65536)
        assert chunk, f"closed mid-response: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return int(lines[0].split()[1]), body


def status_and_error(response: bytes) -> tuple[int, dict]:
    """The status and the OpenAI error object of a closed connection's one response."""
    head, _, body = response.partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return int(head.split()[1]), error


def is_closed(s: socket.socket) -> bool:
    """Whether the server has closed `s` (EOF or reset waiting); never blocks."""
    readable, _, _ = select.select([s], [], [], 0)
    if not readable:
        return False
    try:
        return s.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def health(live: LiveServer) -> int:
    return httpx.get(f"{live.url}/health", timeout=10).status_code


def test_half_open_connections_past_the_cap_evict_the_oldest_and_probes_get_through(
    tiny_engine: AsyncEngine,
) -> None:
    # A long head deadline, so that only the cap closes connections here.
    with (
        run_live_server(tiny_engine, max_connections=20, header_timeout_seconds=60) as live,
        sockets(live) as s,
    ):
        attackers = []
        for i in range(60):
            attackers.append(connect(live, s, PARTIAL_HEAD))
            if i in (29, 59):
                assert health(live) == 200  # mid-attack, with every slot held by a half-open connection
        for _ in range(3):
            assert health(live) == 200
        # 65 arrivals for 20 places: the oldest 40-odd half-open connections were closed, the newest
        # still hold theirs (each arrival evicts one, so at most 45 went).
        assert wait_for(lambda: all(is_closed(a) for a in attackers[:30]), timeout=10)
        assert not any(is_closed(a) for a in attackers[-10:])
        assert len(live.server.server_state.connections) <= 20


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(tiny_engine: AsyncEngine) -> None:
    busy_head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    with (
        run_live_server(tiny_engine, max_connections=3, header_timeout_seconds=60) as live,
        sockets(live) as s,
    ):
        busy = [connect(live, s, busy_head) for _ in range(3)]  # heads complete, bodies never: busy
        assert wait_for(lambda: len(live.server.server_state.tasks) == 3)
        response, closed = read_until_closed(connect(live, s), timeout=10)
        assert closed
        status, error = status_and_error(response)
        assert status == 503
        assert error["code"] == "too_many_connections"
        assert b"\r\nretry-after: 1\r\n" in response.lower()
        assert not any(is_closed(b) for b in busy)  # a busy connection is never evicted
        for b in busy:
            b.close()
        assert wait_for(lambda: not live.server.server_state.connections)
        assert health(live) == 200


def test_header_timeout_closes_a_half_sent_connection(tiny_engine: AsyncEngine) -> None:
    with (
        run_live_server(tiny_engine, header_timeout_seconds=1.0, keep_alive_timeout_seconds=60) as live,
        sockets(live) as s,
    ):
        # part of a head: 408, then closed
        started = time.monotonic()
        response, closed = read_until_closed(connect(live, s, PARTIAL_HEAD), timeout=5)
        assert closed
        assert time.monotonic() - started >= 0.8
        status, error = status_and_error(response)
        assert (status, error["code"]) == (408, "timeout")

        # nothing at all: closed without a word
        assert read_until_closed(connect(live, s), timeout=5) == (b"", True)

        # keep-alive: the deadline restarts after each response, so requests spaced closer than it
        # may go on past it ...
        conn = connect(live, s)
        for _ in range(5):
            conn.sendall(HEALTH)
            assert read_response(conn)[0] == 200
            time.sleep(0.3)
        # ... while part of the next head, sent after the response, gets 408 (uvicorn's own keep-alive
        # timer, 60 s here, stops at the first byte received)
        conn.sendall(PARTIAL_HEAD)
        response, closed = read_until_closed(conn, timeout=5)
        assert closed
        assert status_and_error(response)[0] == 408
        assert health(live) == 200


def test_a_head_over_max_header_bytes_gets_431_and_the_server_keeps_serving(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, max_header_bytes=8192) as live, sockets(live) as s:
        # a head that never ends: answered once it passes the limit, not when (if ever) it is complete
        conn = connect(live, s, PARTIAL_HEAD + b"a" * 100_000)
        response, closed = read_until_closed(conn, timeout=5)
        assert closed
        status, error = status_and_error(response)
        assert (status, error["code"]) == (431, "header_too_large")

        # a client still sending a head far past the limit may send on (it is read and dropped for a
        # while), so it reads the 431 rather than a reset
        conn = connect(live, s)
        conn.sendall(PARTIAL_HEAD + b"a" * 4_000_000)
        response, closed = read_until_closed(conn, timeout=5)
        assert closed
        assert status_and_error(response)[0] == 431

        # a whole head over the limit, sent at once with a body behind it
        big = (
            b"POST /health HTTP/1.1\r\nHost: kiln\r\nX-Big: "
            + b"a" * 20_000
            + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        response, closed = read_until_closed(connect(live, s, big), timeout=5)
        assert closed
        assert status_and_error(response)[0] == 431

        # the server goes on, and a head under the limit passes
        with httpx.Client(base_url=live.url, timeout=10) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/health", headers={"x-big": "a" * 6000}).status_code == 200


def test_keep_alive_and_a_stream_longer_than_the_head_deadline_work_with_the_limits_on(
    tiny_engine: AsyncEngine,
) -> None:
    gated = GatedEngine(tiny_engine)
    settings = {"header_timeout_seconds": 0.5, "max_header_bytes": 4096, "max_connections": 4}
    with run_live_server(gated, served_model_name="tiny", **settings) as live:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            for _ in range(3):
                assert client.get("/health").status_code == 200
            body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True}
            result: dict[str, object] = {"status": None, "lines": []}

            def stream() -> None:
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    result["status"] = r.status_code
                    result["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

            # The stream waits at the gate for twice the head deadline: a request in flight has none.
            thread = threading.Thread(target=stream)
            thread.start()
            assert wait_for(lambda: gated.arrived == 1)
            time.sleep(1.0)
            gated.open()
            thread.join(timeout=30)
            assert result["status"] == 200
            lines = result["lines"]
            assert isinstance(lines, list)
            assert lines[-1] == "data: [DONE]"
            assert lines[:-1] and all(json.loads(line[6:])["choices"] for line in lines[:-1])
            # the same client (its kept-alive connection, or a new one) goes on
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200
            assert r.json()["usage"]["completion_tokens"] == 8
        assert len(live.server.server_state.connections) <= 4
