"""What the container test needs on the host: a Docker engine, a local base image, pip's indexes.

Nothing here comes from outside the machine except Debian's mirror (docker.io, mmdebstrap, the base
image's packages) and the indexes in the host's own pip configuration. No registry is reachable, so:

- the base image is made here with mmdebstrap and `docker import` (the Dockerfile's CPU_IMAGE);
- the Dockerfile's `# syntax=docker/dockerfile:1-labs` frontend cannot be pulled, and the builder built
  into dockerd cannot parse the GPU stages' labs flags (`RUN --device`): the image is built from
  `target_dockerfile(...)`, the Dockerfile's own text cut down to the stages the target needs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from system_packages import apt_install, can_install_packages, run

# What the test measured, printed at the end of the run by tests/container/conftest.py.
TIMINGS: dict[str, str] = {}

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"  # Python 3.11: the CPU torch wheel on the dev/CI machines is cp311
BASE_PACKAGES = "python3,python3-venv"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
NEEDS_ROOT_FOR = "install docker.io and mmdebstrap, or start dockerd"  # what a skip says it could not do


# --- the Dockerfile, cut down to one target -------------------------------------------------------------

_FROM = re.compile(r"^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE)
_FROM_REF = re.compile(r"--from=([^\s,]+)|--mount=\S*\bfrom=([^\s,]+)")


def _split_stages(text: str) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    """(header lines, [(stage name, its base, its lines)]) — comments above a FROM go with that stage."""
    lines = text.splitlines()
    starts = [
        i
        for i, line in enumerate(lines)
        if _FROM.match(line) and not (i and lines[i - 1].rstrip().endswith("\\"))
    ]
    if not starts:
        raise ValueError("no FROM in the Dockerfile")
    cuts = []
    for start in starts:  # move each cut above the comment block that introduces the stage
        cut = start
        while cut > 0 and lines[cut - 1].startswith("#"):
            cut -= 1
        cuts.append(cut)
    header = lines[: cuts[0]]
    stages = []
    for n, (cut, start) in enumerate(zip(cuts, starts, strict=True)):
        end = cuts[n + 1] if n + 1 < len(cuts) else len(lines)
        match = _FROM.match(lines[start])
        assert match is not None
        base, name = match.group(1), match.group(2) or f"<stage {n}>"
        stages.append((name, base, lines[cut:end]))
    return header, stages


def target_dockerfile(text: str, target: str) -> str:
    """The stages `target` depends on (FROM, COPY --from, RUN --mount from=), in the file's order, with
    the global ARGs and without the `# syntax=` directive: what the builder built into dockerd parses."""
    header, stages = _split_stages(text)
    by_name = {name: (base, body) for name, base, body in stages}
    if target not in by_name:
        raise ValueError(f"no stage {target!r}")
    needed: set[str] = set()
    todo = [target]
    while todo:
        name = todo.pop()
        if name in needed or name not in by_name:
            continue  # an image, not a stage
        needed.add(name)
        base, body = by_name[name]
        todo.append(base)
        for line in body:
            if line.lstrip().startswith("#"):
                continue
            for ref in _FROM_REF.findall(line):
                todo.extend(r for r in ref if r)
    kept = [line for line in header if not re.match(r"#\s*syntax\s*=", line, re.IGNORECASE)]
    for name, _base, body in stages:
        if name in needed:
            kept.extend(body)
    return "\n".join(kept) + "\n"


# --- the Docker engine -----------------------------------------------------------------------------------


@dataclass
class Docker:
    """A docker CLI that builds with BuildKit (for `--secret`), and the engine it talks to."""

    cli: str
    env: dict[str, str]
    build: list[
        str
    ]  # the build command: [cli, "build"] with DOCKER_BUILDKIT=1, or [cli, "buildx", "build", "--load"]
    daemon: subprocess.Popen[bytes] | None = None  # set when this test started the engine
    root: Path | None = None  # the private engine's data and state
    cleanup: list[list[str]] = field(default_factory=list)

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], env=self.env, timeout=timeout, check=check)


def _buildkit_cli(env: dict[str, str]) -> tuple[str, list[str]] | None:
    """A docker CLI that can build with BuildKit: one with buildx, or a pre-23 one (BuildKit built in)."""
    candidates = [shutil.which("docker", path=env.get("PATH")), "/usr/bin/docker"]
    for cli in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        if run([cli, "buildx", "version"], env=env, check=False, timeout=60).returncode == 0:
            return cli, [cli, "buildx", "build", "--load"]
        version = run([cli, "version", "--format", "{{.Client.Version}}"], env=env, check=False, timeout=60)
        major = re.match(r"(\d+)\.", version.stdout.strip())
        if major and int(major.group(1)) < 23:
            return cli, [cli, "build"]
    return None


def _engine_answers(cli: str, env: dict[str, str]) -> bool:
    return (
        run([cli, "info", "--format", "{{.ServerVersion}}"], env=env, check=False, timeout=60).returncode == 0
    )


@contextlib.contextmanager
def docker_engine() -> Iterator[Docker]:
    """A running Docker engine: the one already answering, else a private dockerd started here (data,
    state and socket in a temporary folder, removed afterwards), installing docker.io first if needed.
    Raises `Unavailable` with the reason when this machine cannot do that (no apt-get, not root)."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    found = _buildkit_cli(env)
    if found is None or not _engine_answers(found[0], env):
        reason = can_install_packages(NEEDS_ROOT_FOR)
        if reason is not None:
            raise Unavailable(reason)
        if found is None or shutil.which("dockerd") is None:
            apt_install("docker.io")
            found = _buildkit_cli(env)
            if found is None:
                raise AssertionError("docker.io is installed but no docker CLI here builds with BuildKit")
    if _engine_answers(found[0], env):  # (an init system may have started the one just installed)
        docker = Docker(cli=found[0], env=env, build=found[1])
        try:
            yield docker
        finally:
            _clean(docker)
        return
    root = Path(tempfile.mkdtemp(prefix="kiln-docker-"))
    env["DOCKER_HOST"] = f"unix://{root}/docker.sock"
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - open while the daemon runs
    daemon = subprocess.Popen(
        [
            "dockerd",
            f"--host={env['DOCKER_HOST']}",
            f"--data-root={root}/data",
            f"--exec-root={root}/exec",
            f"--pidfile={root}/dockerd.pid",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    docker = Docker(cli=found[0], env=env, build=found[1], daemon=daemon, root=root)
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers(docker.cli, env):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("dockerd did not start:\n" + (root / "dockerd.log").read_text()[-4000:])
            time.sleep(0.5)
        yield docker
    finally:
        _clean(docker)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


class Unavailable(Exception):
    """This machine cannot run Docker for the test (the message says why)."""


def _clean(docker: Docker) -> None:
    for command in reversed(docker.cleanup):
        docker(*command, check=False, timeout=120)


def debian_base_image(docker: Docker, tag: str, workdir: Path) -> float:
    """Build `tag`: Debian with Python 3.11 and venv, from the Debian mirror (mmdebstrap, `docker import`).
    Returns the seconds it took."""
    started = time.monotonic()
    if shutil.which("mmdebstrap") is None:
        reason = can_install_packages(NEEDS_ROOT_FOR)
        if reason is not None:
            raise Unavailable(reason)
        apt_install("mmdebstrap")
    tarball = workdir / "base.tar"
    run(
        [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            DEBIAN_SUITE,
            str(tarball),
            DEBIAN_MIRROR,
        ],
        timeout=900,
    )
    docker("import", str(tarball), tag, timeout=300)
    docker.cleanup.append(["rmi", "-f", tag])
    tarball.unlink()
    return time.monotonic() - started


# --- pip's indexes, as the image build sees them ---------------------------------------------------------


def _pip_config() -> dict[str, str]:
    """pip's effective configuration here (files and PIP_* variables), `name -> value`."""
    done = run([sys.executable, "-m", "pip", "config", "list"], timeout=60)
    order = {"global": 0, "install": 1, ":env:": 2}  # later wins, as in pip
    found: dict[str, tuple[int, str]] = {}
    for line in done.stdout.splitlines():
        match = re.match(r"^(.+?)\.([a-z0-9-]+)='(.*)'$", line)
        if not match or match.group(1) not in order:
            continue
        rank = order[match.group(1)]
        name, value = match.group(2), match.group(3)
        if name not in found or found[name][0] <= rank:
            found[name] = (rank, value)
    return {name: value for name, (_rank, value) in found.items()}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def pip_build_args(workdir: Path) -> Iterator[tuple[dict[str, str], str | None]]:
    """(build args, CA bundle for the `pip_cert` secret) that make pip in the image build use this host's
    indexes. Local folders and file:// indexes are served over HTTP on 127.0.0.1 while the context is
    open (the build runs with --network host); an http(s) index is passed as it is, unless it carries
    credentials, which would stay in `docker history`."""
    config = _pip_config()
    served = workdir / "pip-served"
    served.mkdir()
    handler = functools.partial(_Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    count = 0

    def reachable(location: str, *, index: bool) -> str:
        nonlocal count
        parts = urlsplit(location)
        if parts.scheme in ("http", "https"):
            if parts.username or parts.password:
                raise AssertionError(f"pip index {parts.hostname} has credentials in its URL")
            return location
        path = Path(unquote(parts.path) if parts.scheme == "file" else location)
        if not path.exists():
            return ""
        count += 1
        # An index's pages link to files next to it (../../files/...): serve its parent folder.
        (served / str(count)).symlink_to(path.parent if index else path)
        return f"{base}/{count}/{path.name}/" if index else f"{base}/{count}/"

    args = {}
    if config.get("index-url"):
        args["PIP_INDEX_URL"] = reachable(config["index-url"], index=True)
    # Always set: replaces the Dockerfile's default (PyTorch's index) with exactly what the host uses.
    args["PIP_EXTRA_INDEX_URL"] = " ".join(
        filter(None, (reachable(u, index=True) for u in config.get("extra-index-url", "").split()))
    )
    links = " ".join(filter(None, (reachable(u, index=False) for u in config.get("find-links", "").split())))
    if links:
        args["PIP_FIND_LINKS"] = links
    if config.get("trusted-host"):
        args["PIP_TRUSTED_HOST"] = config["trusted-host"]
    cert = config.get("cert") or (SYSTEM_CA_BUNDLE if Path(SYSTEM_CA_BUNDLE).exists() else None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield args, cert
    finally:
        server.shutdown()
        server.server_close()


# --- what an image holds ---------------------------------------------------------------------------------

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.DOTALL)


def certificates(pem: bytes) -> set[bytes]:
    """The certificates of a PEM bundle, each as its base64 text without line breaks."""
    return {re.sub(rb"\s+", b"", body) for body in _PEM.findall(pem)}


def certificate_needles(pem: bytes, keep: set[bytes]) -> list[bytes]:
    """For each certificate of `pem` in `keep`: its second base64 line, as the file has it (64
    characters that appear nowhere but in that certificate)."""
    needles = []
    for body in _PEM.findall(pem):
        lines = body.split()
        if re.sub(rb"\s+", b"", body) in keep and len(lines) > 2:
            needles.append(lines[1])
    return needles


def scan_image(docker: Docker, image: str, needles: list[bytes], digest: str) -> list[str]:
    """Files in any layer of `image` (`docker save`, streamed: a file a later layer deletes counts too)
    that contain one of `needles` or whose sha256 is `digest`, as "layer: path"."""
    found: list[str] = []
    with subprocess.Popen([docker.cli, "save", image], env=docker.env, stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        with tarfile.open(fileobj=save.stdout, mode="r|") as archive:
            layers = 0
            for entry in archive:
                if not (entry.isfile() and entry.name.endswith("layer.tar")):
                    continue
                layers += 1
                layer = archive.extractfile(entry)
                assert layer is not None
                with tarfile.open(fileobj=layer, mode="r|") as files:
                    for member in files:
                        if member.isfile() and _holds(files, member, needles, digest):
                            found.append(f"{entry.name}: {member.name}")
        assert save.wait(timeout=600) == 0, "docker save failed"
    assert layers > 0, "docker save gave no layers"
    return found


def _holds(files: tarfile.TarFile, member: tarfile.TarInfo, needles: list[bytes], digest: str) -> bool:
    stream = files.extractfile(member)
    assert stream is not None
    hasher, tail, hit = hashlib.sha256(), b"", False
    while chunk := stream.read(8 << 20):
        hasher.update(chunk)
        window = tail + chunk
        hit = hit or any(needle in window for needle in needles)
        tail = window[-128:]
    return hit or hasher.hexdigest() == digest
