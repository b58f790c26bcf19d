"""Where a command's host time goes, by process and thread: it runs under py-spy, and the samples become a
report of each thread's busy seconds and the functions they went to.

    python -m benchmarks.host_profile --report served-host.txt -- python -m benchmarks.served --random ...

Rules:
- py-spy (the sampling profiler, `pip install py-spy`, in the `bench` extra) starts the command itself,
  so it reads only its own descendants' memory (what Yama's default ptrace scope allows), and follows the
  command's subprocesses: a served run's engine process and its load client are profiled beside the
  server's threads. The command runs under a small Python trampoline that keeps its exit status, which
  py-spy does not pass on; this command exits with it. It runs in this command's process group, which
  is ended when py-spy returns: nothing of it outlives the profile.
- Samples are read without pausing the processes (`--nonblocking`), `--rate` times a second. py-spy does
  not record a thread that is waiting (in epoll, a lock, a sleep), so a thread's samples divided by the
  rate are the seconds it was busy: its CPU and its time in system calls.
- The report lists every process and thread by busy seconds, then for each one with at least
  `MIN_SHARE` of all samples its functions by the share of its samples they were on the stack for
  (inclusive) and the lines the samples stopped in (self). Python frames only: time in C (a system
  call, a pydantic-core validation) counts on the Python line that called it, and a coroutine that
  asyncio's C task resumes shows without the event loop's frames above it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MIN_SHARE = 0.02  # threads below this share of all samples get a line in the list, not a section
TOP_INCLUSIVE, TOP_SELF = 30, 20
# Runs the command and keeps its exit status (argv: status file, command...).
_TRAMPOLINE = (
    "import subprocess, sys; rc = subprocess.call(sys.argv[2:]); open(sys.argv[1], 'w').write(str(rc))"
)
_PROCESS = re.compile(r'^process (\d+):"(.*)"$', re.S)
_THREAD = re.compile(r"^thread \((\d+)\)(?:: (.*))?$")
_LOCATION = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")


@dataclass(slots=True)
class ThreadSamples:
    process: str
    thread: str
    samples: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    self_lines: Counter[str] = field(default_factory=Counter)


def process_label(pid: str, cmdline: str) -> str:
    """A short name for a process: the module it runs (`-m X`) or its script, and its pid."""
    words = cmdline.split()
    flags = [word for word in words if word in ("-m", "-c")]  # the first one ends the interpreter's options
    if "multiprocessing.spawn" in cmdline or "multiprocessing.forkserver" in cmdline:
        name = "multiprocessing child"
    elif flags[:1] == ["-m"] and words.index("-m") + 1 < len(words):
        name = words[words.index("-m") + 1]
    elif flags[:1] == ["-c"]:
        name = "python -c"
    else:
        name = Path(words[-1] if len(words) > 1 else words[0]).name if words else "?"
    return f"{name} [{pid}]"


def _function(frame: str) -> tuple[str, str]:
    """(`func (file)`, `func (file:line)`) of one py-spy frame."""
    match = _LOCATION.match(frame)
    if match is None:
        return frame, frame
    func, path, line = match.groups()
    short = "/".join(Path(path).parts[-2:])
    return f"{func} ({short})", f"{func} ({short}:{line})" if line else f"{func} ({short})"


def _frames(stack: str) -> list[str]:
    """A stack's frames: split at `;`, but a process frame's quoted command line may hold `;` too."""
    frames: list[str] = []
    pieces = iter(stack.split(";"))
    for piece in pieces:
        if piece.startswith("process ") and ':"' in piece:
            while not piece.endswith('"'):
                piece += ";" + next(pieces, '"')
        frames.append(piece)
    return frames


def parse(raw: str) -> dict[tuple[str, str], ThreadSamples]:
    """py-spy's raw output (`record --format raw --threads --subprocesses`) by (process, thread)."""
    threads: dict[tuple[str, str], ThreadSamples] = {}
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        process, thread, frames = "?", "?", []
        for frame in _frames(stack):
            if (match := _PROCESS.match(frame)) is not None:
                process = process_label(*match.groups())
            elif (match := _THREAD.match(frame)) is not None:
                thread = match.group(2) or f"thread {match.group(1)}"
            else:
                frames.append(_function(frame))
        entry = threads.setdefault((process, thread), ThreadSamples(process, thread))
        n = int(count)
        entry.samples += n
        for func in {func for func, _ in frames}:
            entry.inclusive[func] += n
        if frames:
            entry.self_lines[frames[-1][1]] += n
    return threads


def report(threads: dict[tuple[str, str], ThreadSamples], rate: int, header: str) -> str:
    total = sum(t.samples for t in threads.values()) or 1
    ranked = sorted(threads.values(), key=lambda t: -t.samples)
    lines = [header, "", f"busy seconds by process and thread (samples / {rate} Hz):"]
    lines += [f"{t.samples / rate:9.2f} s  {t.process} / {t.thread}" for t in ranked]
    for t in ranked:
        if t.samples < MIN_SHARE * total:
            continue
        lines += ["", f"== {t.process} / {t.thread}: {t.samples / rate:.2f} s busy", "on the stack:"]
        lines += [
            f"  {100 * n / t.samples:5.1f}%  {func}" for func, n in t.inclusive.most_common(TOP_INCLUSIVE)
        ]
        lines.append("where the samples stopped:")
        lines += [
            f"  {100 * n / t.samples:5.1f}%  {where}" for where, n in t.self_lines.most_common(TOP_SELF)
        ]
    return "\n".join(lines) + "\n"


def py_spy_command(py_spy: str, raw: Path, rate: int, status: Path, command: list[str]) -> list[str]:
    return [
        py_spy, "record", "--rate", str(rate), "--threads", "--subprocesses", "--nonblocking",
        "--format", "raw", "--output", str(raw), "--",
        sys.executable, "-c", _TRAMPOLINE, str(status), *command,
    ]  # fmt: skip


def _stop_the_rest() -> None:
    """Ends whatever py-spy left of the command (it may stop sampling and exit while the command runs
    on): everything in this process group but this process."""
    ignored = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, ignored)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=Path, required=True, help="where the text report goes")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw samples here")
    p.add_argument("--rate", type=int, default=200, help="samples a second")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to profile")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to profile after --")
    if args.rate <= 0:
        p.error("--rate must be positive")
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        p.error("py-spy is not installed (pip install py-spy, or kiln[bench])")
    if os.getpgrp() != os.getpid():
        os.setpgrp()  # a group of its own: what it starts can be stopped with it (benchmarks.targets does)
    with tempfile.TemporaryDirectory(prefix="kiln-host-profile-") as tmp:
        raw = args.raw or Path(tmp, "samples.raw")
        status = Path(tmp, "status")
        started = time.monotonic()
        try:
            spy = subprocess.run(py_spy_command(py_spy, raw, args.rate, status, command))
        finally:
            _stop_the_rest()
        wall = time.monotonic() - started
        if not status.exists():
            print(f"py-spy exited with {spy.returncode} before the command finished", file=sys.stderr)
            return spy.returncode or 1
        returncode = int(status.read_text())
        samples = raw.read_text() if raw.exists() else ""
    header = f"host profile: py-spy at {args.rate} Hz, {wall:.1f} s, exit {returncode}\ncommand: {shlex.join(command)}"
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report(parse(samples), args.rate, header))
    print(f"wrote {args.report}")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
