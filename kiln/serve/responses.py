"""OpenAI's Responses API: `POST /v1/responses` (the stored ones are kiln.serve.stored_responses').

A response runs as a chat completion (kiln.serve.chat's `prepare_chat`): its `instructions`, the stored
conversation of `previous_response_id` and its `input` become the messages; its tools, `tool_choice`,
`text.format` and sampling fields become chat's; errors name the Responses API's fields.

Rules:
- Output items come in the order the model wrote them: text makes a message item, each tool call a
  function_call item (read by the model's tool-call parser, as on chat). Without calls the output is
  one message, its text possibly empty.
- Status "completed", or "incomplete" (`incomplete_details.reason` "max_output_tokens") when the
  output ran out of tokens; the last item is then "incomplete" too. A failure is an HTTP error, or in
  a stream an `error` event that ends it.
- A stream is named events (`event: response.output_text.delta`, ...) with increasing
  `sequence_number`s, as OpenAI sends them: response.created, response.in_progress, per item its
  output_item.added, content_part.added, the deltas, their done events and output_item.done, then
  response.completed or response.incomplete; no `[DONE]`.
- `truncation: "auto"`: a conversation too long for the context (with max_output_tokens) loses its
  oldest turns, cut before a user message, as few as it takes; the stored conversation stays whole.
- `store` (default: true when the server keeps responses) keeps the finished response
  (kiln.serve.response_store); `store: true` on a server that keeps none is a 400, and a
  `previous_response_id` not kept is a 404 (`previous_response_not_found`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request, Response
from pydantic import ValidationError

from kiln.serve.background_responses import start_background
from kiln.serve.chat import ChatJob, prepare_chat, render_chat
from kiln.serve.endpoint import RequestStart, answer, begin_request
from kiln.serve.errors import APIError, InvalidRequestError, NotFoundError
from kiln.serve.generation import Generation, TimeoutHeader
from kiln.serve.logprobs import chat_logprobs
from kiln.serve.protocol import ChatCompletionRequest, Usage
from kiln.serve.reasoning import REASONING_END, ReasoningParser
from kiln.serve.response_output import OutputItems, error_event, item_json
from kiln.serve.response_store import StoredResponse
from kiln.serve.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolCall,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputMessage,
    OutputTokensDetails,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    content_text,
)
from kiln.serve.state import ServerState
from kiln.serve.stored_responses import input_items
from kiln.serve.usage import UsageCounter, token_text_fn

# What a chat field that an error names is called in a Responses request.
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
}


# Fields a Responses request passes to chat as they are.
_CHAT_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "stop", "ignore_eos", "priority", "parallel_tool_calls", "stream", "user", "metadata",
)  # fmt: skip


def responses_param(param: str) -> str:
    """The Responses request's name of chat field `param` (a dotted path)."""
    head, _, rest = param.partition(".")
    if head in _PARAMS:
        return _PARAMS[head] if head == "messages" else ".".join(p for p in (_PARAMS[head], rest) if p)
    if head == "tools":  # tools.N.function.x: a Responses tool is the function itself
        return param.replace(".function", "", 1)
    if head == "tool_choice":
        return "tool_choice.name" if rest else head
    return param


async def create_response(
    body: ResponsesRequest, request: Request, x_request_timeout: TimeoutHeader = None
) -> Response:
    start = begin_request(body, request, x_request_timeout, "resp_")
    state = start.state
    store = _store(body, state)
    if body.background and not store:
        raise InvalidRequestError(
            "a background response needs store (it is read back with GET)", param="store"
        )
    history: tuple[dict[str, Any], ...] = ()
    if body.previous_response_id is not None:
        previous = state.responses.get(body.previous_response_id)
        if previous is None:
            raise NotFoundError(
                f"previous response '{body.previous_response_id}' is not stored here (it was never stored, "
                "was deleted, or went to make room)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = previous.conversation
    given = tuple(_input_messages(body))
    system = ({"role": "system", "content": body.instructions},) if body.instructions is not None else ()
    with _responses_params():
        try:
            job = await _prepare(body, start, [*system, *history, *given])
        except InvalidRequestError as exc:
            if body.truncation != "auto" or exc.code != "context_length_exceeded":
                raise
            kept = await _fitting(body, state, system, (*history, *given), exc)
            job = await _prepare(body, start, [*system, *kept])
    run = _Run(body, state, start, job, store, (*history, *given))
    if body.background:
        return start_background(run, state, request, stream=body.stream)
    return await answer(
        start,
        request,
        job.generation,
        stream=run.stream if body.stream else None,
        collect=run.collect,
        done_event=False,
    )


@contextlib.contextmanager
def _responses_params() -> Iterator[None]:
    """A 400 raised inside names the Responses request's field, not chat's."""
    try:
        yield
    except InvalidRequestError as exc:
        if exc.param is not None:
            exc.param = responses_param(exc.param)
        raise


async def _prepare(body: ResponsesRequest, start: RequestStart, messages: list[dict[str, Any]]) -> ChatJob:
    return await prepare_chat(
        _chat_request(body, messages),
        start,
        endpoint="responses",
        param_name=responses_param,
        log_tags=body.log_tags(),
    )


async def _fitting(
    body: ResponsesRequest,
    state: ServerState,
    system: tuple[dict[str, Any], ...],
    conversation: tuple[dict[str, Any], ...],
    too_long: InvalidRequestError,
) -> tuple[dict[str, Any], ...]:
    """`truncation: "auto"`: the conversation without its oldest turns, as few as the prompt and
    max_output_tokens need to fit the context. It is cut before a user message (chat templates open
    with one); `too_long` is raised when even the last user message on does not fit."""
    room = state.engine.model_info.max_model_len - (body.max_output_tokens or 1)
    starts = [i for i, m in enumerate(conversation) if i > 0 and m["role"] == "user"]

    async def fits(start: int) -> bool:
        chat = _chat_request(body, [*system, *conversation[start:]])
        prompt_ids, _ = await render_chat(chat, state, responses_param)
        return len(prompt_ids) <= room

    low, high = 0, len(starts)  # the first start that fits, by bisection: fewer turns, fewer tokens
    while low < high:
        middle = (low + high) // 2
        if await fits(starts[middle]):
            high = middle
        else:
            low = middle + 1
    if low == len(starts):
        raise too_long
    return conversation[starts[low] :]


def _store(body: ResponsesRequest, state: ServerState) -> bool:
    if body.store and state.responses.capacity == 0:
        raise InvalidRequestError(
            "this server keeps no responses (--responses-store-size 0): send store false, or leave it out",
            param="store",
        )
    return body.store if body.store is not None else state.responses.capacity > 0


def _input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The input as chat messages: a function_call joins the assistant message before it (else starts
    one), a function_call_output is a tool message, a reasoning item is left out."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out: list[dict[str, Any]] = []
    for item in body.input:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": content_text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": None})
            out[-1] = {**out[-1], "tool_calls": [*out[-1].get("tool_calls", ()), call]}
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": content_text(item.output)})
    return out


def _chat_request(body: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion request that `body` runs as."""
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError(
            'top_logprobs needs include ["message.output_text.logprobs"]', param="top_logprobs"
        )
    fields: dict[str, Any] = {name: getattr(body, name) for name in _CHAT_FIELDS}
    fields |= {
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "logprobs": body.logprobs,
    }
    if body.logprobs:
        fields["top_logprobs"] = body.top_logprobs or 0
    if body.tools is not None:
        fields["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)}
            for t in body.tools
        ]
    choice = body.tool_choice
    if choice is not None:
        fields["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        schema = fmt.model_dump(
            include={"name", "description", "schema_", "strict"}, exclude_none=True, by_alias=True
        )
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        fields["response_format"] = {"type": fmt.type}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:  # a message the chat form cannot hold
        first = exc.errors()[0]
        raise InvalidRequestError(f"input: {first['msg']}", param="input") from None


class _Run:
    """One response being made: its output read, its object built, stored when finished."""

    def __init__(
        self,
        body: ResponsesRequest,
        state: ServerState,
        start: RequestStart,
        job: ChatJob,
        store: bool,
        conversation: tuple[dict[str, Any], ...],
    ) -> None:
        self.body, self.state, self.start, self.job = body, state, start, job
        self.store, self.conversation = store, conversation
        self.created_at = int(time.time())
        self.usage = UsageCounter()
        self.token_text = token_text_fn(state.engine.tokenizer)
        self.output = OutputItems(events=body.stream or body.background)
        self.error: APIError | None = None  # what ended a stream early
        self.final: ResponseObject | None = None  # the finished response, once a stream is through
        self.output_ids: list[int] = []  # with --reasoning-parser: where the reasoning ends
        self.reasoning_end: int | None = None  # output tokens through the one that closed the reasoning

    @property
    def response_id(self) -> str:
        return self.start.request_id

    @property
    def generation(self) -> Generation:
        return self.job.generation

    async def _read(self) -> AsyncIterator[str | None]:
        """Read the generation into the output items, yielding after each engine output its finish
        reason."""
        job, tokenizer, output = self.job, self.state.engine.tokenizer, self.output
        parser = job.plan.new_parser() if job.plan is not None else None
        thinking = ReasoningParser() if job.reasoning else None
        async for _, out in job.generation.outputs():
            self.usage.add(out)
            for c in out.outputs:
                text, first = c.text, len(self.output_ids)  # `first`: this delta's first token's index
                if thinking is not None:  # the reasoning first, its own item; the answer goes on
                    self.output_ids += c.token_ids
                    was_thinking = thinking.thinking
                    pieces = [*thinking.feed(text), *(thinking.finish() if c.finish_reason else ())]
                    for piece in pieces:
                        if piece.reasoning:
                            output.reasoning(piece.text)
                    text = "".join(p.text for p in pieces if not p.reasoning)
                    if was_thinking and not thinking.thinking:
                        self.reasoning_end = self._closing_token(first)
                if parser is not None:
                    output.deltas(parser.feed(text))
                    if c.finish_reason is not None:
                        output.deltas(parser.finish())
                elif job.top_n is not None:
                    # The answer's tokens only: OpenAI's reasoning items carry no logprobs.
                    skip = max(0, self._answer_start() - first)
                    if text or skip < len(c.token_ids):
                        lps = chat_logprobs(
                            c.token_ids[skip:],
                            (c.logprobs or [])[skip:],
                            job.top_n,
                            self.token_text,
                            tokenizer.token_bytes,
                        ).content
                        output.text(text, lps)
                elif text:
                    output.text(text)
            yield out.outputs[-1].finish_reason if out.outputs else None

    def _closing_token(self, first: int) -> int:
        """The output's tokens through the one whose text completes `</think>`, found in the delta that
        closed the reasoning (from token `first` on) by decoding the output's prefixes; the whole delta
        when its tokens' own text does not show the tag."""
        decode, ids = self.state.engine.tokenizer.decode, self.output_ids
        low, high = first + 1, len(ids)
        if REASONING_END not in decode(ids):
            return high
        while low < high:  # the shortest prefix that holds the tag: it only grows with the prefix
            middle = (low + high) // 2
            if REASONING_END in decode(ids[:middle]):
                high = middle
            else:
                low = middle + 1
        return low

    def _answer_start(self) -> int:
        """The index of the answer's first output token: 0 without reasoning, the end while thinking."""
        if not self.job.reasoning:
            return 0
        return self.reasoning_end if self.reasoning_end is not None else len(self.output_ids)

    def snapshot(self, status: str, error: APIError | None = None) -> ResponseObject:
        """The response as it stands, with `status` (a stopped one's open item ends "incomplete")."""
        if status in ("failed", "cancelled"):
            self.output.close("incomplete")
        return self._response(status, error)

    def _response(self, status: str, error: APIError | None = None) -> ResponseObject:
        body, params = self.body, self.job.generation.params
        final = status not in ("queued", "in_progress")
        text = (
            {"format": body.text.format.model_dump(exclude_none=True, by_alias=True)}
            if body.text and body.text.format
            else {"format": {"type": "text"}}
        )
        choice = body.tool_choice
        usage = self.usage.usage() if final else None
        return ResponseObject(
            id=self.start.request_id,
            created_at=self.created_at,
            completed_at=int(time.time()) if final else None,
            status=status,  # type: ignore[arg-type]
            error=None if error is None else ResponseError(code=error.code, message=error.message),
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete"
            else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=self.state.model_name,
            output=list(self.output.items),
            parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id,
            store=self.store,
            temperature=params.temperature,
            top_p=params.top_p,
            top_logprobs=body.top_logprobs or 0,
            text=text,
            truncation=body.truncation,
            tool_choice=(choice if isinstance(choice, str) else choice.model_dump())
            if choice is not None
            else "auto",
            tools=[t.model_dump(exclude_none=True, by_alias=True) for t in body.tools or ()],
            # The reasoning's tokens: those before the answer's first (all of them while thinking).
            usage=None if usage is None else _usage(usage, self._answer_start()),
            user=body.user,
            metadata=body.metadata or {},
            background=body.background,
            system_fingerprint=self.job.generation.system_fingerprint,
        )

    def keep(self, response: ResponseObject, events: tuple[tuple[str, str], ...] | None = None) -> None:
        """Store `response` (when asked), with its conversation and input items; `events`: a background
        response's stream, for GET to replay."""
        if not self.store:
            return
        text = "".join(i.content[0].text for i in response.output if isinstance(i, OutputMessage))
        calls = [
            {"id": i.call_id, "type": "function", "function": {"name": i.name, "arguments": i.arguments}}
            for i in response.output
            if isinstance(i, FunctionToolCall)
        ]
        reply: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            reply["tool_calls"] = calls
        self.state.responses.put(
            StoredResponse(response, (*self.conversation, reply), input_items(self.body), events)
        )

    async def collect(self) -> ResponseObject:
        finish = None
        async for reason in self._read():
            finish = reason or finish
        response = self._response(self.output.finish(finish))
        self.keep(response)
        return response

    async def stream(self) -> AsyncIterator[tuple[str, str]]:
        sequence = 0

        def event(payload: dict[str, Any]) -> tuple[str, str]:
            nonlocal sequence
            payload["sequence_number"] = sequence
            sequence += 1
            return payload["type"], json.dumps(payload, ensure_ascii=False, separators=(",", ":"))

        output = self.output
        created = "queued" if self.body.background else "in_progress"
        yield event({"type": "response.created", "response": item_json(self.snapshot(created))})
        yield event({"type": "response.in_progress", "response": item_json(self.snapshot("in_progress"))})
        finish = None
        try:
            async for reason in self._read():
                finish = reason or finish
                for e in output.take_events():
                    yield event(e)
        except APIError as exc:
            self.error = exc
            yield event(error_event(exc))
            return
        status = output.finish(finish)
        for e in output.take_events():
            yield event(e)
        response = self.final = self._response(status)
        if not self.body.background:  # a background response is kept with its events, by its runner
            self.keep(response)
        yield event({"type": f"response.{status}", "response": item_json(response)})


def _usage(usage: Usage, reasoning_tokens: int) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
        total_tokens=usage.total_tokens,
    )
