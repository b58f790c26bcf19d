"""The `kiln` command: build, tune, serve, chat, complete, models, bench.

The commands only parse flags, show progress and print results; the work lives in `kiln.build`,
`kiln.serve`, the engine clients and `kiln.bench`. `kiln serve`'s flags are generated from
`ServerSettings` (itself derived from `EngineConfig`), one per field (`max_waiting_sequences` ->
`--max-waiting-sequences`), with the field's description as help, so the engine's knobs, the settings,
the `KILN_*` variables and the flags cannot drift apart.

Rules: what a command needs beyond parsing flags (the engine and its kernels, FastAPI/uvicorn, the
builders, the openai client) is imported inside the command, so `kiln --help` and a typo's error do not
wait for them.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional
from urllib.parse import urlsplit

import typer
from rich.console import Console

from kiln.config import EngineConfig, EngineLimits, canonical_kv_cache_dtype, canonical_quantization
from kiln.errors import BackendUnavailableError, KilnError, OfflineError
from kiln.serve.environment import unknown_variables
from kiln.serve.flags import ENV_HELP, SettingsFlagError, with_settings_flags
from kiln.serve.settings import ROLLOUT_SETTINGS, ServerSettings
from kiln.version import __version__

app = typer.Typer(
    help="Kiln: build Llama-family checkpoints into engines and serve them through an OpenAI-compatible API.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    # soft_wrap: printed as one line each (the terminal wraps), so a URL or flag is never cut
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    if hint:
        err.print(hint, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"kiln {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print Kiln's version and exit."
        ),
    ] = False,
) -> None:
    """Options before the command (the app's help is `app`'s)."""


def _resolve(model: str | None, tiny: bool) -> Path:
    from kiln.serve.model_source import resolve_model_dir  # deferred: loads the builders and engine drivers

    try:
        return resolve_model_dir(model, tiny=tiny)
    except OfflineError as exc:
        raise _fail(
            str(exc), "No network? [bold]kiln serve --tiny[/bold] serves a tiny random model built locally."
        ) from None
    except (KilnError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _open(path: Path, config: EngineConfig, may_import: Callable[[], None] | None = None) -> Any:
    """Open the engine at `path`, then set up this process for it (`prepare_process`); `may_import`:
    see `open_engine`."""
    # Deferred: the engine drivers load the engine, Triton and (for trtllm) TensorRT-LLM.
    from kiln.clients.open import open_engine
    from kiln.clients.process import ProcessEngine
    from kiln.engine.process_setup import prepare_process

    engine = open_engine(path, config, may_import=may_import)
    prepare_process(config, runs_engine=not isinstance(engine, ProcessEngine))
    return engine


def _load(model: str | None, tiny: bool, settings: ServerSettings) -> Any:
    path = _resolve(model, tiny)
    try:
        with err.status(f"Loading {path} ..."):
            return _open(path, settings.engine_config())
    except (KilnError, ValueError) as exc:
        raise _fail(str(exc)) from None


ModelArg = Annotated[
    Optional[str],  # noqa: UP045
    typer.Argument(
        help="Engine directory, Hugging Face checkpoint directory or hub id (org/name). "
        "Omitted: the embedded default model (SmolLM2-135M-Instruct), built once into ~/.cache/kiln.",
        envvar="KILN_MODEL",
        show_default=False,
    ),
]
TinyOpt = Annotated[
    bool, typer.Option("--tiny", help="Use a tiny random-weight model built locally (no download).")
]


def _settings_error(exc: SettingsFlagError) -> typer.Exit:
    return _fail(str(exc), code=2)


def _check_port(host: str, port: int) -> None:
    """Fail now, before any download, build or load, when the server could not bind `host:port`
    (bound as uvicorn binds it, SO_REUSEADDR included); port 0 (any free port) is never checked."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _fail(
                f"port {port} on {host} is in use", "Pick another with --port, or stop what holds it."
            ) from None
        raise _fail(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}", "Check --host and --port."
        ) from None


@app.command(epilog=ENV_HELP)
@with_settings_flags(on_error=_settings_error)
def serve(model: ModelArg = None, tiny: TinyOpt = False, *, settings: ServerSettings) -> None:
    """Serve a model through the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models)."""
    # Deferred: the engine drivers (torch); the web stack is imported further down.
    from kiln.clients.messages import EngineDeadError
    from kiln.serve.loading_engine import LoadingEngine

    _warn_unknown_variables()
    _check_port(settings.host, settings.port)  # before the minutes a download, build or load may take
    if settings.repository is not None:
        return _serve_repository(model, tiny, settings)
    _refuse_rollout_settings(settings)
    path = _resolve(model, tiny)  # builds or downloads first, with progress bars
    config = settings.engine_config()
    # The port opens before the weights load: /health answers at once, /ready once the model runs.
    # The engine process starts while the web stack below imports; the loader thread imports nothing
    # heavy before that is done (see open_engine's `may_import`).
    imported = threading.Event()
    engine = LoadingEngine(lambda: _open(path, config, imported.wait))
    engine.begin()
    try:
        from kiln.serve.runner import configure_logging, run_server  # deferred: FastAPI and uvicorn
    finally:
        imported.set()

    configure_logging(settings.log_level)
    where = f"http://{settings.host}:{settings.port}/v1" if settings.port else "a free port (see below)"
    # soft_wrap: the terminal wraps the line, so the URL is never split by an inserted newline.
    err.print(
        f"Loading {path}; serving it at {where} once loaded. Stop with Ctrl-C.",
        highlight=False,
        soft_wrap=True,
    )
    try:
        run_server(engine, settings)
    except (KilnError, ValueError) as exc:
        raise _fail(f"could not load {path}: {exc}") from None
    except EngineDeadError as exc:  # down for good: the supervisor gave up (see kiln.serve.supervisor)
        raise _fail(f"the engine is down and was not restarted: {exc}") from None


def _warn_unknown_variables() -> None:
    """Name each `KILN_*` variable set here that Kiln reads nowhere (kiln.serve.environment)."""
    for name, close in unknown_variables(os.environ):
        hint = f"; did you mean {close}?" if close else ""
        err.print(
            f"warning: {name} is set, but Kiln reads no variable of that name{hint}",
            highlight=False,
            soft_wrap=True,
        )


def _refuse_rollout_settings(settings: ServerSettings) -> None:
    given = sorted(set(ROLLOUT_SETTINGS) & settings.model_fields_set)
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise _fail(f"{flags} only apply with --repository")


def _serve_repository(model: str | None, tiny: bool, settings: ServerSettings) -> None:
    """`kiln serve --repository DIR`: the highest valid version serves, newer ones roll out beside it."""
    # Deferred: the server's modules and the engine drivers.
    from kiln.clients.messages import EngineDeadError
    from kiln.serve.loading_engine import LoadingEngine
    from kiln.serve.repository import ModelRepository, RepositoryError
    from kiln.serve.rollout import Rollout, plan_from_settings, version_engine_config
    from kiln.serve.runner import configure_logging, run_server

    if model is not None or tiny:
        raise _fail("give MODEL (or --tiny) or --repository, not both")
    try:
        repository = ModelRepository(settings.repository or "", settings.repository_model)
        plan = plan_from_settings(settings)
        config = version_engine_config(settings.engine_config())
        rollout = Rollout(repository, plan, lambda path: LoadingEngine(lambda: _open(path, config)))
    except (RepositoryError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    stable = rollout.router.stable
    stable.engine.begin()  # type: ignore[attr-defined]
    configure_logging(settings.log_level)
    where = f"http://{settings.host}:{settings.port}/v1" if settings.port else "a free port (see below)"
    err.print(
        f"Loading {repository.model} version {stable.number} ({stable.path}); serving it at {where} once "
        f"loaded, newer versions rolled out as they appear. Stop with Ctrl-C.",
        highlight=False,
        soft_wrap=True,
    )
    try:
        run_server(rollout.router, settings, rollout=rollout)
    except (KilnError, ValueError) as exc:
        raise _fail(f"could not load {stable.path}: {exc}") from None
    except EngineDeadError as exc:
        raise _fail(f"the engine is down and was not restarted: {exc}") from None


@app.command()
def build(
    checkpoint: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(help="Hugging Face checkpoint directory, .gguf file or hub id.", show_default=False),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Engine directory to write.")] = ...,  # type: ignore[assignment]
    dtype: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Weight dtype: float16, bfloat16 or float32 (default: float16; a pre-quantized FP8 "
            "checkpoint's own dtype; --tiny: float32).",
            show_default=False,
        ),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most requests running at once.")] = 64,
    max_num_tokens: Annotated[int, typer.Option(help="Most tokens computed in one step.")] = 2048,
    max_seq_len: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Prompt + generated tokens per request (default: the model's context).", show_default=False
        ),
    ] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV-cache block.")] = 16,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="Build a tiny random-weight model (no checkpoint).")
    ] = False,
    backend: Annotated[
        Literal["native", "trtllm"], typer.Option(help="native, or trtllm (TensorRT-LLM 1.2 on a GPU).")
    ] = "native",
    served_model_name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Name clients send as `model` (default: from the checkpoint).", show_default=False),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    quantization: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="fp8, int8-wo or int8-sq (also spelled int8_wo, int8_sq), on both backends "
            "(native: the linear layers; see docs/quantization.md).",
            show_default=False,
        ),
    ] = None,
    quant_group_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="native int8-wo only: one scale per this many inputs of a row (default: per output channel).",
            show_default=False,
        ),
    ] = None,
    kv_cache_dtype: Annotated[
        str,
        typer.Option(
            help="KV-cache dtype: auto (the engine's dtype) or fp8 (E4M3, one calibrated scale per layer for K "
            "and one for V; with any --quantization; both backends; see docs/quantization.md).",
        ),
    ] = "auto",
    tp_size: Annotated[
        int,
        typer.Option(
            help="Tensor-parallel GPUs (trtllm: built into the engine; native: recorded in engine.json as the "
            "default of `kiln serve --tensor-parallel-size`, unquantized engines only).",
            min=1,
        ),
    ] = 1,
    calib_dataset: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Calibration dataset for quantization (native int8-sq and fp8 KV cache: a UTF-8 text file; "
            "default: the standard library's pydoc_data.topics).",
            show_default=False,
        ),
    ] = None,
    calib_size: Annotated[
        int, typer.Option(help="Calibration samples (native int8-sq and fp8 KV cache: of 512 tokens each).")
    ] = 512,
    smoothquant_alpha: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="native int8-sq only: SmoothQuant's migration strength alpha in [0, 1] (default 0.5).",
            show_default=False,
        ),
    ] = None,
    max_input_len: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="trtllm only: longest prompt (default: --max-seq-len - 1).", show_default=False),
    ] = None,
    gather_logits: Annotated[
        bool, typer.Option(help="trtllm only: keep generation logits, so requests may ask for logprobs.")
    ] = False,
    multiple_profiles: Annotated[
        bool, typer.Option(help="trtllm only: build several TensorRT optimization profiles.")
    ] = True,
    tune_kernels: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--tune-kernels/--no-tune-kernels",
            help="native only: tune the attention kernels for this machine's GPU and save every Triton kernel "
            "compiled into the engine, so a server starts without compiling (default: when a CUDA GPU is visible).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Build a checkpoint into an engine directory that `kiln serve` loads."""
    limits = EngineLimits(
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        max_seq_len=max_seq_len,
        block_size=block_size,
    )
    if tiny == (checkpoint is not None):
        raise _fail("give a CHECKPOINT or --tiny (exactly one)", code=2)
    if tiny and backend != "native":
        raise _fail("--tiny builds a native engine; --backend trtllm needs a CHECKPOINT", code=2)
    trtllm_only = max_input_len or gather_logits
    if backend == "native" and (trtllm_only or not multiple_profiles):
        raise _fail(
            "--max-input-len, --gather-logits and --no-multiple-profiles need --backend trtllm",
            code=2,
        )
    if smoothquant_alpha is not None and backend != "native":
        raise _fail("--smoothquant-alpha is for the native backend's int8-sq", code=2)
    try:
        scheme = canonical_quantization(quantization)
        kv_cache_dtype = canonical_kv_cache_dtype(kv_cache_dtype)
    except ValueError as exc:
        raise _fail(str(exc), code=2) from None
    calibrated = (calib_dataset is not None or calib_size != 512) and backend == "native"
    if calibrated and scheme != "int8_sq" and kv_cache_dtype != "fp8":
        raise _fail(
            "--calib-* on the native backend need --quantization int8-sq or --kv-cache-dtype fp8", code=2
        )
    if smoothquant_alpha is not None and scheme != "int8_sq":
        raise _fail(
            "--smoothquant-alpha needs --quantization int8-sq (SmoothQuant's migration strength)", code=2
        )
    if quant_group_size is not None and backend != "native":
        raise _fail("--quant-group-size is for the native backend's int8-wo", code=2)
    if tune_kernels and backend != "native":
        raise _fail("--tune-kernels is for the native backend (TensorRT-LLM picks its own kernels)", code=2)
    if tune_kernels and not _cuda_available():
        raise _fail(
            "--tune-kernels needs a CUDA GPU and none is visible here",
            "Build without it, then run [bold]kiln tune ENGINE_DIR[/bold] on the GPU machine that serves it.",
            code=2,
        )
    if tune_kernels is None:
        tune_kernels = backend == "native" and _cuda_available()
    try:
        if tiny:
            from kiln.build import build_tiny_engine  # deferred: transformers, safetensors

            manifest = build_tiny_engine(
                output,
                dtype=dtype or "float32",  # tiny's default: exact on CPU
                limits=limits,
                served_model_name=served_model_name or "tiny",
                progress=True,
                overwrite=overwrite,
                quantization=quantization,
                quant_group_size=quant_group_size,
                smoothquant_alpha=smoothquant_alpha,
                calib_dataset=calib_dataset,
                calib_size=calib_size,
                tensor_parallel_size=tp_size,
                kv_cache_dtype=kv_cache_dtype,
            )
        elif backend == "trtllm":
            from kiln.build.trtllm import build_trtllm_engine  # deferred: TensorRT-LLM

            manifest = build_trtllm_engine(
                checkpoint,  # type: ignore[arg-type]
                output,
                dtype=dtype or "float16",
                limits=limits,
                quantization=quantization,
                kv_cache_dtype=kv_cache_dtype,
                tp_size=tp_size,
                calib_dataset=calib_dataset,
                calib_size=calib_size,
                max_input_len=max_input_len,
                gather_logits=gather_logits,
                multiple_profiles=multiple_profiles,
                served_model_name=served_model_name,
                overwrite=overwrite,
            )
        else:
            from kiln.build import build_engine  # deferred: transformers, safetensors

            manifest = build_engine(
                checkpoint,  # type: ignore[arg-type]
                output,
                dtype=dtype,
                limits=limits,
                served_model_name=served_model_name,
                progress=True,
                overwrite=overwrite,
                quantization=quantization,
                quant_group_size=quant_group_size,
                smoothquant_alpha=smoothquant_alpha,
                calib_dataset=calib_dataset,
                calib_size=calib_size,
                tensor_parallel_size=tp_size,
                kv_cache_dtype=kv_cache_dtype,
            )
    except (KilnError, ValueError, FileExistsError) as exc:
        raise _fail(str(exc)) from None
    what = ", ".join(
        [
            manifest.backend,
            manifest.dtype,
            *([manifest.quantization] if manifest.quantization else []),
            *(["KV cache fp8"] if getattr(manifest, "kv_cache_dtype", "auto") == "fp8" else []),
        ]
    )
    err.print(
        f"Built [bold]{manifest.served_model_name}[/bold] ({what}) in {output}. "
        f"Serve it: kiln serve {output}",
        highlight=False,
    )
    quant = getattr(manifest, "quant_config", None)  # native engines only
    pre = None if quant is None else quant.prequantized
    if pre is not None:
        err.print(
            f"FP8 weights and scales taken from the checkpoint ({pre['source']}; scales {pre['scales']}); "
            f"activations: {pre['checkpoint_activations']}.",
            highlight=False,
        )
    if tune_kernels:
        _tune(output, "cuda", after_build=True)


def _cuda_available() -> bool:
    import torch  # deferred: ~1 s, which `kiln serve` spends starting the engine process instead

    return torch.cuda.is_available()


def _tune(engine_dir: Path, device: str, *, after_build: bool = False) -> None:
    from kiln.build.kernels import tune_engine_kernels  # deferred: Triton and the engine

    err.print(f"Tuning and compiling the kernels of {engine_dir} for this GPU ...", highlight=False)
    try:
        summary = tune_engine_kernels(engine_dir, device=device, progress=True)
    except (KilnError, OSError) as exc:
        hint = f"The engine itself is fine: serve it as it is, or retry with: kiln tune {engine_dir}"
        raise _fail(f"tuning kernels failed: {exc}", hint if after_build else None) from None

    def tiles(c: Any) -> str:
        return f"{c.block_m}x{c.block_n}, {c.num_warps} warps, {c.num_stages} stages" + (
            ", keys transposed" if c.keys_transposed else ""
        )

    err.print(
        f"Saved {summary.num_kernels} compiled kernels and the tuned attention tiles (decode {tiles(summary.decode)}; "
        f"prefill {tiles(summary.prefill)}) in {summary.kernels_dir} ({summary.seconds:.0f} s).",
        highlight=False,
    )


@app.command()
def tune(
    engine_dir: Annotated[Path, typer.Argument(help="Native engine directory.", show_default=False)],
    device: Annotated[str, typer.Option(help="CUDA device to tune on.")] = "cuda",
) -> None:
    """Tune a native engine's kernels for this machine's GPU and save them compiled in ENGINE_DIR/kernels
    (for an engine built on another machine; `kiln build` does this itself where it sees a GPU)."""
    from kiln.build.kernels import check_tunable  # deferred: Triton and the engine

    try:
        check_tunable(engine_dir, device)
    except BackendUnavailableError as exc:
        raise _fail(str(exc), code=2) from None
    except KilnError as exc:
        raise _fail(str(exc)) from None
    _tune(engine_dir, device)


UrlOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Server to talk to (e.g. http://127.0.0.1:8000); omitted: serve MODEL in-process.",
        show_default=False,
    ),
]
ApiKeyOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="API key for --url.", envvar="KILN_API_KEY", show_default=False),
]
MaxTokensOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="Most tokens per reply (default: up to the context).", show_default=False),
]
TemperatureOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        help="Sampling temperature (0: greedy; default: the model's, from its generation config, else 1).",
        show_default=False,
    ),
]


def _run_client(
    url: str | None, model: str | None, tiny: bool, api_key: str | None, use: Callable[[Any, str], None]
) -> None:
    """Call `use(client, model_name)` against --url, or against MODEL served in a background thread."""
    from kiln.serve.terminal import make_client, served_model  # deferred: the openai client

    try:
        if url is not None:
            if model is not None or tiny:
                raise _fail("give --url or MODEL/--tiny, not both", code=2)
            client = make_client(url, api_key)
            use(client, served_model(client))
            return
        from kiln.serve.background import serve_in_background  # deferred: FastAPI and uvicorn

        settings = ServerSettings(port=0, log_level="warning")
        engine = _load(model, tiny, settings)
        with serve_in_background(engine, settings) as (local_url, _server):
            client = make_client(local_url)
            use(client, served_model(client))
    except KilnError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # the openai client's connection and API errors
        if type(exc).__module__.startswith("openai"):
            raise _client_failure(exc, url) from None
        raise


def _client_failure(exc: Exception, url: str | None) -> typer.Exit:
    """An openai client error as a message naming the server, with what to do about it."""
    what = f"{type(exc).__name__}: {exc}"
    if url is None:  # the in-process server
        return _fail(what)
    if type(exc).__name__ in ("APIConnectionError", "APITimeoutError"):
        if "://" not in url:
            return _fail(f"could not reach {url} ({what})", f"Give the URL with its scheme: http://{url}")
        port = urlsplit(url).port
        start = "kiln serve" + (f" --port {port}" if port not in (None, 8000) else "")
        return _fail(
            f"could not reach {url} ({what})",
            f"Is `kiln serve` running there? Start it with: {start}",
        )
    if type(exc).__name__ == "AuthenticationError":
        return _fail(f"{url} refused the API key ({what})", "Pass --api-key or set KILN_API_KEY.")
    return _fail(f"{url} answered {what}")


def _params(max_tokens: int | None, temperature: float | None) -> dict[str, Any]:
    return {k: v for k, v in {"max_tokens": max_tokens, "temperature": temperature}.items() if v is not None}


@app.command()
def chat(
    model: ModelArg = None,
    url: UrlOpt = None,
    tiny: TinyOpt = False,
    api_key: ApiKeyOpt = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.", show_default=False)] = None,  # noqa: UP045
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
) -> None:
    """Chat in the terminal, replies streaming as they are generated (/help lists the commands)."""
    from kiln.serve.terminal import chat_repl, line_reader, served_defaults  # deferred: the openai client

    def use(client: Any, name: str) -> None:
        err.print(
            f"Chatting with [bold]{name}[/bold]. /help lists the commands, /exit (or Ctrl-D) quits.",
            highlight=False,
        )
        chat_repl(
            client,
            name,
            out=sys.stdout,
            err=sys.stderr,
            read_line=line_reader(),
            system=system,
            defaults=served_defaults(client),
            **_params(max_tokens, temperature),
        )

    _run_client(url, model, tiny, api_key, use)


@app.command()
def complete(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--model", "-m", help="Model to load in-process (as for `kiln serve`).", show_default=False
        ),
    ] = None,
    url: UrlOpt = None,
    tiny: TinyOpt = False,
    api_key: ApiKeyOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: TemperatureOpt = None,
) -> None:
    """Continue PROMPT, streaming the text to stdout."""
    from kiln.serve.terminal import stream_completion, write_stream  # deferred: the openai client

    def use(client: Any, name: str) -> None:
        write_stream(stream_completion(client, name, prompt, **_params(max_tokens, temperature)), sys.stdout)

    _run_client(url, model, tiny, api_key, use)


@app.command()
def models(
    url: Annotated[
        str, typer.Option(help="Server to ask (e.g. http://127.0.0.1:8000).")
    ] = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """List the models a server serves."""
    from kiln.serve.terminal import make_client  # deferred: the openai client

    def use(client: Any, _name: str) -> None:
        for card in client.models.list().data:
            extra = getattr(card, "model_extra", None) or {}
            details = ", ".join(f"{k}={v}" for k, v in extra.items())
            sys.stdout.write(f"{card.id}\t{details}\n")

    try:
        use(make_client(url, api_key), "")
    except Exception as exc:
        if type(exc).__module__.startswith("openai"):
            raise _client_failure(exc, url) from None
        raise


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Offline throughput and latency of the native engine (all flags: kiln bench --help)."""
    from kiln.bench.cli import main as bench_main  # deferred: the engine, Triton

    raise typer.Exit(bench_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
