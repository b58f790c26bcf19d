"""What the browser tests need on the host: Debian's chromium and chromedriver, a slowed `kiln serve`.

Chromium comes from Debian's mirror, as docker.io does for tests/container, with the same policy and
code (tests/system_packages.py): when `chromium` or `chromedriver` is missing, `browser_binaries()`
installs the `chromium` and `chromium-driver` packages with apt-get, under a machine-wide lock (and apt's
own lock waited for, not failed on); without apt-get or root it raises `Unavailable` with the reason, and
the tests skip saying so. An install that fails is an error, never a skip.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_harness import start_cli_server
from system_packages import apt_install, can_install_packages, machine_lock

PACKAGES = ("chromium", "chromium-driver")
CHROMIUM, CHROMEDRIVER = "chromium", "chromedriver"
SLOW_SERVE = Path(__file__).resolve().with_name("slow_serve.py")


class Unavailable(Exception):
    """This machine cannot run the browser for the tests (the message says why)."""


def _found() -> tuple[str, str] | None:
    chromium, driver = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    return (chromium, driver) if chromium and driver else None


def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installing Debian's packages first when either is missing."""
    found = _found()
    if found is not None:
        return found
    reason = can_install_packages(f"install {' and '.join(PACKAGES)}")
    if reason is not None:
        raise Unavailable(reason)
    with machine_lock("browser", timeout=1500):
        if _found() is None:  # (a run beside this one may have installed them meanwhile)
            apt_install(*PACKAGES)
    found = _found()
    if found is None:
        raise AssertionError(
            f"{' and '.join(PACKAGES)} are installed but {CHROMIUM} or {CHROMEDRIVER} is not on PATH"
        )
    return found


# --- the server ---------------------------------------------------------------------------------------


def start_slow_server(
    checkpoint: Path, step_delay: float, *flags: str
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """`kiln serve CHECKPOINT FLAGS...` with each engine step `step_delay` s slower (slow_serve.py), on a
    free port, once ready: (process, URL, stderr lines). The engine runs on the server's thread, where
    slow_serve.py's patch reaches it."""
    launcher = [str(SLOW_SERVE), str(step_delay)]
    return start_cli_server(checkpoint, "--no-engine-process", *flags, launcher=launcher)


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics: the sample `name` whose labels include `labels` (0 if none)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0
