"""SIGTERM on `kiln serve`: stop accepting, let the in-flight stream finish, exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from server_harness import wait_for

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 600


def start_server(checkpoint: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "kiln.cli", "serve", str(checkpoint), "--port", "0"]
    command += ["--served-model-name", "tiny", "--drain-timeout-seconds", "60", "--num-kv-blocks", "256"]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout=120):
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(log))
    # The port opens before the weights load; wait until the model is ready.
    if not wait_for(lambda: _ready(url[0]), timeout=120):
        proc.kill()
        raise AssertionError("server never became ready:\n" + "".join(log))
    return proc, url[0], log


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_finishes_the_in_flight_stream_then_exits_0(tiny_gqa_dir: Path) -> None:
    proc, url, log = start_server(tiny_gqa_dir)
    try:
        body = {
            "prompt": "Once upon a time",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = threading.Event()
        lines: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if line.startswith("data: {"):
                        started.set()

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        chunks_at_signal = sum(line.startswith("data: {") for line in list(lines))

        def refused() -> bool:
            try:
                httpx.get(f"{url}/health", timeout=1)
            except httpx.TransportError:
                return True
            return False

        assert wait_for(refused, timeout=30), "still accepting connections while draining"
        client.join(timeout=120)
        payloads = [line[6:] for line in lines if line.startswith("data: ")]
        assert chunks_at_signal < len(payloads) - 2, "the stream was not in flight at SIGTERM"
        assert payloads[-1] == "[DONE]"
        usage = json.loads(payloads[-2])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS
        assert proc.wait(timeout=60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
