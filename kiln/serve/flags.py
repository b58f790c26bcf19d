"""`kiln serve`'s flags, generated from `ServerSettings`: one typer option per field.

Rules: the flag is the field name with dashes (`max_waiting_sequences` -> `--max-waiting-sequences`),
its help is the field's description plus its `KILN_*` variable and default; booleans get
`--x/--no-x`; list fields repeat (`--api-keys a --api-keys b`). Every flag defaults to "not given", so
`KILN_*` variables apply beneath the flags and the model's defaults beneath those.
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

from kiln.serve.settings import ServerSettings


class SettingsFlagError(ValueError):
    """Flag values that ServerSettings rejects; the message names the flags."""


# Settings that are not `kiln serve` flags: MODEL is the positional argument.
_NOT_FLAGS = {"model"}
SETTINGS_FLAGS = [name for name in ServerSettings.model_fields if name not in _NOT_FLAGS]


def _flag_parameter(name: str) -> inspect.Parameter:
    field = ServerSettings.model_fields[name]
    annotation: Any = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    # Parentheses, not brackets: rich help would read "[...]" as markup and drop it.
    option: dict[str, Any] = {"help": f"{field.description} (env: KILN_{name.upper()})"}
    if typing.get_origin(annotation) is typing.Annotated:  # list[str] marked NoDecode
        annotation = typing.get_args(annotation)[0]
    elif args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if annotation == list[str]:
        option["help"] += " Repeat the flag for several."
    default = field.get_default(call_default_factory=True)
    if default not in (None, []):
        option["help"] += f" (default: {default})"
    # Every flag defaults to None = "not given", so KILN_* variables still apply beneath the flags.
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[annotation], typer.Option(show_default=False, **option)],  # noqa: UP045
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
    parameters = own + [_flag_parameter(name) for name in SETTINGS_FLAGS]

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in SETTINGS_FLAGS}
        given = {k: v for k, v in given.items() if v is not None and v != []}
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
