"""Progress bars (rich, on stderr) for every phase of a first start: download (bytes), build, load.

Rules:
- One switch silences them: `build_progress(enabled=False)`. Blocks nest: an inner `build_progress`
  inside an outer one (in the same thread) adds its steps to the outer display, and the outermost
  switch wins, so `ensure_default_engine(progress=False)` silences the download and the build beneath it.
- On stderr, so a command's output on stdout (`kiln complete ... > out.txt`) holds no bars.
- `listen(callback)` sees every step as it begins and advances, shown or not, in order (tests, logs).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text


@dataclass(slots=True)
class ProgressEvent:
    """A step began (`advance` 0) or moved on by `advance` units ("bytes" or "items")."""

    description: str
    advance: int
    total: int | None
    unit: str


_listeners: list[Callable[[ProgressEvent], None]] = []
_listeners_lock = threading.Lock()
_current: contextvars.ContextVar[BuildProgress | None] = contextvars.ContextVar("kiln_progress", default=None)


@contextmanager
def listen(callback: Callable[[ProgressEvent], None]) -> Iterator[None]:
    """Call `callback` with every `ProgressEvent` of this process while the block runs."""
    with _listeners_lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(callback)


def _emit(event: ProgressEvent) -> None:
    for callback in list(_listeners):
        callback(event)


class BuildProgress:
    """A set of steps; `step(description, total, unit=...)` adds a bar and returns its `advance(n=1)`.

    Disabled, it renders nothing but still counts and reports, so callers never branch on whether it
    is shown.
    """

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self.completed: dict[str, int] = {}  # description -> units advanced (for tests and logs)

    def step(self, description: str, total: int | None, *, unit: str = "items") -> Callable[..., None]:
        task = self._progress.add_task(description, total=total, unit=unit)
        self.completed[description] = 0
        _emit(ProgressEvent(description, 0, total, unit))

        def advance(n: int = 1) -> None:
            self.completed[description] += n
            self._progress.advance(task, n)
            _emit(ProgressEvent(description, n, total, unit))

        return advance


T = TypeVar("T")


def counted(items: Iterable[T], advance: Callable[[], None]) -> Iterator[T]:
    """`items`, calling `advance()` once each has been consumed: a step's bar follows a stream."""
    for item in items:
        yield item
        advance()


class _CountColumn(ProgressColumn):
    """`12.3/92.9 MB` for a byte step, `3/15` for any other."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()
        self._items = MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        return (self._bytes if task.fields.get("unit") == "bytes" else self._items).render(task)


class _SpeedColumn(ProgressColumn):
    """Transfer speed of a byte step; nothing for the others."""

    def __init__(self) -> None:
        super().__init__()
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        return self._speed.render(task) if task.fields.get("unit") == "bytes" else Text("")


@contextmanager
def build_progress(*, enabled: bool = True) -> Iterator[BuildProgress]:
    """Show progress on stderr while the block runs (nothing at all when disabled); inside another
    `build_progress` block, its steps join that one's display and its switch."""
    outer = _current.get()
    if outer is not None:
        yield outer
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        _CountColumn(),
        _SpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as progress:
        bars = BuildProgress(progress)
        token = _current.set(bars)
        try:
            yield bars
        finally:
            _current.reset(token)
