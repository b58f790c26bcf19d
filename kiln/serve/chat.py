"""`POST /v1/chat/completions`: messages -> chat template -> engine -> OpenAI response or SSE chunks.

Stream order per choice (OpenAI's): a chunk with `delta.role`, content chunks, a chunk with an empty
delta and `finish_reason`; with `stream_options.include_usage`, every chunk carries `usage: null`
and one last chunk with no choices carries the usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request, Response

from kiln.serve.errors import InvalidRequestError
from kiln.serve.generation import Generation, Prompt, new_completion_id
from kiln.serve.logprobs import chat_logprobs
from kiln.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
)
from kiln.serve.sampling import log_unknown_fields, resolve_max_tokens, structured_output, to_sampling_params
from kiln.serve.sse import ClientDisconnected, cancel_on_disconnect, sse_response
from kiln.serve.state import ServerState, server_state
from kiln.serve.tokenize import check_prompt_text, tokenize
from kiln.serve.usage import UsageCounter, token_text_fn


def _messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for the system role; chat templates only know "system".
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]


def _refuse_tools(body: ChatCompletionRequest) -> None:
    """Tool calling is not served yet: a request that offers tools gets a 400, never an answer that
    silently ignored them."""
    extra = body.model_extra or {}
    for name in ("tools", "functions"):
        if extra.get(name):
            raise InvalidRequestError(f"{name} are not supported by this server yet", param=name)
    for name in ("tool_choice", "function_call"):
        if extra.get(name) not in (None, "none"):
            raise InvalidRequestError(f"{name} is not supported by this server yet", param=name)


def _top_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    http_request_id = request.state.request_id
    request_id = new_completion_id("chatcmpl")
    state.admission.check_accepting()
    state.check_model(body.model)
    log_unknown_fields(body, http_request_id)
    _refuse_tools(body)
    tokenizer = state.engine.tokenizer
    messages = _messages(body)
    chars = check_prompt_text(
        (m["content"] for m in messages), limit=state.settings.max_prompt_chars, param="messages"
    )
    try:
        prompt_ids = list(await tokenize(lambda: tokenizer.apply_chat_template(messages), chars=chars))
    except ValueError as exc:  # no chat template, or a message it cannot render
        raise InvalidRequestError(str(exc), param="messages") from None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(
        requested,
        param="max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        prompt_tokens=len(prompt_ids),
        max_model_len=state.engine.model_info.max_model_len,
        default=state.settings.default_max_tokens,
        limit=state.settings.max_tokens_limit,
        prompt_param="messages",
    )
    top_n = _top_logprobs(body)
    structured, structured_param = structured_output(body)
    params = to_sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=top_n,
        vocab_size=tokenizer.vocab_size,
        logprobs_param="top_logprobs",
        structured=structured,
    )
    ticket = state.admission.admit(params.n, params.n * (len(prompt_ids) + max_tokens))
    generation = Generation(
        state,
        request_id=request_id,
        http_request_id=http_request_id,
        endpoint="chat",
        prompts=[Prompt(prompt_ids)],
        params=params,
        priority=body.priority,
        ticket=ticket,
        stream=body.stream,
        structured_param=structured_param,
    )
    generation.start()  # the engine gets the request now, not when the response first reads
    if body.stream:
        chunks = _stream(generation, body, top_n, state)
        return sse_response(
            chunks, settings=state.settings, request_id=http_request_id, on_close=generation.aclose
        )
    try:
        result = await cancel_on_disconnect(request, _collect(generation, body, top_n, state))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await generation.aclose()  # also when _collect never ran: the handler was cancelled first
    return Response(result.model_dump_json(), media_type="application/json")


async def _collect(
    generation: Generation, body: ChatCompletionRequest, top_n: int | None, state: ServerState
) -> ChatCompletionResponse:
    token_text = token_text_fn(state.engine.tokenizer)
    texts = [""] * body.n
    logprobs = [ChatLogprobs(content=[]) for _ in range(body.n)]
    finish: list[str | None] = [None] * body.n
    stop_reason: list[str | int | None] = [None] * body.n
    usage = UsageCounter()
    async for _, out in generation.outputs():
        usage.add(out)
        for c in out.outputs:
            texts[c.index] += c.text
            if top_n is not None and c.logprobs:
                logprobs[c.index].content += chat_logprobs(c.token_ids, c.logprobs, top_n, token_text).content
            if c.finish_reason is not None:
                finish[c.index], stop_reason[c.index] = c.finish_reason, c.stop_reason
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=texts[i]),
            logprobs=logprobs[i] if top_n is not None else None,
            finish_reason=finish[i],
            stop_reason=stop_reason[i],
        )
        for i in range(body.n)
    ]
    return ChatCompletionResponse(
        id=generation.request_id, model=state.model_name, choices=choices, usage=usage.usage()
    )


async def _stream(
    generation: Generation, body: ChatCompletionRequest, top_n: int | None, state: ServerState
) -> AsyncIterator[str]:
    token_text = token_text_fn(state.engine.tokenizer)
    created = int(time.time())
    exclude = None if body.include_usage else {"usage"}

    def chunk(choice: ChatChunkChoice) -> str:
        return ChatCompletionChunk(
            id=generation.request_id, created=created, model=state.model_name, choices=[choice]
        ).model_dump_json(exclude=exclude)

    for index in range(body.n):
        yield chunk(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))
    usage = UsageCounter()
    async for _, out in generation.outputs():
        usage.add(out)
        for c in out.outputs:
            if c.text or c.token_ids:
                lp = (
                    chat_logprobs(c.token_ids, c.logprobs or [], top_n, token_text)
                    if top_n is not None
                    else None
                )
                if c.text or (lp and lp.content):
                    yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(content=c.text), logprobs=lp))
            if c.finish_reason is not None:
                yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=c.finish_reason))
    if body.include_usage:
        yield ChatCompletionChunk(
            id=generation.request_id, created=created, model=state.model_name, choices=[], usage=usage.usage()
        ).model_dump_json()
