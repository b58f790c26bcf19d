"""`kiln serve --help` at 80 columns: grouped by topic, every flag name whole, no line wider than 80."""

from __future__ import annotations

from typing import Any

import pytest
import typer.core
import typer.main
from typer.testing import CliRunner

import kiln.cli
from kiln.serve.flags import ENV_HELP, HELP_PANELS, OTHER_PANEL, SETTINGS_FLAGS

runner = CliRunner()


def _serve_options() -> list[Any]:
    serve = typer.main.get_command(kiln.cli.app).commands["serve"]  # type: ignore[attr-defined]
    return [p for p in serve.params if isinstance(p, typer.core.TyperOption)]


@pytest.fixture(scope="module")
def help_lines() -> list[str]:
    result = runner.invoke(kiln.cli.app, ["serve", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_no_line_is_wider_than_80_columns(help_lines: list[str]) -> None:
    too_wide = [line for line in help_lines if len(line) > 80]
    assert not too_wide, too_wide


def test_every_flag_name_appears_whole(help_lines: list[str]) -> None:
    # The flag cell is the first word of a table row: "│ --max-num-seqs   Most requests ...".
    shown = {line.strip("│ ").split()[0] for line in help_lines if line.strip("│ ").startswith("--")}
    for option in _serve_options():
        if not option.hidden:
            assert option.opts[0] in shown, f"{option.opts[0]} is cut or missing"
        else:  # a boolean's --no-x: named whole in its flag's help
            assert any(option.opts[0] in line.split() or f"{option.opts[0]}." in line for line in help_lines)
    assert not any("…" in line for line in help_lines)


def test_flags_are_grouped_in_panels(help_lines: list[str]) -> None:
    titles = [line.strip("╭─ ").split(" ─")[0] for line in help_lines if line.startswith("╭─ ")]
    assert titles == ["Arguments", "Options", *HELP_PANELS]
    assert ENV_HELP.split(":")[0] in " ".join(help_lines)


def test_every_setting_has_a_panel() -> None:
    placed = [name for names in HELP_PANELS.values() for name in names]
    assert sorted(placed) == sorted(SETTINGS_FLAGS)  # each exactly once, none left for "Other"
    assert {o.rich_help_panel for o in _serve_options() if o.name in SETTINGS_FLAGS} <= set(HELP_PANELS)
    assert OTHER_PANEL not in HELP_PANELS


def test_a_boolean_and_its_negative_conflict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PORT", "0")
    result = runner.invoke(kiln.cli.app, ["serve", "--log-prompts", "--no-log-prompts"])
    assert result.exit_code == 2
    assert "--log-prompts or --no-log-prompts" in result.output
