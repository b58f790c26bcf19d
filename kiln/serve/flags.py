"""`kiln serve`'s flags, generated from `ServerSettings`: one typer option per field.

Rules: the flag is the field name with dashes (`max_waiting_sequences` -> `--max-waiting-sequences`),
its help is the field's description plus its default; booleans get
`--x` and `--no-x` (the second hidden from the help's table, named in the first one's help); list fields
repeat (`--api-keys a --api-keys b`; in the environment, comma-separated or a JSON list). Every flag defaults to "not given", so
`KILN_*` variables apply beneath the flags and the model's defaults beneath those.

Help: each flag sits in one panel of `--help` (`HELP_PANELS`, the one place that groups them; a field
missing there lands in "Other", which a test refuses), so ~40 flags read by topic at 80 columns. No
type column and no per-flag `KILN_*` name (`ENV_HELP` says the rule once): long unbreakable words in
the help column are what made rich cut the flag names.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from kiln.serve.settings import ROLLOUT_SETTINGS, SLO_CONTROLLER_SETTINGS, ServerSettings


class SettingsFlagError(ValueError):
    """Flag values that ServerSettings rejects; the message names the flags."""


# Settings that are not `kiln serve` flags: MODEL is the positional argument.
_NOT_FLAGS = {"model"}
SETTINGS_FLAGS = [name for name in ServerSettings.model_fields if name not in _NOT_FLAGS]

# The `kiln serve --help` panel of every flag, in the order shown.
HELP_PANELS: dict[str, tuple[str, ...]] = {
    "Model": (
        "served_model_name",
        "dtype",
        "device",
        "seed",
        "generation_config",
        "tool_call_parser",
        "reasoning_parser",
    ),
    "Network": (
        "host",
        "port",
        "grpc_port",
        "max_connections",
        "keep_alive_timeout_seconds",
        "header_timeout_seconds",
    ),
    "Security": ("api_keys", "key_protects_all", "cors_origins"),
    "Request limits": (
        "max_body_bytes",
        "max_header_bytes",
        "max_prompt_chars",
        "default_max_tokens",
        "max_tokens_limit",
        "max_waiting_sequences",
        "max_waiting_tokens",
        "retry_after_seconds",
        "keepalive_interval_seconds",
        "request_timeout_seconds",
        "max_request_timeout_seconds",
        "responses_store_size",
    ),
    "Scheduling": ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "admission_interval"),
    "SLO batching": ("slo_ttft_ms", "slo_itl_ms", *SLO_CONTROLLER_SETTINGS),
    "KV cache": (
        "block_size",
        "num_kv_blocks",
        "kv_cache_memory_bytes",
        "gpu_memory_utilization",
        "enable_prefix_caching",
    ),
    "Execution": (
        "engine_process",
        "tensor_parallel_size",
        "enforce_eager",
        "piecewise_graphs",
        "prefill_graph_tokens",
        "async_scheduling",
        "load_progress",
    ),
    "Supervision": (
        "engine_check_interval_seconds",
        "engine_check_timeout_seconds",
        "max_engine_restarts",
        "drain_timeout_seconds",
    ),
    "Rollout": ("repository", *ROLLOUT_SETTINGS),
    "Logging": ("log_level", "log_prompts", "access_log"),
}
OTHER_PANEL = "Other"
ENV_HELP = (
    "Every flag can also come from the environment: KILN_ and its name in capitals, dashes as "
    "underscores (--max-num-seqs: KILN_MAX_NUM_SEQS); a flag given wins."
)
_PANEL_OF = {name: panel for panel, names in HELP_PANELS.items() for name in names}


def _panel_order(name: str) -> tuple[int, int]:
    panels = list(HELP_PANELS)
    panel = _PANEL_OF.get(name)
    if panel is None:
        return len(panels), 0
    return panels.index(panel), HELP_PANELS[panel].index(name)


def _negative(name: str) -> str:
    """The parameter of a boolean's `--no-x` flag."""
    return f"no_{name}"


def _flag_parameters(name: str) -> list[inspect.Parameter]:
    """The flag of setting `name`; for a boolean also its hidden `--no-x`. Both default to None,
    "not given", so KILN_* variables still apply beneath the flags."""
    flag = _flag_parameter(name)
    if typing.get_args(flag.annotation)[0] != Optional[bool]:  # noqa: UP045
        return [flag]
    dashed = name.replace("_", "-")
    negative = typer.Option(f"--no-{dashed}", hidden=True, help=f"Turn --{dashed} off.")
    no = Annotated[Optional[bool], negative]  # noqa: UP045
    return [
        flag,
        inspect.Parameter(_negative(name), inspect.Parameter.KEYWORD_ONLY, default=None, annotation=no),
    ]


def _flag_parameter(name: str) -> inspect.Parameter:
    field = ServerSettings.model_fields[name]
    annotation: Any = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    # Parentheses, not brackets: rich help would read "[...]" as markup and drop it.
    option: dict[str, Any] = {
        "help": field.description,
        "rich_help_panel": _PANEL_OF.get(name, OTHER_PANEL),
        "metavar": "",
    }
    if typing.get_origin(annotation) is typing.Annotated:  # list[str] marked NoDecode
        annotation = typing.get_args(annotation)[0]
    elif args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if annotation in (list[str], list[float]):
        option["help"] += " Repeat the flag for several."
    default = field.get_default(call_default_factory=True)
    if default not in (None, []):
        option["help"] += f" (default: {default})"
    declared: tuple[str, ...] = ()
    if annotation is bool:  # only --x in the table: a --no-x column beside it cut the names at 80 columns
        declared = (f"--{name.replace('_', '-')}",)
        option["help"] += f" Off: --no-{name.replace('_', '-')}."
    # Every flag defaults to None = "not given", so KILN_* variables still apply beneath the flags.
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[annotation], typer.Option(*declared, show_default=False, **option)],  # noqa: UP045
    )


def with_settings_flags(
    on_error: Callable[[SettingsFlagError], BaseException],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add one flag per `ServerSettings` field to a command taking `settings: ServerSettings`.

    Invalid values raise what `on_error` returns for the SettingsFlagError (the CLI's exit with code 2).
    """
    return functools.partial(_add_flags, on_error=on_error)


def _add_flags(
    func: Callable[..., Any], on_error: Callable[[SettingsFlagError], BaseException]
) -> Callable[..., Any]:
    own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "settings"]
    flags = [p for name in sorted(SETTINGS_FLAGS, key=_panel_order) for p in _flag_parameters(name)]
    parameters = own + flags
    negatives = {p.name for p in flags} - set(SETTINGS_FLAGS)

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in SETTINGS_FLAGS}
        given = {k: v for k, v in given.items() if v is not None and v != []}
        for name in SETTINGS_FLAGS:
            if _negative(name) in negatives and kwargs.pop(_negative(name)):
                if given.get(name):
                    dashed = name.replace("_", "-")
                    raise on_error(SettingsFlagError(f"give --{dashed} or --no-{dashed}, not both"))
                given[name] = False
        try:
            settings = ServerSettings(**given)
        except ValidationError as exc:
            problems = "; ".join(
                f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()
            )
            raise on_error(SettingsFlagError(f"invalid settings: {problems}")) from None
        return func(settings=settings, **kwargs)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    del command.__wrapped__  # typer must read the generated signature, not the original one
    return command
