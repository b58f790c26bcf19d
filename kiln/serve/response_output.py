"""A response's output items (kiln.serve.responses) as the model's text comes in, and the stream
events that build them.

Rules: reasoning opens a reasoning item (one reasoning_text part, its deltas
response.reasoning_text.delta) unless one is open; text opens a message item (one output_text part)
unless one is open; a tool call's header
opens a function_call item, its argument fragments go to it; opening an item closes the one before
("completed"); the last one closes with the response's status. Each step emits OpenAI's events:
output_item.added, content_part.added, output_text.delta (its logprobs without bytes, as OpenAI's),
function_call_arguments.delta, and on closing the .done events and output_item.done.
"""

from __future__ import annotations

import secrets
from typing import Any, TypeVar

from kiln.serve.errors import APIError
from kiln.serve.protocol import ChatTokenLogprob
from kiln.serve.responses_protocol import (
    FunctionToolCall,
    OutputMessage,
    OutputText,
    ReasoningOutput,
    ReasoningText,
)
from kiln.serve.tool_calls import ContentDelta, Delta, ToolCallDelta

_Item = TypeVar("_Item", OutputMessage, ReasoningOutput)


def new_item_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class OutputItems:
    """The output items as the model's text comes in and, when `events`, the stream events that build
    them (taken with `take_events`)."""

    def __init__(self, events: bool) -> None:
        self.items: list[OutputMessage | FunctionToolCall | ReasoningOutput] = []
        self._open = False  # the last item takes more
        self._events: list[dict[str, Any]] | None = [] if events else None

    def _emit(self, **event: Any) -> None:
        if self._events is not None:
            self._events.append(event)

    def take_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events or [], []
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1].id, "output_index": len(self.items) - 1}

    def _open_one(self, kind: type[_Item]) -> tuple[_Item, bool]:
        """The open last item when it is a `kind`, else a new one opened (the last closed): the item and
        whether it is new."""
        last = self.items[-1] if self.items and self._open else None
        if isinstance(last, kind):
            return last, False
        self.close("completed")
        prefix = {OutputMessage: "msg_", ReasoningOutput: "rs_"}[kind]
        item = kind(id=new_item_id(prefix), status="in_progress", content=[])
        self._open_item(item)
        return item, True

    def text(self, text: str, logprobs: list[ChatTokenLogprob] | None = None) -> None:
        message, new = self._open_one(OutputMessage)
        if new:
            part = OutputText(text="", logprobs=[] if logprobs is not None else None)
            message.content.append(part)
            self._emit(
                type="response.content_part.added", **self._where(), content_index=0, part=item_json(part)
            )
        part = message.content[0]
        part.text += text
        if logprobs is not None and part.logprobs is not None:
            part.logprobs.extend(logprobs)
        if text or logprobs:
            self._emit(
                type="response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=text,
                logprobs=[_delta_logprob(lp) for lp in logprobs or ()],
            )

    def reasoning(self, text: str) -> None:
        item, new = self._open_one(ReasoningOutput)
        if new:
            item.content.append(ReasoningText(text=""))
        item.content[0].text += text
        if text:
            self._emit(type="response.reasoning_text.delta", **self._where(), content_index=0, delta=text)

    def call(self, call_id: str, name: str) -> None:
        self.close("completed")
        self._open_item(
            FunctionToolCall(
                id=new_item_id("fc_"), call_id=call_id, name=name, arguments="", status="in_progress"
            )
        )

    def arguments(self, fragment: str) -> None:
        call = self.items[-1]
        assert isinstance(call, FunctionToolCall) and self._open
        call.arguments += fragment
        self._emit(type="response.function_call_arguments.delta", **self._where(), delta=fragment)

    def deltas(self, deltas: list[Delta]) -> None:
        for d in deltas:
            if isinstance(d, ContentDelta):
                self.text(d.text)
            elif isinstance(d, ToolCallDelta):
                if d.name is not None:
                    self.call(d.id or "", d.name)
                if d.arguments:
                    self.arguments(d.arguments)

    def close(self, status: str) -> None:
        """End the last item, if open, with `status`."""
        if not (self.items and self._open):
            return
        self._open = False
        item = self.items[-1]
        item.status = status  # type: ignore[assignment]
        where = self._where()
        if isinstance(item, ReasoningOutput):
            text = item.content[0].text
            self._emit(type="response.reasoning_text.done", **where, content_index=0, text=text)
        elif isinstance(item, OutputMessage):
            part = item.content[0]
            done: dict[str, Any] = {
                "text": part.text,
                "logprobs": [item_json(lp) for lp in part.logprobs or ()],
            }
            self._emit(type="response.output_text.done", **where, content_index=0, **done)
            self._emit(type="response.content_part.done", **where, content_index=0, part=item_json(part))
        else:
            self._emit(
                type="response.function_call_arguments.done",
                **where,
                name=item.name,
                arguments=item.arguments,
            )
        self._emit(type="response.output_item.done", output_index=where["output_index"], item=item_json(item))

    def finish(self, finish_reason: str | None) -> str:
        """End the output; its status ("incomplete" when it ran out of tokens)."""
        status = "incomplete" if finish_reason == "length" else "completed"
        if not self.items:
            self.text("")
        self.close(status)
        return status

    def _open_item(self, item: OutputMessage | FunctionToolCall | ReasoningOutput) -> None:
        self.items.append(item)
        self._open = True
        self._emit(type="response.output_item.added", output_index=len(self.items) - 1, item=item_json(item))


def item_json(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _delta_logprob(lp: ChatTokenLogprob) -> dict[str, Any]:
    """A stream delta's logprob: OpenAI's form there has no bytes."""
    tops = [{"token": t.token, "logprob": t.logprob} for t in lp.top_logprobs]
    return {"token": lp.token, "logprob": lp.logprob, "top_logprobs": tops}


def error_event(error: APIError) -> dict[str, Any]:
    """The stream event of an error that ended it (OpenAI's `error` event)."""
    return {"type": "error", "code": error.code, "message": error.message, "param": error.param}
