"""benchmarks.host_profile: py-spy's raw samples become busy seconds and functions per process and thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import host_profile
from benchmarks.targets import SERVED, STEPS

SPAWN = (
    'process 11:"/usr/bin/python3 -B -c from multiprocessing.spawn import spawn_main; spawn_main(fd=8) --x"'
)
SERVER = 'process 10:"python3 -m benchmarks.served --random llama3.1-8b"'
RAW = "\n".join(
    [
        f"{SERVER};thread (21): kiln-server;run (uvicorn/server.py:86);send (uvicorn/httptools_impl.py:542) 30",
        f"{SERVER};thread (21): kiln-server;run (uvicorn/server.py:86);chunk (kiln/serve/completions.py:184) 10",
        # a recursive frame counts once a sample on the stack
        f"{SERVER};thread (21): kiln-server;run (uvicorn/server.py:86);run (uvicorn/server.py:90) 5",
        f"{SERVER};thread (10);main (benchmarks/served.py:12) 1",
        f"{SERVER};{SPAWN};thread (31): MainThread;step (engine/llm_engine.py:200) 54",
        "",
        "not a sample line",
    ]
)


def test_samples_are_grouped_by_process_and_thread() -> None:
    threads = host_profile.parse(RAW)
    assert set(threads) == {
        ("benchmarks.served [10]", "kiln-server"),
        ("benchmarks.served [10]", "thread 10"),
        ("multiprocessing child [11]", "MainThread"),
    }
    server = threads["benchmarks.served [10]", "kiln-server"]
    assert server.samples == 45
    assert server.inclusive["run (uvicorn/server.py)"] == 45
    assert server.inclusive["send (uvicorn/httptools_impl.py)"] == 30
    assert server.self_lines == {
        "send (uvicorn/httptools_impl.py:542)": 30,
        "chunk (serve/completions.py:184)": 10,
        "run (uvicorn/server.py:90)": 5,
    }
    assert threads["multiprocessing child [11]", "MainThread"].samples == 54


def test_report_ranks_threads_and_details_the_busy_ones() -> None:
    text = host_profile.report(host_profile.parse(RAW), rate=100, header="HEAD")
    lines = text.splitlines()
    assert lines[0] == "HEAD"
    ranked = lines[lines.index("busy seconds by process and thread (samples / 100 Hz):") + 1 :][:3]
    assert [line.split()[0] for line in ranked] == ["0.54", "0.45", "0.01"]
    assert "multiprocessing child [11] / MainThread" in ranked[0]
    assert "== benchmarks.served [10] / kiln-server: 0.45 s busy" in lines
    assert "   66.7%  send (uvicorn/httptools_impl.py:542)" in lines
    # One sample of 100 is under MIN_SHARE: listed, no section of its own.
    assert not any(line.startswith("== benchmarks.served [10] / thread 10") for line in lines)


@pytest.mark.parametrize(
    ("cmdline", "label"),
    [
        ("python3 -m benchmarks.served --client http://x", "benchmarks.served [7]"),
        (
            "/usr/bin/python3 -B -c from multiprocessing.spawn import spawn_main; spawn_main()",
            "multiprocessing child [7]",
        ),
        ("/usr/bin/python3 -c import subprocess", "python -c [7]"),
        ("/usr/bin/python3 -c import subprocess /tmp/status python3 -m benchmarks.served", "python -c [7]"),
        ("/usr/bin/python3 /srv/app.py --flag", "--flag [7]"),
    ],
)
def test_process_labels(cmdline: str, label: str) -> None:
    assert host_profile.process_label("7", cmdline) == label


def test_without_py_spy_it_says_how_to_get_it(monkeypatch, capsys) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exc:
        host_profile.main(["--report", "r.txt", "--", sys.executable, "-c", "pass"])
    assert exc.value.code == 2
    assert "py-spy is not installed" in capsys.readouterr().err


def test_it_needs_a_command(capsys) -> None:
    with pytest.raises(SystemExit):
        host_profile.main(["--report", "r.txt", "--"])
    assert "give the command to profile" in capsys.readouterr().err


def test_the_targets_profile_the_served_run_itself() -> None:
    (step,) = [s for s in STEPS if s.name == "profile-served-host"]
    (served,) = [s for s in STEPS if s.name == "served"]
    command = step.command(Path("/r/results.json"))
    assert command[1:5] == ["-m", "benchmarks.host_profile", "--report", "/r/profile-served-host.txt"]
    assert command[5] == "--"
    assert command[6:] == [*SERVED, "--out", "/r/results.json"] == served.command(Path("/r/results.json"))


SPIN = """
import sys, threading, time
def spin():
    end = time.time() + 0.6
    while time.time() < end:
        sum(range(1000))
worker = threading.Thread(target=spin, name="worker")
worker.start()
worker.join()
sys.exit(3)
"""
ROOT = Path(__file__).resolve().parents[2]


def _profile(
    tmp_path: Path, command: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """benchmarks.host_profile in a process of its own, as it runs (it makes itself a process group)."""
    report = tmp_path / "report.txt"
    argv = [sys.executable, "-m", "benchmarks.host_profile", "--report", str(report), "--rate", "100", "--"]
    return subprocess.run([*argv, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed (kiln[bench])")
def test_a_profiled_command_keeps_its_exit_status_and_its_threads(tmp_path: Path) -> None:
    assert _profile(tmp_path, [sys.executable, "-c", SPIN]).returncode == 3
    text = (tmp_path / "report.txt").read_text()
    assert "exit 3" in text.splitlines()[0]
    section = text[text.index("/ worker:") :]
    assert "spin (<string>)" in section


SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"


def test_what_py_spy_leaves_running_is_stopped(tmp_path: Path) -> None:
    """py-spy may give up (no permission to read the command's memory, say) with the command started."""
    fake = tmp_path / "bin" / "py-spy"
    fake.parent.mkdir()
    # Starts what follows `--` in the background, as py-spy starts its command, and fails at once.
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done; shift\n"$@" &\nsleep 1; exit 1\n')
    fake.chmod(0o755)
    pid_file = tmp_path / "sleeper.pid"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    done = _profile(tmp_path, [sys.executable, "-c", SLEEPER, str(pid_file)], env=env)
    assert done.returncode == 1
    assert "py-spy exited with 1 before the command finished" in done.stderr
    sleeper = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{sleeper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{sleeper}").exists()
