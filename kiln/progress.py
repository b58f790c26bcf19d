"""Progress bars (rich) for building and loading, with one switch to silence them for tests and libraries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class BuildProgress:
    """A set of build steps; `step(description, total)` adds a bar and returns its advance-by-one callback.

    Disabled, it renders nothing but still counts, so callers never branch on whether it is shown.
    """

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self.completed: dict[str, int] = {}  # description -> units advanced (for tests and logs)

    def step(self, description: str, total: int | None) -> Callable[[], None]:
        task = self._progress.add_task(description, total=total)
        self.completed[description] = 0

        def advance() -> None:
            self.completed[description] += 1
            self._progress.advance(task)

        return advance


@contextmanager
def build_progress(*, enabled: bool = True) -> Iterator[BuildProgress]:
    """Show build progress on the console while the block runs (nothing at all when disabled)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not enabled) as progress:
        yield BuildProgress(progress)
