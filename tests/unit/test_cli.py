"""The `kiln` CLI: generated serve flags, precedence, help for every flag, build --tiny, error messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.main
from typer.testing import CliRunner

import kiln.cli
import kiln.serve.model_source
import kiln.serve.runner
from kiln.config import EngineConfig
from kiln.errors import OfflineError
from kiln.serve.flags import SETTINGS_FLAGS
from kiln.serve.settings import ServerSettings

runner = CliRunner()


def command(name: str) -> Any:
    return typer.main.get_command(kiln.cli.app).commands[name]  # type: ignore[attr-defined]


def test_serve_has_one_flag_per_setting() -> None:
    options = [p for p in command("serve").params if isinstance(p, typer.core.TyperOption)]
    flags = {p.name for p in options if not p.hidden}
    assert flags == set(SETTINGS_FLAGS) | {"tiny"}
    # A boolean's --no-x is a hidden flag of its own.
    assert {p.opts[0] for p in options if p.hidden} == {
        f"--no-{name.replace('_', '-')}"
        for name, field in ServerSettings.model_fields.items()
        if field.annotation in (bool, bool | None)
    }
    assert set(SETTINGS_FLAGS) == set(ServerSettings.model_fields) - {"model"}


@pytest.mark.parametrize("name", ["serve", "build", "chat", "complete", "models"])  # bench: argparse help
def test_every_flag_has_help(name: str) -> None:
    for param in command(name).params:
        if isinstance(param, typer.core.TyperOption):
            assert param.help, f"kiln {name} {param.opts} has no help"
    result = runner.invoke(kiln.cli.app, [name, "--help"])
    assert result.exit_code == 0, result.output


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def resolve(model: str | None, tiny: bool) -> Path:
        seen.update(model=model, tiny=tiny)
        return Path("/nonexistent/engine")

    monkeypatch.setattr(kiln.cli, "_resolve", resolve)
    # serve begins loading at once (LoadingEngine.begin): nothing to open here.
    monkeypatch.setattr(kiln.cli, "_open", lambda path, config: seen.update(opened=path))
    monkeypatch.setattr(
        kiln.serve.runner,
        "run_server",
        lambda engine, settings: seen.update(engine=engine, settings=settings),
    )
    monkeypatch.setattr(kiln.serve.runner, "configure_logging", lambda level: None)
    return seen


def test_serve_flags_override_environment(captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PORT", "9000")
    monkeypatch.setenv("KILN_HOST", "0.0.0.0")
    args = ["serve", "some/model", "--port", "9100", "--api-keys", "a", "--api-keys", "b", "--log-prompts"]
    args += ["--max-waiting-tokens", "77", "--log-level", "debug", "--no-enable-prefix-caching"]
    result = runner.invoke(kiln.cli.app, args)
    assert result.exit_code == 0, result.output
    s = captured["settings"]
    assert captured["model"] == "some/model"
    assert s.port == 9100  # flag beats KILN_PORT
    assert s.host == "0.0.0.0"  # no flag: KILN_HOST applies
    assert s.api_keys == ["a", "b"]
    assert s.log_prompts is True and s.log_level == "debug"
    assert s.max_waiting_tokens == 77
    assert s.enable_prefix_caching is False
    assert s.max_waiting_sequences == ServerSettings.model_fields["max_waiting_sequences"].default
    # the weights load inside the server (so /health answers meanwhile), not before it starts
    from kiln.serve.loading_engine import LoadingEngine

    assert isinstance(captured["engine"], LoadingEngine)


def test_serve_invalid_flag_value_exits_2(captured: dict[str, Any]) -> None:
    result = runner.invoke(kiln.cli.app, ["serve", "--port", "70000"])
    assert result.exit_code == 2
    assert "--port" in result.output


def test_serve_offline_suggests_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(model: str | None, *, tiny: bool = False, progress: bool = True) -> Path:
        raise OfflineError("could not download the default model: network unreachable")

    monkeypatch.setattr(kiln.serve.model_source, "resolve_model_dir", offline)
    monkeypatch.setattr(kiln.serve.runner, "configure_logging", lambda level: None)
    result = runner.invoke(kiln.cli.app, ["serve"])
    assert result.exit_code == 1
    assert "network unreachable" in result.output
    assert "kiln serve --tiny" in result.output


def test_build_tiny_writes_an_engine(tmp_path: Path) -> None:
    from kiln.engine_dir import EngineManifest

    out = tmp_path / "engine"
    result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", str(out), "--max-seq-len", "256"])
    assert result.exit_code == 0, result.output
    manifest = EngineManifest.load(out)
    assert manifest.served_model_name == "tiny" and manifest.limits.max_seq_len == 256
    again = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", str(out)])
    assert again.exit_code == 1 and "overwrite" in again.output


def test_native_build_records_its_tensor_parallel_size(tmp_path: Path) -> None:
    from kiln.engine_dir import EngineManifest

    out = tmp_path / "e"
    result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", str(out), "--tp-size", "2"])
    assert result.exit_code == 0, result.output
    assert EngineManifest.load(out).extra["tensor_parallel_size"] == 2
    bad = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", str(tmp_path / "f"), "--tp-size", "3"])
    assert bad.exit_code == 1 and "not divisible" in bad.output


@pytest.mark.parametrize(
    "args",
    [
        ["build", "-o", "x"],
        ["build", "ckpt", "--tiny", "-o", "x"],
        ["build", "--tiny", "-o", "x", "--tp-size", "0"],
    ],
)
def test_build_rejects_contradictory_flags(args: list[str]) -> None:
    assert runner.invoke(kiln.cli.app, args).exit_code == 2


def test_bench_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.bench.cli

    seen: list[list[str]] = []
    monkeypatch.setattr(kiln.bench.cli, "main", lambda argv: seen.append(argv) or 3)
    result = runner.invoke(kiln.cli.app, ["bench", "--random", "llama2-7b", "--latency-only", "--help"])
    assert result.exit_code == 3
    assert seen == [["--random", "llama2-7b", "--latency-only", "--help"]]


class _Chunk:
    def __init__(self, text: str) -> None:
        delta = type("Delta", (), {"content": text})()
        self.choices = [type("Choice", (), {"delta": delta})()]


class _FakeChatClient:
    """Enough of openai.OpenAI for chat_repl: replies "echo:<last user message>" in two pieces."""

    def __init__(self, interrupt_on: str | None = None) -> None:
        self.requests: list[list[dict[str, str]]] = []
        self.interrupt_on = interrupt_on
        self.chat = type("Chat", (), {"completions": self})()

    def create(self, *, model: str, messages: list[dict[str, str]], stream: bool, **params: Any) -> Any:
        self.requests.append([dict(m) for m in messages])
        last = messages[-1]["content"]
        yield _Chunk("echo:")
        if last == self.interrupt_on:
            raise KeyboardInterrupt
        yield _Chunk(last)


def test_chat_repl_history_reset_and_interrupt() -> None:
    import io

    from kiln.serve.terminal import chat_repl

    client = _FakeChatClient(interrupt_on="stop me")
    lines = iter(["hi", "stop me", "again", "/reset", "fresh", "/exit"])
    out = io.StringIO()
    history = chat_repl(client, "m", out=out, read_line=lambda _prompt: next(lines), system="be nice")
    assert "m> echo:hi\n" in out.getvalue() and "(interrupted)" in out.getvalue()
    # the interrupted turn is not in the history the next request carries
    assert client.requests[2] == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "echo:hi"},
        {"role": "user", "content": "again"},
    ]
    assert client.requests[3][:2] == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "fresh"},
    ]
    assert history[-1] == {"role": "assistant", "content": "echo:fresh"}


def test_build_trtllm_passes_its_flags_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kiln.build.trtllm
    from kiln.config import EngineLimits

    seen: dict[str, Any] = {}

    def fake_build(checkpoint: str, output_dir: Path, **kwargs: Any) -> Any:
        seen.update(checkpoint=checkpoint, output_dir=output_dir, **kwargs)
        fields = {"served_model_name": "m", "backend": "trtllm", "dtype": "float16", "quantization": "fp8"}
        return type("Manifest", (), fields)()

    monkeypatch.setattr(kiln.build.trtllm, "build_trtllm_engine", fake_build)
    args = ["build", "org/model", "-o", str(tmp_path / "e"), "--backend", "trtllm", "--quantization", "fp8"]
    args += ["--tp-size", "2", "--calib-dataset", "cnn", "--max-batch-size", "8", "--overwrite"]
    args += ["--calib-size", "64", "--max-input-len", "100", "--gather-logits", "--no-multiple-profiles"]
    result = runner.invoke(kiln.cli.app, args)
    assert result.exit_code == 0, result.output
    assert seen["checkpoint"] == "org/model" and seen["output_dir"] == tmp_path / "e"
    assert (seen["quantization"], seen["tp_size"], seen["calib_dataset"]) == ("fp8", 2, "cnn")
    assert (seen["calib_size"], seen["max_input_len"]) == (64, 100)
    assert seen["gather_logits"] is True and seen["multiple_profiles"] is False
    assert seen["limits"] == EngineLimits(max_batch_size=8) and seen["overwrite"] is True


def test_serve_reports_a_model_that_cannot_load(
    captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.errors import InvalidEngineError

    def fail(engine: Any, settings: ServerSettings) -> None:
        raise InvalidEngineError("engine.json is corrupt")

    monkeypatch.setattr(kiln.serve.runner, "run_server", fail)
    result = runner.invoke(kiln.cli.app, ["serve", "some/engine"])
    assert result.exit_code == 1
    assert "could not load" in result.output and "engine.json is corrupt" in result.output


def test_trtllm_only_build_flags_are_refused_for_the_native_backend(tmp_path: Path) -> None:
    result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", str(tmp_path / "e"), "--gather-logits"])
    assert result.exit_code == 2
    assert "need --backend trtllm" in result.output


# Every `kiln build` flag, by the builds it applies to; each one that does not apply to a build is refused.
BUILD_FLAGS = {
    "every build": {"checkpoint", "output", "dtype", "max_batch_size", "max_num_tokens", "max_seq_len"}
    | {"block_size", "tiny", "backend", "served_model_name", "overwrite", "quantization", "tp_size"}
    | {"kv_cache_dtype"},
    "trtllm": {
        "max_input_len": ["--max-input-len", "8"],
        "gather_logits": ["--gather-logits"],
        "multiple_profiles": ["--no-multiple-profiles"],
    },
    "native": {
        "tune_kernels": ["--tune-kernels"],
        "quant_group_size": ["--quant-group-size", "32"],
        "smoothquant_alpha": ["--smoothquant-alpha", "0.6"],
    },
    # trtllm's calibrated schemes, and the native backend's int8-sq and fp8 KV cache only
    "calibrated": {"calib_dataset": ["--calib-dataset", "x"], "calib_size": ["--calib-size", "8"]},
}


def test_every_build_flag_applies_or_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag that does not apply to the build asked for is an error, never silently ignored; a new flag
    must be placed in BUILD_FLAGS (and so tested) before this passes."""
    params = {p.name for p in command("build").params}
    assert params == BUILD_FLAGS["every build"] | {
        name for k in BUILD_FLAGS if k != "every build" for name in BUILD_FLAGS[k]
    }
    monkeypatch.setattr(kiln.cli, "_cuda_available", lambda: True)
    out = str(tmp_path / "e")
    for flag, args in BUILD_FLAGS["trtllm"].items():
        for base in (["build", "--tiny"], ["build", "ckpt"]):  # native: the tiny model or a checkpoint
            result = runner.invoke(kiln.cli.app, [*base, "-o", out, *args])
            assert result.exit_code == 2 and "need --backend trtllm" in result.output, (flag, result.output)
    for flag, args in BUILD_FLAGS["native"].items():
        result = runner.invoke(kiln.cli.app, ["build", "ckpt", "-o", out, "--backend", "trtllm", *args])
        assert result.exit_code == 2 and "native backend" in result.output, (flag, result.output)
    result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", out, "--backend", "trtllm"])
    assert result.exit_code == 2 and "--tiny builds a native engine" in result.output
    refusals = [  # native builds without int8-sq: each flag's refusal names what it needs
        *(
            (args, "need --quantization int8-sq or --kv-cache-dtype fp8")
            for args in BUILD_FLAGS["calibrated"].values()
        ),
        (BUILD_FLAGS["native"]["smoothquant_alpha"], "--smoothquant-alpha needs --quantization int8-sq"),
    ]
    for args, needs in refusals:
        for quant in ([], ["--quantization", "int8-wo"]):
            result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", out, *quant, *args])
            assert result.exit_code == 2 and needs in " ".join(result.output.split()), (args, result.output)


def test_native_int8_sq_build_passes_its_calibration_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict = {}

    def fake_build(checkpoint, output, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr("kiln.build.build_engine", fake_build)
    args = [
        "build",
        "ckpt",
        "-o",
        str(tmp_path / "e"),
        "--quantization",
        "int8-sq",
        "--calib-dataset",
        "my.txt",
    ]
    result = runner.invoke(kiln.cli.app, [*args, "--calib-size", "3", "--smoothquant-alpha", "0.7"])
    assert result.exit_code == 1 and "stop here" in result.output, result.output
    assert (seen["quantization"], seen["calib_dataset"], seen["calib_size"]) == ("int8-sq", "my.txt", 3)
    assert seen["smoothquant_alpha"] == 0.7


@pytest.mark.parametrize("knob", dataclasses.fields(EngineConfig), ids=lambda f: f.name)
def test_every_engine_knob_is_a_serve_flag_with_its_default_and_help(knob: dataclasses.Field) -> None:
    options = {p.name: p for p in command("serve").params if isinstance(p, typer.core.TyperOption)}
    option = options[knob.name]
    assert f"--{knob.name.replace('_', '-')}" in option.opts
    assert option.help.startswith(knob.metadata["help"])
    if knob.default is not None:
        assert f"(default: {knob.default})" in option.help


@pytest.fixture(autouse=True)
def _default_port_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kiln serve` checks its port is free before anything else; the tests above that serve on the
    default port 8000 must not depend on this machine leaving it free (a test that wants the check
    passes --port)."""
    monkeypatch.setenv("KILN_PORT", "0")


def test_version_prints_kilns_version() -> None:
    from kiln.version import __version__

    result = runner.invoke(kiln.cli.app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"kiln {__version__}\n"


def test_serve_on_a_busy_port_fails_before_loading(captured: dict[str, Any]) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = runner.invoke(kiln.cli.app, ["serve", "--tiny", "--host", "127.0.0.1", "--port", str(port)])
    assert result.exit_code == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.output
    assert "--port" in result.output and "Errno" not in result.output
    assert "tiny" not in captured and "engine" not in captured  # nothing resolved, built or loaded
    # a free port (and port 0: any free one) goes on to load the model
    result = runner.invoke(kiln.cli.app, ["serve", "--tiny", "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert captured["tiny"] is True and captured["settings"].port == port


def test_serve_on_an_address_it_cannot_bind_says_so(captured: dict[str, Any]) -> None:
    result = runner.invoke(kiln.cli.app, ["serve", "--tiny", "--host", "192.0.2.1", "--port", "8123"])
    assert result.exit_code == 1
    assert "cannot serve on 192.0.2.1:8123" in result.output and "--host" in result.output
    assert "engine" not in captured


@pytest.mark.parametrize(
    "args",
    [["models"], ["complete", "hi"], ["chat"]],
    ids=["models", "complete", "chat"],
)
def test_unreachable_server_is_named_with_the_fix(args: list[str]) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        result = runner.invoke(kiln.cli.app, [*args, "--url", url], input="/exit\n")
    port = url.rsplit(":", 1)[1]
    assert result.exit_code == 1
    assert f"could not reach {url}" in result.output
    assert f"Is `kiln serve` running there? Start it with: kiln serve --port {port}" in result.output
    assert "Traceback" not in result.output


def test_a_url_without_scheme_gets_the_scheme_suggested() -> None:
    result = runner.invoke(kiln.cli.app, ["models", "--url", "127.0.0.1:9"])
    assert result.exit_code == 1
    assert "could not reach 127.0.0.1:9" in result.output and "http://127.0.0.1:9" in result.output


def test_serve_names_its_url_on_one_line(captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # A long model path must not push the URL onto a line of its own, broken where the console wraps.
    long_path = Path("/srv/models/" + "a-very-long-engine-directory-name" * 3)
    monkeypatch.setattr(kiln.cli, "_resolve", lambda model, tiny: long_path)
    result = runner.invoke(kiln.cli.app, ["serve", "--port", "8123"])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("Loading ")]
    assert f"Loading {long_path}; serving it at http://127.0.0.1:8123/v1 once loaded." in line
