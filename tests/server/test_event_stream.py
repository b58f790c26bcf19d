"""`EventStream` on its own, over a scripted ASGI connection: keep-alives only while nothing else goes
out, a disconnect cancels a stream that waits, a send that fails closes the events, `on_close` always runs."""

from __future__ import annotations

import asyncio

from starlette.background import BackgroundTask

from kiln.serve.sse import EventStream

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}


class Connection:
    """The ASGI side: records what was sent; `receive` gives the body, then waits for `disconnect()`."""

    def __init__(self, fail_sends_after: int | None = None) -> None:
        self.sent: list[bytes | str] = []
        self._gone = asyncio.Event()
        self._body_read = False
        self._fail_after = fail_sends_after

    async def receive(self) -> dict:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if self._fail_after is not None and len(self.sent) >= self._fail_after:
            raise OSError("the client went away")
        if message["type"] == "http.response.start":
            self.sent.append("start")
        else:
            self.sent.append(message["body"] if message["more_body"] else "end")

    def disconnect(self) -> None:
        self._gone.set()


class Events:
    """Yields `data:` events with pauses between them; notes whether it was closed."""

    def __init__(self, pauses: list[float]) -> None:
        self.pauses = pauses
        self.closed = False

    async def __call__(self):
        try:
            for i, pause in enumerate(self.pauses):
                await asyncio.sleep(pause)
                yield f"data: {i}\n\n".encode()
        finally:
            self.closed = True


def run(
    events: Events, connection: Connection, *, keepalive: float = 10.0, disconnect_after: float | None = None
):
    closed: list[bool] = []

    async def on_close() -> None:
        closed.append(True)

    async def main() -> None:
        response = EventStream(
            events(), keepalive_seconds=keepalive, headers={}, background=BackgroundTask(on_close)
        )
        if disconnect_after is not None:
            asyncio.get_running_loop().call_later(disconnect_after, connection.disconnect)
        await asyncio.wait_for(response(SCOPE, connection.receive, connection.send), 10)

    asyncio.run(main())
    return closed


def test_keepalives_go_out_only_while_the_stream_is_quiet():
    connection = Connection()
    events = Events([0.0, 0.45, 0.0])  # a long wait between the first event and the others
    assert run(events, connection, keepalive=0.1) == [True]
    assert connection.sent[:2] == ["start", b"data: 0\n\n"]
    assert connection.sent[-3:] == [b"data: 1\n\n", b"data: 2\n\n", "end"]
    # Within the wait the watcher looks about four times: the first finds the event just sent (no
    # keep-alive), the others find nothing sent since they last looked.
    assert set(connection.sent[2:-3]) == {b": keep-alive\n\n"} and 2 <= len(connection.sent[2:-3]) <= 3
    assert events.closed


def test_a_disconnect_cancels_a_waiting_stream_and_on_close_runs():
    connection = Connection()
    events = Events([0.0, 30.0])
    assert run(events, connection, disconnect_after=0.1) == [True]
    assert connection.sent == ["start", b"data: 0\n\n"]  # no end: the client is gone
    assert events.closed


def test_a_failed_send_closes_the_events_and_on_close_runs():
    connection = Connection(fail_sends_after=2)  # the start and one event, then the client is gone
    events = Events([0.0, 0.0, 0.0])
    assert run(events, connection) == [True]
    assert connection.sent == ["start", b"data: 0\n\n"]
    assert events.closed
