"""Tool calling in chat: what the template sees, what constrains the output, how the output is read.

Rules:
- `tools` offered (and `tool_choice` not "none"): the output is read by the model's tool-call parser
  (`--tool-call-parser`, else detected from the chat template); calls become `tool_calls` and
  `finish_reason` "tool_calls". "required" and a named function are enforced: the output is held to a
  grammar of well-formed calls in that format, arguments valid against each function's parameters.
  "auto" is read, not forced. "none": the tools are not shown and nothing is parsed.
- A template that renders tools gets them (and the history's tool calls and results) as it expects. A
  template without tool support gets Kiln's fallback: the tools and the Hermes format described in a
  system message, past calls written as `<tool_call>` blocks, tool results as user messages in
  `<tool_response>` blocks; the output is read as Hermes.
- A constraint from `response_format` (or vLLM's fields) and an enforced tool choice cannot both hold
  one output: that is a 400. Logprobs with tools are refused too (a stream's pieces no longer line up
  with tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kiln.engine.sampling_params import StructuredOutput
from kiln.serve.errors import InvalidRequestError
from kiln.serve.protocol import ChatCompletionRequest, ChatMessage
from kiln.serve.tool_grammar import tool_call_grammar
from kiln.serve.tool_parsers import ToolCallParser, detect_parser, get_tool_parser

FALLBACK_PARSER = "hermes"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    parser: str  # the tool-call format the output is read in
    tools: list[dict[str, Any]]  # OpenAI tool definitions, as the template takes them
    native: bool  # the chat template renders tools itself
    constraint: StructuredOutput | None  # "required" / named: a grammar of calls

    def new_parser(self) -> ToolCallParser:
        return get_tool_parser(self.parser)()


def tool_format(chat_template: str | None, configured: str | None) -> str:
    """The format a model writes tool calls in: the setting, else the template's, else Kiln's fallback."""
    return configured or detect_parser(chat_template) or FALLBACK_PARSER


def plan_tools(body: ChatCompletionRequest, tokenizer: Any, configured_parser: str | None) -> ToolPlan | None:
    """How this request's tools are offered and read; None when it offers none (or chooses "none")."""
    for name in ("functions", "function_call"):
        if (body.model_extra or {}).get(name) is not None:
            raise InvalidRequestError(
                f"{name} is OpenAI's retired form: send tools and tool_choice", param=name
            )
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    if body.logprobs:
        raise InvalidRequestError("logprobs with tools is not supported", param="logprobs")
    template = getattr(tokenizer.hf, "chat_template", None)
    native = isinstance(template, str) and "tools" in template
    parser = tool_format(template if native else None, configured_parser)
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    constraint = None
    if choice not in (None, "auto"):
        named = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.function.name}}
        )
        special = set(tokenizer.hf.get_added_vocab())
        try:
            grammar = tool_call_grammar(
                parser, tools, named, body.parallel_tool_calls, special_tokens=special
            )
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="tool_choice") from None
        constraint = StructuredOutput("grammar", grammar)
    return ToolPlan(parser=parser, tools=tools, native=native, constraint=constraint)


def renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template itself renders tools (and tool calls and results)."""
    template = getattr(tokenizer.hf, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def template_messages(
    messages: list[ChatMessage], plan: ToolPlan | None, native: bool
) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it (see the module rules); `native`: the template
    renders tools itself."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name; templates know "system"
        entry: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls
            ]
            if not native:
                blocks = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
                entry["content"] = (entry["content"] + "\n" + blocks).strip()
            else:
                entry["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": call}
                    for c, call in zip(m.tool_calls, calls, strict=True)
                ]
        if role == "tool":
            if not native:
                entry = {"role": "user", "content": f"<tool_response>\n{entry['content']}\n</tool_response>"}
            elif m.tool_call_id is not None:
                entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    if plan is not None and not plan.native:
        out = _with_fallback_instructions(out, plan.tools)
    return out


def _arguments(text: str) -> Any:
    """Templates format arguments themselves (`tojson`): hand them an object, not a JSON string."""
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidRequestError(
            "a tool call's arguments in messages must be JSON text", param="messages"
        ) from None


def _with_fallback_instructions(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    described = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    instructions = (
        "You can call these functions:\n<tools>\n" + described + "\n</tools>\n"
        "To call one, answer with a block per call:\n<tool_call>\n"
        '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
    )
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + instructions}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]
