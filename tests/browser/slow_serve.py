"""`kiln serve` with every engine step slowed down, so a browser can watch an answer arrive.

`python tests/browser/slow_serve.py SECONDS serve MODEL --no-engine-process ...` runs the `kiln` command
line with each `LLMEngine.step` sleeping SECONDS first. On 2 CPU cores the tiny model streams ~800
tokens/s, a whole answer in under a second: too fast to press Stop in the middle of it without a race.
The engine must run on the server's own thread (`--no-engine-process`): a `ProcessEngine` child is a
fresh interpreter this patch does not reach.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from kiln.cli import app
from kiln.engine.llm_engine import LLMEngine


def main() -> None:
    delay = float(sys.argv.pop(1))
    step = LLMEngine.step

    def slow_step(self: LLMEngine, *args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return step(self, *args, **kwargs)

    LLMEngine.step = slow_step  # type: ignore[method-assign]
    app()


if __name__ == "__main__":
    main()
