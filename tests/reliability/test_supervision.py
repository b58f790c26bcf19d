"""The engine process dies or stops answering under `kiln serve`: streams end with an error and [DONE],
/ready goes 503, the engine restarts (counted), and past the restart limit the server exits non-zero."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
from server_harness import longest_stream_body, start_cli_server, stream_in_background, wait_for


def _engine_pid(server_pid: int) -> int:
    """The engine's child process: multiprocessing's spawned child of the server process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server_pid and b"spawn_main" in cmdline:
            return int(entry.name)
    raise AssertionError("no engine process found")


def _status(url: str, path: str) -> int | None:
    try:
        return httpx.get(f"{url}{path}", timeout=2).status_code
    except httpx.TransportError:
        return None


def test_a_dead_or_stuck_engine_is_restarted_then_the_server_gives_up(tiny_gqa_dir: Path) -> None:
    flags = ["--engine-check-interval-seconds", "0.2", "--engine-check-timeout-seconds", "2"]
    proc, url, log = start_cli_server(tiny_gqa_dir, *flags, "--max-engine-restarts", "2")
    try:
        # 1. SIGKILL mid-stream: the stream ends with an error event and [DONE], never a hang.
        stream = stream_in_background(url, longest_stream_body(url))
        assert stream.started.wait(timeout=60)
        os.kill(_engine_pid(proc.pid), signal.SIGKILL)
        stream.thread.join(timeout=30)
        assert not stream.thread.is_alive(), "the stream hung after the engine died"
        payloads = stream.payloads()
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["error"]["code"] == "engine_failed"

        # 2. It is seen down within a check or two, then restarts: ready again, serving again, counted.
        assert wait_for(lambda: _status(url, "/ready") == 503, timeout=10)
        assert wait_for(lambda: _status(url, "/ready") == 200, timeout=60), "".join(log)
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 3}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert "kiln_engine_restarts_total 1.0" in httpx.get(f"{url}/metrics").text

        # 3. Stuck (SIGSTOP): it stops answering, /ready says so, and it is replaced.
        os.kill(_engine_pid(proc.pid), signal.SIGSTOP)
        assert wait_for(lambda: _status(url, "/ready") == 503, timeout=10)
        assert _status(url, "/health") == 200  # restarting: the process is still worth keeping
        assert wait_for(lambda: _status(url, "/ready") == 200, timeout=60), "".join(log)
        assert "kiln_engine_restarts_total 2.0" in httpx.get(f"{url}/metrics").text

        # 4. Past the limit: the server gives up and exits with an error for the orchestrator.
        os.kill(_engine_pid(proc.pid), signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
        assert any("not restarted" in line for line in log), "".join(log[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
