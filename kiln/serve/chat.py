"""`POST /v1/chat/completions`: messages -> chat template -> engine -> OpenAI response or SSE chunks.

Stream order per choice (OpenAI's): a chunk with `delta.role`, content chunks (with `--reasoning-parser`,
the `reasoning_content` chunks before them: kiln.serve.reasoning), a chunk with an empty delta and
`finish_reason`; with `stream_options.include_usage`, every chunk carries `usage: null`
(with `continuous_usage_stats`, the usage so far) and one last chunk with no choices carries the usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request, Response

from kiln.serve.chat_tools import ToolPlan, plan_tools, renders_tools, template_messages
from kiln.serve.endpoint import RequestStart, answer, begin_request
from kiln.serve.errors import InvalidRequestError
from kiln.serve.generation import Generation, Prompt, TimeoutHeader
from kiln.serve.logprobs import chat_logprobs, prompt_logprobs_out
from kiln.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    FunctionCallOut,
    ToolCallOut,
)
from kiln.serve.reasoning import REASONING_END, ReasoningParser
from kiln.serve.sampling import resolve_max_tokens, structured_output, to_sampling_params
from kiln.serve.state import ServerState
from kiln.serve.text_chunks import TextChunks
from kiln.serve.tokenize import chat_template_options, check_prompt_text, tokenize
from kiln.serve.tool_calls import Delta, ToolCallDelta
from kiln.serve.tool_parsers import parse_tool_calls
from kiln.serve.usage import UsageCounter, running_usage, token_text_fn


def _top_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


@dataclass(slots=True)
class ChatJob:
    """A chat request ready to run: its generation, and what reading its output needs."""

    generation: Generation
    plan: ToolPlan | None  # the tools offered, None when none
    top_n: int | None  # top logprobs per token, None without logprobs
    echoed: str  # the continued assistant message the reply starts with (vLLM's chat `echo`), or ""
    reasoning: bool  # the output's reasoning is read apart (`--reasoning-parser`)


def _same(param: str) -> str:
    return param


async def render_chat(
    body: ChatCompletionRequest, state: ServerState, param_name: Callable[[str], str] = _same
) -> tuple[list[int], ToolPlan | None]:
    """A chat request's prompt ids (its conversation through the chat template, tools planned and
    offered) and its tool plan; 400s as `prepare_chat` says."""
    tokenizer = state.engine.tokenizer
    plan = plan_tools(body, tokenizer, state.settings.tool_call_parser)
    native = renders_tools(tokenizer)
    messages = template_messages(body.messages, plan, native)
    tools = plan.tools if plan is not None and native else None
    chars = check_prompt_text(
        (m["content"] for m in messages), limit=state.settings.max_prompt_chars, param=param_name("messages")
    )
    options = chat_template_options(body, tokenizer)
    try:
        prompt_ids = list(
            await tokenize(
                lambda: tokenizer.apply_chat_template(messages, tools=tools, **options), chars=chars
            )
        )
    except ValueError as exc:  # no chat template, or a message it cannot render
        raise InvalidRequestError(str(exc), param=param_name("messages")) from None
    if body.truncate_prompt_tokens is not None:
        prompt_ids = prompt_ids[-body.truncate_prompt_tokens :]
    return prompt_ids, plan


async def prepare_chat(
    body: ChatCompletionRequest,
    start: RequestStart,
    *,
    endpoint: str = "chat",
    param_name: Callable[[str], str] = _same,
    log_tags: dict[str, Any] | None = None,
) -> ChatJob:
    """Render, tokenize and check a chat request, and make its generation (not yet started).
    `endpoint`, `param_name` and `log_tags` serve the Responses API, which runs as a chat: its name for
    the metrics and log line, what the request it came from calls each chat field that an error names,
    and that request's fields for the log line (default: `body.log_tags()`)."""
    state, deadline = start.state, start.deadline
    tokenizer = state.engine.tokenizer
    prompt_ids, plan = await render_chat(body, state, param_name)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(
        requested,
        param=param_name("max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"),
        prompt_tokens=len(prompt_ids),
        max_model_len=state.engine.model_info.max_model_len,
        default=state.default_max_tokens,
        limit=state.settings.max_tokens_limit,
        prompt_param=param_name("messages"),
    )
    top_n = _top_logprobs(body)
    structured, structured_param = structured_output(body)
    if plan is not None and plan.constraint is not None:
        if structured is not None:
            raise InvalidRequestError(
                f"tool_choice {body.tool_choice!r} and {structured_param} cannot both hold the output",
                param=param_name("tool_choice"),
            )
        structured, structured_param = plan.constraint, "tool_choice"
    reasoning = state.settings.reasoning_parser is not None
    if reasoning and structured is not None:  # the grammar holds the answer, not the thinking before it
        structured = replace(structured, after=REASONING_END)
    params = to_sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=top_n,
        vocab_size=tokenizer.vocab_size,
        logprobs_param=param_name("top_logprobs"),
        structured=structured,
        defaults=state.sampling_defaults,
    )
    ticket = state.admission.admit(
        params.n,
        params.n * (len(prompt_ids) + max_tokens),
        prompt_tokens=len(prompt_ids),
        time_left=None if deadline is None else deadline.left(),
    )
    last = body.messages[-1]
    echoed = last.text() if body.echo and last.role == "assistant" else ""  # vLLM's chat `echo`
    generation = Generation(
        state,
        request_id=start.request_id,
        http_request_id=start.http_request_id,
        endpoint=endpoint,
        prompts=[Prompt(prompt_ids)],
        params=params,
        priority=body.priority,
        ticket=ticket,
        stream=body.stream,
        structured_param=None if structured_param is None else param_name(structured_param),
        deadline=deadline,
        log_tags=body.log_tags() if log_tags is None else log_tags,
    )
    return ChatJob(generation, plan, top_n, echoed, reasoning)


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, x_request_timeout: TimeoutHeader = None
) -> Response:
    start = begin_request(body, request, x_request_timeout, "chatcmpl-")
    job = await prepare_chat(body, start)
    return await answer(
        start,
        request,
        job.generation,
        stream=(lambda: _stream(job, body, start.state)) if body.stream else None,
        collect=lambda: _collect(job, body, start.state),
    )


def _message(text: str, finish: str | None, plan: ToolPlan | None) -> tuple[AssistantMessage, str | None]:
    """The assistant message of one choice, its tool calls read out when tools were offered."""
    if plan is None:
        return AssistantMessage(content=text), finish
    parsed = parse_tool_calls(text, plan.parser)
    if not parsed.tool_calls:
        return AssistantMessage(content=parsed.content or ""), finish
    calls = [
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in parsed.tool_calls
    ]
    return AssistantMessage(
        content=parsed.content, tool_calls=calls
    ), "tool_calls" if finish == "stop" else finish


async def _collect(job: ChatJob, body: ChatCompletionRequest, state: ServerState) -> ChatCompletionResponse:
    generation, top_n, plan = job.generation, job.top_n, job.plan
    token_text = token_text_fn(state.engine.tokenizer)
    texts = [""] * body.n
    logprobs = [ChatLogprobs(content=[]) for _ in range(body.n)]
    finish: list[str | None] = [None] * body.n
    stop_reason: list[str | int | None] = [None] * body.n
    prompt_logprobs = None
    usage = UsageCounter()
    async for _, out in generation.outputs():
        usage.add(out)
        if body.prompt_logprobs is not None and out.prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs_out(
                generation.prompts[0].token_ids,
                out.prompt_logprobs,
                body.prompt_logprobs,
                token_text,
                body.return_tokens_as_token_ids,
            )
        for c in out.outputs:
            texts[c.index] += c.text
            if top_n is not None and c.logprobs:
                logprobs[c.index].content += chat_logprobs(
                    c.token_ids,
                    c.logprobs,
                    top_n,
                    token_text,
                    state.engine.tokenizer.token_bytes,
                    body.return_tokens_as_token_ids,
                ).content
            if c.finish_reason is not None:
                finish[c.index], stop_reason[c.index] = c.finish_reason, c.stop_reason
    choices = []
    for i in range(body.n):
        reasoning, answer = ReasoningParser.split(texts[i]) if job.reasoning else (None, texts[i])
        message, finish_reason = _message(job.echoed + answer, finish[i], plan)
        message.reasoning_content = reasoning
        choices.append(
            ChatChoice(
                index=i,
                message=message,
                logprobs=logprobs[i] if top_n is not None else None,
                finish_reason=finish_reason,
                stop_reason=stop_reason[i],
            )
        )
    return ChatCompletionResponse(
        id=generation.request_id,
        model=state.model_name,
        system_fingerprint=generation.system_fingerprint,
        choices=choices,
        usage=usage.usage(),
        prompt_logprobs=prompt_logprobs,
    )


async def _stream(job: ChatJob, body: ChatCompletionRequest, state: ServerState) -> AsyncIterator[str]:
    generation, top_n, plan, echoed = job.generation, job.top_n, job.plan, job.echoed
    token_text = token_text_fn(state.engine.tokenizer)
    created = int(time.time())
    exclude = None if body.include_usage else {"usage"}
    usage = UsageCounter()
    running = running_usage(body, sum(len(p.token_ids) for p in generation.prompts), usage)

    def chunk(choice: ChatChunkChoice) -> str:
        return ChatCompletionChunk(
            id=generation.request_id,
            created=created,
            model=state.model_name,
            system_fingerprint=generation.system_fingerprint,
            choices=[choice],
            usage=None if running is None else running(),
        ).model_dump_json(exclude=exclude)

    def render_text(index: int, text: str) -> str:
        return chunk(ChatChunkChoice(index=index, delta=ChatDelta(content=text)))

    text_chunk = TextChunks(render_text, fixed=running is None)
    for index in range(body.n):
        yield chunk(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))
    parsers = [plan.new_parser() for _ in range(body.n)] if plan is not None else None
    thinking = [ReasoningParser() for _ in range(body.n)] if job.reasoning else None
    called = [False] * body.n

    def tool_chunks(index: int, deltas: list[Delta]) -> list[str]:
        out = []
        for d in deltas:
            if isinstance(d, ToolCallDelta):
                called[index] = True
                out.append(chunk(ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=[d.to_openai()]))))
            elif d.text:
                out.append(text_chunk(index, d.text, generation.system_fingerprint))
        return out

    if echoed:  # the message the reply continues, first (through the parser, which reads it whole)
        for index in range(body.n):
            if parsers is not None:
                for piece in tool_chunks(index, parsers[index].feed(echoed)):
                    yield piece
            else:
                yield text_chunk(index, echoed, generation.system_fingerprint)
    async for _, out in generation.outputs():
        usage.add(out)
        for c in out.outputs:
            text, reasoning = c.text, ""
            if thinking is not None:  # the reasoning apart, first; the answer goes on as the text
                reader = thinking[c.index]
                pieces = [*reader.feed(text), *(reader.finish() if c.finish_reason is not None else ())]
                reasoning = "".join(p.text for p in pieces if p.reasoning)
                text = "".join(p.text for p in pieces if not p.reasoning)
                if reasoning and (text or top_n is None):  # else it carries the delta's logprobs, below
                    yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(reasoning_content=reasoning)))
            if parsers is not None:  # tools offered: the text goes through the choice's parser
                for piece in tool_chunks(c.index, parsers[c.index].feed(text)):
                    yield piece
                if c.finish_reason is not None:
                    for piece in tool_chunks(c.index, parsers[c.index].finish()):
                        yield piece
                    reason = (
                        "tool_calls" if called[c.index] and c.finish_reason == "stop" else c.finish_reason
                    )
                    yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=reason))
                continue
            if c.text or c.token_ids or reasoning or text:
                lp = (
                    chat_logprobs(
                        c.token_ids,
                        c.logprobs or [],
                        top_n,
                        token_text,
                        state.engine.tokenizer.token_bytes,
                        body.return_tokens_as_token_ids,
                    )
                    if top_n is not None
                    else None
                )
                if lp is None:
                    if text:
                        yield text_chunk(c.index, text, generation.system_fingerprint)
                elif reasoning and not text:  # a delta all reasoning: its chunk carries the logprobs
                    delta = ChatDelta(reasoning_content=reasoning)
                    yield chunk(ChatChunkChoice(index=c.index, delta=delta, logprobs=lp))
                elif text or lp.content:
                    yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(content=text), logprobs=lp))
            if c.finish_reason is not None:
                yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=c.finish_reason))
    if body.include_usage:
        yield ChatCompletionChunk(
            id=generation.request_id,
            created=created,
            model=state.model_name,
            system_fingerprint=generation.system_fingerprint,
            choices=[],
            usage=usage.usage(),
        ).model_dump_json()
