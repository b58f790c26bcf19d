"""`kiln serve --tensor-parallel-size 2` on the CPU: the same greedy completion as one rank, behind the
same front end; a worker killed under the server is noticed (the error names the rank), the engine is
restarted with new workers, and past the restart limit the server exits non-zero instead of hanging."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
from server_harness import start_cli_server, wait_for

from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10]
FLAGS = ("--engine-check-interval-seconds", "0.2", "--max-engine-restarts", "1")


def _parent(pid: int) -> int:
    """The parent of `pid` (0 once it is gone): the field after the parenthesised name in /proc/PID/stat."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def _worker_pid(server: int) -> int:
    """The server's tensor-parallel worker: the one process under it running kiln.engine.tp_workers's
    worker_main (a worker left by another run on the machine is not the server's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"kiln.engine.tp_workers" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    found = [pid for pid in found if _descends_from(pid, server)]
    assert len(found) == 1, found
    return found[0]


def test_two_ranks_serve_the_completion_of_one_and_a_dead_rank_ends_the_server(tiny_gqa_dir: Path) -> None:
    one = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", load_progress=False))
    one.add_request("r", params=SamplingParams(temperature=0.0, max_tokens=8), prompt_token_ids=PROMPT)
    want: list[int] = []
    while one.has_unfinished_requests():
        for delta in one.step():
            want.extend(delta.outputs[0].token_ids)

    proc, url, log = start_cli_server(tiny_gqa_dir, "--tensor-parallel-size", "2", *FLAGS)
    try:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == one.tokenizer.decode(want)

        os.kill(
            _worker_pid(proc.pid), signal.SIGKILL
        )  # noticed while idle; the engine restarts, workers and all
        assert wait_for(lambda: "kiln_engine_restarts_total 1.0" in httpx.get(f"{url}/metrics").text, 30)
        assert wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60), "".join(log)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == one.tokenizer.decode(want), r.text

        os.kill(_worker_pid(proc.pid), signal.SIGKILL)
        assert proc.wait(timeout=60) != 0  # past the restart limit: the server exits
        named = lambda: any("tensor-parallel rank 1" in line for line in log)  # noqa: E731
        assert wait_for(named, timeout=5), "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
