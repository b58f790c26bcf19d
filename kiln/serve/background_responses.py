"""Background responses (`background: true`): made by a task of the server, not by the request.

Rules:
- Only with store (they are read back; `store: false` is a 400). The POST answers at once: the
  response "queued", or, with `stream`, its events as they come. The work goes on when the client
  goes away.
- While one runs, GET answers it as it stands ("in_progress", the output so far); GET with
  `stream=true` replays its events after `starting_after` (a sequence number) and follows it live.
  Once finished it is stored with its events, so the replay still works while it is kept.
- `POST /v1/responses/{id}/cancel` stops one: "cancelled", what it wrote kept, a stream following
  it ended by an `error` event (code "cancelled"). Cancelling a finished one answers it as it is; one
  not made in the background is a 400, as is deleting one still running.
- A failure (its deadline, the drain's end) makes it "failed" with the error. Running ones are
  cancelled when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import Request
from starlette.responses import Response

from kiln.serve.errors import APIError, InternalError
from kiln.serve.generation import Generation
from kiln.serve.response_output import error_event
from kiln.serve.responses_protocol import ResponseObject
from kiln.serve.sse import sse_response
from kiln.serve.state import ServerState

logger = logging.getLogger("kiln.serve")

Event = tuple[str, str]  # a stream event's name and JSON


class Work(Protocol):
    """A response being made (kiln.serve.responses' `_Run`), as a background runner drives it."""

    response_id: str
    generation: Generation
    store: bool
    error: APIError | None  # what ended its stream early
    final: ResponseObject | None  # the finished response, once its stream is through

    def stream(self) -> AsyncIterator[Event]: ...

    def snapshot(self, status: str, error: APIError | None = None) -> ResponseObject: ...

    def keep(self, response: ResponseObject, events: tuple[Event, ...] | None = None) -> None: ...


class BackgroundRun:
    """One background response: its task, and its events so far for whoever follows it."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self.events: list[Event] = []
        self.done = False
        self._grew = asyncio.Event()
        self.task: asyncio.Future[None] | None = None

    def start(self, state: ServerState) -> None:
        state.background_runs[self.work.response_id] = self
        self.work.generation.start()
        self.task = asyncio.ensure_future(self._run(state))

    async def _run(self, state: ServerState) -> None:
        work = self.work
        response: ResponseObject | None = None
        try:
            async for event in work.stream():
                self._add(event)
            response = work.final if work.error is None else work.snapshot("failed", work.error)
        except asyncio.CancelledError:
            self._add_error(APIError("the response was cancelled", code="cancelled"))
            response = work.snapshot("cancelled")
        except Exception:
            logger.exception("background response %s failed", work.response_id)
            error = InternalError(f"internal server error (response {work.response_id}); see the server log")
            self._add_error(error)
            response = work.snapshot("failed", error)
        finally:
            if response is not None:
                work.keep(response, tuple(self.events))
            self.done = True
            self._grew.set()
            state.background_runs.pop(work.response_id, None)
            # Last: a second cancel cuts this wait short, and the bookkeeping above must not be.
            await asyncio.shield(work.generation.aclose())

    def _add(self, event: Event) -> None:
        self.events.append(event)
        self._grew.set()
        self._grew = asyncio.Event()

    def _add_error(self, error: APIError) -> None:
        payload = {**error_event(error), "sequence_number": len(self.events)}
        self._add(("error", json.dumps(payload, ensure_ascii=False, separators=(",", ":"))))

    async def follow(self, after: int | None) -> AsyncIterator[Event]:
        """Its events after sequence number `after` (all: None), then each as it comes, to the end."""
        sent = 0 if after is None else after + 1
        while True:
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.done:
                return
            await self._grew.wait()

    async def cancel(self) -> None:
        """Stop it, and wait until it is stored "cancelled" (a finished one is left as it is)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def start_background(work: Work, state: ServerState, request: Request, *, stream: bool) -> Response:
    """Run `work` in the background (module rules) and answer the POST."""
    run = BackgroundRun(work)
    queued = work.snapshot("queued")
    run.start(state)
    if stream:
        return replay(run.follow(None), state, request)
    return Response(queued.model_dump_json(), media_type="application/json")


def replay(events: AsyncIterator[Event], state: ServerState, request: Request) -> Response:
    """Stream `events`; the client going away ends only its own stream, not the response."""

    async def nothing() -> None:
        return None

    return sse_response(
        events,
        settings=state.settings,
        request_id=request.state.request_id,
        on_close=nothing,
        done_event=False,
    )


async def cancel_all(state: ServerState) -> None:
    """Cancel every background response still running (the server stops)."""
    for run in list(state.background_runs.values()):
        await run.cancel()
