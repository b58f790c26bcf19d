"""`kiln serve --repository DIR` as a user runs it: engines in child processes, a new version promoted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from server_harness import REPO, wait_for
from typer.testing import CliRunner

import kiln.cli
from kiln.build.native import build_engine
from kiln.build.tiny import write_tiny_checkpoint

ADMIN = {"Authorization": "Bearer k"}


def test_rollout_flags_need_a_repository() -> None:
    result = CliRunner().invoke(kiln.cli.app, ["serve", "--tiny", "--port", "0", "--canary-steps", "0.5"])
    assert result.exit_code == 1
    assert "--canary-steps only apply with --repository" in result.output


def test_repository_and_model_exclude_each_other(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        kiln.cli.app, ["serve", "--tiny", "--port", "0", "--repository", str(tmp_path)]
    )
    assert result.exit_code == 1 and "not both" in result.output
    empty = CliRunner().invoke(kiln.cli.app, ["serve", "--port", "0", "--repository", str(tmp_path)])
    assert empty.exit_code == 1 and "holds 0 models" in empty.output


def test_kiln_serve_repository_promotes_a_new_version(tmp_path: Path) -> None:
    for seed in (0, 1):
        checkpoint = write_tiny_checkpoint(tmp_path / f"ckpt{seed}", seed=seed)
        build_engine(checkpoint, tmp_path / f"engine{seed}", dtype="float32", progress=False)
    repo = tmp_path / "repo"
    shutil.copytree(tmp_path / "engine0", repo / "tiny" / "1")
    command = [sys.executable, "-m", "kiln.cli", "serve", "--repository", str(repo), "--port", "0"]
    command += ["--admin-key", "k", "--num-kv-blocks", "128", "--repository-poll-seconds", "0.2"]
    command += ["--canary-steps", "0.5", "--canary-step-seconds", "0.2", "--canary-min-requests", "2"]
    # Latency cannot decide here: on a busy 2-core machine one slow step of the new engine's first requests
    # tripped the 1.5x rule (23 ms p99 ITL against 1.2 ms). The latency rule's own tests are the judge's.
    command += ["--canary-max-latency-ratio", "1000"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    log: list[str] = []
    url: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                url.append(found.group(1))

    threading.Thread(target=read, daemon=True).start()
    try:
        assert wait_for(lambda: bool(url), timeout=120), "".join(log)
        base = url[0]
        assert wait_for(lambda: httpx.get(f"{base}/ready").status_code == 200, timeout=120), "".join(log)
        assert "Loading tiny version 1" in "".join(log)
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
        first = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert (first["model"], first["system_fingerprint"]) == ("tiny", "tiny/1")
        shutil.copytree(tmp_path / "engine1", repo / "tiny" / ".2")
        (repo / "tiny" / ".2").rename(repo / "tiny" / "2")

        def promoted() -> bool:
            httpx.post(f"{base}/v1/completions", json=body, timeout=60)  # traffic for the canary to be judged
            return httpx.get(f"{base}/admin/versions", headers=ADMIN).json()["stable"] == 2

        assert wait_for(promoted, timeout=120), "".join(log)
        after = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert after["system_fingerprint"] == "tiny/2"
        assert after["choices"][0]["text"] != first["choices"][0]["text"]  # other weights answer
        assert "version 2: promoted" in "".join(log)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, "".join(log)


@pytest.mark.parametrize("steps", ["0.5,0.2", "0", "1"])
def test_canary_steps_are_checked(steps: str) -> None:
    result = CliRunner().invoke(
        kiln.cli.app, ["serve", "--port", "0", "--repository", ".", "--canary-steps", steps]
    )
    assert result.exit_code == 2 and "canary-steps" in result.output
