"""Grammars that force a tool call: `tool_choice` "required" or a named function, per output format.

`tool_call_grammar` returns a Lark grammar in llguidance's dialect (for `StructuredOutput("grammar", ...)`
or `llguidance.LLMatcher.grammar_from_lark`) that accepts exactly the calls the format's parser reads:

- hermes: `<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>`, calls joined by "\\n".
- llama3_json: `{"name": "NAME", "parameters": ARGS}`, calls joined by "; " (no `<|python_tag|>`: the
  JSON tool-call templates for Llama 3.1-3.3 have the model answer with the bare object).

Rules:
- ARGS is an inline `%json` schema: the function's `parameters`, so the call's arguments always satisfy
  them. Each schema stays the root of its own `%json` block, so its `$ref`s and `$defs` work unchanged.
- JSON is written as Python's json.dumps writes it (", " and ": ", no other whitespace): the spacing the
  models were trained on, and no free whitespace a model could pad without end. Keywords llguidance
  does not implement are ignored (lenient), as a schema a client sends is not ours to refuse for them.
- A function without `parameters` takes none: its arguments must be `{}`.
- The name is a fixed string per function: a call can only name a function of the request.
- `special_tokens`: tags that are special tokens of the model's tokenizer (e.g. "<tool_call>" for
  Hermes 2 Pro) are written as token references, which llguidance requires for special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from kiln.serve.tool_parsers import HermesToolParser, Llama3JsonToolParser

_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_ARGS_KEY = {HermesToolParser.name: "arguments", Llama3JsonToolParser.name: "parameters"}


def tool_call_grammar(
    parser: str,
    tools: Sequence[Mapping[str, Any]],
    choice: str | Mapping[str, Any] = "required",
    parallel: bool = True,
    *,
    special_tokens: Collection[str] = (),
) -> str:
    """The Lark grammar of one or more calls (exactly one unless `parallel`) in `parser`'s format.

    tools: the request's `tools` (OpenAI shape: {"type": "function", "function": {"name", "parameters"}}).
    choice: "required" (any of the tools) or {"type": "function", "function": {"name": ...}}.
    ValueError: an unknown parser, a choice that needs no grammar ("auto", "none") or names no tool.
    """
    if parser not in _ARGS_KEY:
        raise ValueError(f"no tool call grammar for parser {parser!r}; known: {', '.join(_ARGS_KEY)}")
    functions = _functions(tools)
    if choice == "required":
        chosen = list(functions)
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
        chosen = [name]
    else:
        raise ValueError(f"tool_choice {choice!r} is not enforced by a grammar")
    if not chosen:
        raise ValueError('tool_choice "required" needs at least one function in tools')

    def tag(text: str) -> str:
        return text if text in special_tokens else json.dumps(text)

    key = _ARGS_KEY[parser]
    if parser == HermesToolParser.name:
        call = f'{tag(HermesToolParser.OPEN)} "\\n" fn "\\n" {tag(HermesToolParser.CLOSE)}'
        sep = '"\\n"'
    else:
        call, sep = "fn", '"; "'
    lines = ["%llguidance {}", f"start: call ({sep} call)*" if parallel else "start: call", f"call: {call}"]
    lines.append("fn: " + " | ".join(f"fn_{i}" for i in range(len(chosen))))
    for i, name in enumerate(chosen):
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{key}": '
        lines.append(f'fn_{i}: {json.dumps(head, ensure_ascii=False)} args_{i} "}}"')
        schema = {**functions[name], "x-guidance": _JSON_STYLE}
        lines.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each function's arguments schema by name (the first of a repeated name wins)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if tool.get("type", "function") != "function":
            continue
        function = tool.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("every function tool needs a non-empty name")
        params = function.get("parameters")
        if params is None:
            params = _NO_PARAMETERS
        elif not isinstance(params, Mapping):
            raise ValueError(f"parameters of function {name!r} must be a JSON schema object")
        elif "type" not in params:
            params = {**params, "type": "object"}  # arguments are an object whatever else it says
        out.setdefault(name, dict(params))
    return out
