"""SIGTERM on `kiln serve`: stop accepting, let the in-flight stream finish, exit 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
from server_harness import longest_stream_body, start_cli_server, stream_in_background, wait_for

MAX_TOKENS = 600


def test_sigterm_finishes_the_in_flight_stream_then_exits_0(tiny_gqa_dir: Path) -> None:
    proc, url, log = start_cli_server(tiny_gqa_dir, "--drain-timeout-seconds", "60")
    try:
        body = {
            "prompt": "Once upon a time",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        stream = stream_in_background(url, body)
        assert stream.started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        chunks_at_signal = sum(line.startswith("data: {") for line in list(stream.lines))

        def refused() -> bool:
            try:
                httpx.get(f"{url}/health", timeout=1)
            except httpx.TransportError:
                return True
            return False

        assert wait_for(refused, timeout=30), "still accepting connections while draining"
        stream.thread.join(timeout=120)
        payloads = stream.payloads()
        assert chunks_at_signal < len(payloads) - 2, "the stream was not in flight at SIGTERM"
        assert payloads[-1] == "[DONE]"
        usage = json.loads(payloads[-2]).get("usage")
        assert usage is not None, payloads[-3:]
        assert usage["completion_tokens"] == MAX_TOKENS
        assert proc.wait(timeout=60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_drain_that_runs_out_ends_each_stream_with_an_error_and_done(tiny_gqa_dir: Path) -> None:
    """Streams still running when the drain timeout ends get an error event naming the shutdown and
    `[DONE]` (the openai client raises on it), never a silent truncation; the exit is still 0."""
    proc, url, log = start_cli_server(tiny_gqa_dir, "--drain-timeout-seconds", "0.5")
    try:
        stream = stream_in_background(url, longest_stream_body(url))
        assert stream.started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        stream.thread.join(timeout=60)
        payloads = stream.payloads()
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "draining" and "drain timeout" in error["message"]
        assert proc.wait(timeout=60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
