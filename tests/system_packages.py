"""Debian packages the host-level tests install for themselves (docker.io for tests/container, chromium for
tests/browser), and the machine-wide lock each of those test runs holds meanwhile.

The policy both share: a missing package is installed with apt-get (apt's own lock waited for, not failed
on: the two test folders may install at once); without apt-get or root, `can_install_packages` says why
and the test skips saying so; an install that fails is an error, never a skip.

Imported as `system_packages`: tests/ has no __init__.py, so pytest puts it on sys.path with tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def run(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True, **kwargs
) -> subprocess.CompletedProcess[str]:
    """`args` run to the end, output captured; with `check`, a non-zero exit fails with both outputs' tails."""
    done = subprocess.run(
        args, env=env, timeout=timeout, capture_output=True, text=True, check=False, **kwargs
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}"
            f"\n--- stderr\n{done.stderr[-6000:]}"
        )
    return done


def can_install_packages(purpose: str) -> str | None:
    """None when apt-get can install Debian packages here, else why not (the reason to skip), naming
    `purpose` (e.g. "install chromium and chromium-driver")."""
    if shutil.which("apt-get") is None:
        return f"no apt-get on this machine to {purpose}"
    if os.geteuid() != 0:
        return f"not root: cannot {purpose}"
    return None


def apt_install(*packages: str) -> None:
    """Install those of `packages` that dpkg does not have yet (none missing: apt is not run)."""
    missing = [p for p in packages if run(["dpkg", "-s", p], check=False).returncode != 0]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another apt run (the other test folder's, say) finishes first rather than failing this one.
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=600"]
    run(["apt-get", *wait_for_lock, "update", "-qq"], env=env, timeout=900)
    run(
        ["apt-get", *wait_for_lock, "install", "-y", "-qq", "--no-install-recommends", *missing],
        env=env,
        timeout=1200,
    )


@contextlib.contextmanager
def machine_lock(name: str, timeout: float) -> Iterator[None]:
    """Hold the machine-wide lock `name` (a file in the temporary folder): two runs of the same tests at
    once would race for apt's lock (and, for the container test, docker0)."""
    with open(Path(tempfile.gettempdir()) / f"kiln-{name}-test.lock", "w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"another {name} test run held the lock too long") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
