"""The CPU image for real: the Dockerfile's `cpu` target, built with the tiny model, run, and used from
the host — an OpenAI chat completion, its HEALTHCHECK, a non-root user, no build secret left in it — then
`docker stop` with streams in flight: they finish, and the container exits 0.

Needs a Docker engine: the one running, or else this installs docker.io and mmdebstrap from Debian's
mirror and starts a private dockerd (root and apt-get needed; without them it skips, saying so). The base
image is made from the Debian mirror; pip in the build uses this host's own indexes and CA bundle (a build
secret). Nothing is cached between runs. About 3 minutes on 2 cores; the times are printed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from container_host import (
    TIMINGS,
    Docker,
    Unavailable,
    certificate_needles,
    certificates,
    debian_base_image,
    docker_engine,
    pip_build_args,
    scan_image,
    target_dockerfile,
)
from system_packages import machine_lock

pytestmark = pytest.mark.timeout(1800)  # setup included: installing docker.io, the base image, the build

ROOT = Path(__file__).resolve().parents[2]
USER = "10001:10001"
DRAIN_TIMEOUT = 120  # generous: the streams must end by themselves, even on a busy machine
STREAMS, MAX_TOKENS = 2, 900  # the tiny model's context is 1024 tokens


def test_the_cpu_target_cut_from_the_dockerfile_needs_no_labs_frontend() -> None:
    """What the image build below gets: the Dockerfile's own lines for the stages of `cpu`, without the
    `# syntax=` line (a frontend image from a registry) and the GPU stages (labs flags)."""
    text = (ROOT / "Dockerfile").read_text()
    cut = target_dockerfile(text, "cpu")
    assert re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", cut, flags=re.M) == [
        "model",
        "cpu-base",
        "cpu-build",
        "cpu",
    ]
    assert set(cut.splitlines()) <= set(text.splitlines())
    assert not re.search(r"^#\s*syntax\s*=", cut, flags=re.M)
    assert not [line for line in cut.splitlines() if "--device" in line and not line.startswith("#")]
    assert "ARG CPU_IMAGE=" in cut


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


@dataclass
class Image:
    docker: Docker
    tag: str
    base: str
    cert: str | None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    work = tmp_path_factory.mktemp("cpu-image")
    with contextlib.ExitStack() as stack:
        stack.enter_context(machine_lock("container", timeout=1500))
        started = time.monotonic()
        try:
            docker = stack.enter_context(docker_engine())
        except Unavailable as exc:
            pytest.skip(f"cannot build or run images on this machine: {exc}")
        TIMINGS["docker engine ready"] = _seconds(time.monotonic() - started)
        suffix = uuid.uuid4().hex[:12]
        base = os.environ.get("KILN_CONTAINER_BASE_IMAGE")  # a base made earlier (local iteration only)
        if base is None:
            base = f"kiln-test-base:{suffix}"
            try:
                seconds = debian_base_image(docker, base, work)
            except Unavailable as exc:
                pytest.skip(f"cannot make the base image on this machine: {exc}")
            TIMINGS["base image (mmdebstrap + import)"] = _seconds(seconds)
        dockerfile = work / "Dockerfile.cpu"
        dockerfile.write_text(target_dockerfile((ROOT / "Dockerfile").read_text(), "cpu"))
        tag = f"kiln-test-cpu:{suffix}"
        args, cert = stack.enter_context(pip_build_args(work))
        command = [*docker.build, "--no-cache", "--progress=plain", "--network=host", "--target=cpu"]
        command += ["-f", str(dockerfile), "-t", tag, "--build-arg", f"CPU_IMAGE={base}"]
        command += ["--build-arg", "TINY=1"]
        for name, value in args.items():
            command += ["--build-arg", f"{name}={value}"]
        if cert is not None:
            command += ["--secret", f"id=pip_cert,src={cert}"]
        command.append(str(ROOT))
        docker.cleanup.append(["rmi", "-f", tag])
        started = time.monotonic()
        log = work / "build.log"
        with open(log, "w") as out:
            done = subprocess.run(
                command, cwd=ROOT, env=docker.env, stdout=out, stderr=subprocess.STDOUT, timeout=1200
            )
        assert done.returncode == 0, f"docker build exited {done.returncode}:\n" + log.read_text()[-8000:]
        TIMINGS["image build"] = _seconds(time.monotonic() - started)
        size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
        TIMINGS["image size"] = f"{size / 1e9:.2f} GB"
        yield Image(docker=docker, tag=tag, base=base, cert=cert)
        (work / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
        TIMINGS["written to"] = str(work / "timings.json")


@dataclass
class Container:
    docker: Docker
    name: str
    url: str
    started: float

    def inspect(self, template: str) -> str:
        return self.docker("inspect", "--format", template, self.name).stdout.strip()

    def log_tail(self) -> str:
        """The container's state (exit code, error, OOM kill) and the end of its output, both streams:
        what a container that stopped before it was ready left behind."""
        logs = self.docker("logs", "--tail", "60", self.name, check=False)
        state = self.docker("inspect", "--format", "{{json .State}}", self.name, check=False).stdout.strip()
        return f"state: {state}\nstdout:\n{logs.stdout[-3000:]}\nstderr:\n{logs.stderr[-6000:]}"


def _status(url: str, path: str) -> int | None:
    try:
        return httpx.get(url + path, timeout=2).status_code
    except httpx.TransportError:
        return None


@pytest.fixture(scope="module")
def container(image: Image) -> Iterator[Container]:
    docker = image.docker
    name = f"kiln-test-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    docker("run", "--detach", "--name", name, "--publish", "127.0.0.1::8000", "--stop-timeout",
           str(DRAIN_TIMEOUT + 30), "--env", f"KILN_DRAIN_TIMEOUT_SECONDS={DRAIN_TIMEOUT}", image.tag)  # fmt: skip
    docker.cleanup.append(["rm", "-f", name])
    port = docker("port", name, "8000/tcp").stdout.split()[0].rsplit(":", 1)[1]
    box = Container(docker=docker, name=name, url=f"http://127.0.0.1:{port}", started=started)
    deadline = time.monotonic() + 180
    while _status(box.url, "/ready") != 200:
        running = box.inspect("{{.State.Running}}")
        assert running == "true" and time.monotonic() < deadline, "not ready:\n" + box.log_tail()
        time.sleep(0.1)
    TIMINGS["start to ready"] = _seconds(time.monotonic() - started)
    yield box


@pytest.mark.slow
def test_answers_an_openai_chat_completion_from_the_host(container: Container) -> None:
    assert _status(container.url, "/health") == 200
    assert httpx.get(container.url + "/ready", timeout=5).json() == {"status": "ready"}
    client = openai.OpenAI(base_url=container.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=16, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16


@pytest.mark.slow
def test_runs_as_the_non_root_user(container: Container) -> None:
    assert container.inspect("{{.Config.User}}") == USER
    assert container.docker("exec", container.name, "id", "-u").stdout.strip() == "10001"
    status = container.docker("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}, status  # the server itself, PID 1 (exec-form ENTRYPOINT)
    cmdline = container.docker("exec", container.name, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert "serve" in cmdline and cmdline[1].endswith("/kiln"), cmdline


@pytest.mark.slow
def test_healthcheck_reports_healthy(container: Container) -> None:
    configured = json.loads(container.inspect("{{json .Config.Healthcheck}}"))
    assert configured["Test"] == ["CMD", "python3", "/opt/kiln/docker/healthcheck.py"]
    deadline = time.monotonic() + 180  # the first check runs one interval (15 s) after the start
    while (status := container.inspect("{{.State.Health.Status}}")) != "healthy":
        assert status == "starting" and time.monotonic() < deadline, container.inspect(
            "{{json .State.Health}}"
        )
        time.sleep(0.5)
    TIMINGS["start to healthy"] = _seconds(time.monotonic() - container.started)
    log = json.loads(container.inspect("{{json .State.Health.Log}}"))
    assert log and log[-1]["ExitCode"] == 0


@pytest.mark.slow
def test_no_build_secret_or_pip_setting_is_left_in_the_image(image: Image) -> None:
    if image.cert is None:
        pytest.skip("no CA bundle on this host was passed to the build")
    host = Path(image.cert).read_bytes()
    docker = image.docker
    public = certificates(
        docker("run", "--rm", "--entrypoint", "cat", image.base, "/etc/ssl/certs/ca-certificates.crt",
               check=False).stdout.encode()
    )  # fmt: skip
    with contextlib.suppress(ImportError):
        import certifi

        public |= certificates(Path(certifi.where()).read_bytes())
    private = certificates(host) - public  # e.g. a TLS-intercepting proxy's CA: must not ship
    needles = certificate_needles(host, private)
    found = scan_image(docker, image.tag, needles, hashlib.sha256(host).hexdigest())
    assert not found, f"the host's CA bundle (or a certificate only it has) is in a layer: {found}"
    TIMINGS["host-only CA certificates checked absent"] = str(len(needles))
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image.tag).stdout)
    assert not [e for e in config["Env"] if e.startswith(("PIP_INDEX", "PIP_EXTRA", "PIP_FIND", "PIP_CERT"))]
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image.tag).stdout
    assert "ca-certificates.crt" not in history and image.cert not in history


@pytest.mark.slow
def test_docker_stop_drains_in_flight_streams_and_exits_0(container: Container) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines: list[list[tuple[float, str]]] = [[] for _ in range(STREAMS)]
    started = [threading.Event() for _ in range(STREAMS)]
    errors: list[BaseException] = []

    def stream(n: int) -> None:
        try:
            with httpx.stream("POST", container.url + "/v1/chat/completions", json=body, timeout=300) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    lines[n].append((time.monotonic(), line))
                    if line.startswith("data: {"):
                        started[n].set()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            started[n].set()

    clients = [threading.Thread(target=stream, args=(n,), daemon=True) for n in range(STREAMS)]
    for client in clients:
        client.start()
    assert all(event.wait(timeout=120) for event in started) and not errors, errors
    stop_sent = time.monotonic()
    container.docker("stop", container.name, timeout=DRAIN_TIMEOUT + 120)  # SIGTERM; the --stop-timeout
    drained = time.monotonic() - stop_sent
    for client in clients:
        client.join(timeout=60)
    assert not errors, errors
    TIMINGS["drain (docker stop, streams in flight)"] = _seconds(drained)
    exit_code = container.inspect("{{.State.ExitCode}}")
    assert exit_code == "0", f"exit code {exit_code}:\n" + container.log_tail()
    assert container.inspect("{{.State.OOMKilled}}") == "false"
    assert drained < DRAIN_TIMEOUT, "the streams were cut at the drain timeout:\n" + container.log_tail()
    logs = container.log_tail()
    for n, received in enumerate(lines):
        payloads = [line[6:] for _, line in received if line.startswith("data: ")]
        after_stop = sum(1 for at, line in received if at > stop_sent and line.startswith("data: {"))
        assert after_stop > 0, f"stream {n} was not in flight when docker stop was sent"
        assert payloads and payloads[-1] == "[DONE]", (
            f"stream {n} ended without [DONE]: {payloads[-2:]}\n{logs}"
        )
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert not [c for c in chunks if "error" in c], (
            f"stream {n} ended with an error: {chunks[-1]}\n{logs}"
        )
        assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS, chunks[-1]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "length", chunks[-3:]
