"""benchmarks.targets: issue 16's figures in priority order within a budget, spread over calls."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from benchmarks import targets
from benchmarks.targets import Step


class FakeMachine:
    """A clock that each step advances by its own duration, and a record of what ran."""

    def __init__(self, durations: dict[str, float], statuses: dict[str, int] | None = None) -> None:
        self.now = 0.0
        self.durations, self.statuses = durations, statuses or {}
        self.ran: list[tuple[list[str], Path, float]] = []

    def clock(self) -> float:
        return self.now

    def run_step(self, command: list[str], log: Path, timeout_s: float) -> int:
        self.ran.append((command, log, timeout_s))
        name = log.stem
        self.now += min(self.durations[name], timeout_s)
        return -1 if self.durations[name] > timeout_s else self.statuses.get(name, 0)


STEPS = [Step("a", 50, ("x", "--json", "{out}")), Step("b", 100, ("y",)), Step("c", 30, ("z", "{out}"))]


def test_steps_run_in_order_while_their_estimates_fit_and_later_shorter_ones_still_run(
    tmp_path: Path,
) -> None:
    machine = FakeMachine({"a": 60, "b": 90, "c": 20})
    out = tmp_path / "results.json"
    outcome = targets.run(STEPS, 120, out, tmp_path / "logs", run_step=machine.run_step, clock=machine.clock)
    # a (est. 50) fits 120; b (est. 100) does not fit the 60 left; c (est. 30) does, given the 60 left.
    assert (outcome.ran, outcome.failed, outcome.skipped) == (["a", "c"], [], ["b"])
    assert [cmd for cmd, _, _ in machine.ran] == [["x", "--json", str(out)], ["z", str(out)]]
    assert [timeout for _, _, timeout in machine.ran] == [120, 60]  # each stopped at the budget's end
    assert [log.name for _, log, _ in machine.ran] == ["a.log", "c.log"]
    assert (tmp_path / "logs").is_dir()


def test_the_done_file_lists_what_exited_0_and_the_next_call_skips_it(tmp_path: Path) -> None:
    done = tmp_path / "targets.done"
    machine = FakeMachine({"a": 10, "b": 200, "c": 10}, statuses={"c": 3})
    first = targets.run(
        STEPS, 150, tmp_path / "r.json", tmp_path, done, run_step=machine.run_step, clock=machine.clock
    )
    # b overran what was left of the budget: stopped, failed, not done.
    assert first.ran == ["a"] and first.failed == [("b", -1)] and first.skipped == ["c"]
    assert done.read_text().split() == ["a"]
    machine = FakeMachine({"b": 50, "c": 10}, statuses={"c": 3})
    second = targets.run(
        STEPS, 500, tmp_path / "r.json", tmp_path, done, run_step=machine.run_step, clock=machine.clock
    )
    assert second.ran == ["b"] and second.failed == [("c", 3)] and second.skipped == []
    assert done.read_text().split() == ["a", "b"]


def test_the_figure_set_covers_every_issue_16_target_the_report_judges() -> None:
    from benchmarks.report import TARGETS

    names = [step.name for step in targets.STEPS]
    assert len(names) == len(set(names))
    commands = [" ".join(step.argv) for step in targets.STEPS]
    # Each target's Kiln row comes from some step: batch-1 per scheme, offline per scheme and cache,
    # 1000/1000, prefill, served, start-up.
    assert any("--latency-only" in c and "--quantization" not in c for c in commands)
    assert any(
        "--quantization fp8 --kv-cache-dtype fp8" in c and "--input-len 1000" not in c for c in commands
    )
    assert any("--input-len 1000" in c and "--kv-cache-dtype fp8" in c for c in commands)
    for scheme in ("fp8", "int8-wo", "int8-sq"):  # every scheme runs at batch 1 and offline
        assert any("--latency-only" in c and f"--quantization {scheme}" in c for c in commands), scheme
        assert any("--throughput-only" in c and f"--quantization {scheme}" in c for c in commands), scheme
    for module in (
        "benchmarks.prefill",
        "benchmarks.served",
        "benchmarks.startup",
        "benchmarks.hf_baselines",
        "benchmarks.gemv",  # the batch-1 GEMV tiles, 16-bit and 8-bit, swept on the GPU itself
        "benchmarks.quant_gemv --sweep",
    ):
        assert any(module in c for c in commands), module
    assert sum(1 for issue, *_ in TARGETS if issue == 16) >= 10
    assert all("{out}" in step.argv for step in targets.STEPS)  # every step writes where the report reads


def test_profile_steps_write_their_reports_beside_the_results(tmp_path: Path) -> None:
    out = tmp_path / "call" / "results.json"
    profiled = [step for step in targets.STEPS if "--profile" in step.argv]
    # The targets most likely missed on the H200 each get a profile: batch-1 FP8, fp16 and INT8
    # weight-only, offline FP8 (fp8 cache) and bf16, FP8 1000/1000 deep into its decode.
    assert [step.name for step in profiled] == [
        "profile-batch1-fp8",
        "profile-offline-fp8-fp8kv",
        "profile-fp8-1000-fp8kv",
        "profile-batch1-fp16",
        "profile-offline-bf16",
        "profile-batch1-int8-wo",
    ]
    for step in profiled:
        command = step.command(out)
        report = Path(command[command.index("--profile") + 1])
        assert report == out.parent / f"{step.name}.txt"
        assert command[command.index("--json") + 1] == str(out)
    assert profiled[2].command(out)[profiled[2].command(out).index("--profile-after") + 1] == "560"


def test_the_cli_lists_steps_and_refuses_an_unknown_one_or_no_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert targets.main(["--list", "--only", "batch1-fp16", "prefill"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["batch1-fp16", "prefill"]
    with pytest.raises(SystemExit):
        targets.main(["--only", "batch1-fp32"])
    assert "unknown step(s) batch1-fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        targets.main(["--budget", "0"])
    assert "--budget must be > 0" in capsys.readouterr().err


LEAVES_A_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(float(sys.argv[2]))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a killed child not yet reaped is a zombie: state Z
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("runs_s", "status"), [(0.0, 0), (30.0, -1)], ids=["ends", "runs-out-of-time"])
def test_a_step_leaves_nothing_running(tmp_path: Path, runs_s: float, status: int) -> None:
    pid_file = tmp_path / "child.pid"
    command = [sys.executable, "-c", LEAVES_A_CHILD, str(pid_file), str(runs_s)]
    assert targets.launch(command, tmp_path / "step.log", timeout_s=3) == status
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
