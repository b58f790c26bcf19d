"""`Mailbox`: one reader's inbox on its event loop, emptied whole.

Rules:
- `put` appends and wakes the reader if it waits; it never blocks (unbounded) and must run on the
  reader's loop (another thread hands items over with `loop.call_soon_threadsafe`).
- `take()` waits until something is there and returns everything, in the order put. A reader that fell
  behind gets its backlog at once and can fold it (one SSE chunk instead of one per token).
- One reader at a time. A cancelled `take` loses nothing: the items stay for the next one.
Why not asyncio.Queue: every token of every stream passes through two of these on the server's one
event-loop thread; a Queue's get and put (getter and putter waiters, `_wakeup_next`, one get per item)
cost more than one future per wait and one append per put.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[T]:
        """Everything put since the last take (waiting for the first item if there is none)."""
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("a Mailbox has one reader at a time")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:  # cancelled before a put woke it
                    self._waiter = None
        items, self._items = self._items, []
        return items
