"""The container test's timings, printed at the end of the run (no -s needed)."""

from __future__ import annotations

import pytest
from container_host import TIMINGS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("kiln CPU image (tests/container)")
        for name, value in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {value}")
