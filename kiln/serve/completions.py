"""`POST /v1/completions`: the legacy text API — prompt(s) in, text out, stream or not.

Rules:
- `prompt` may be a string, a list of strings, token ids, or a list of token-id lists; prompt i's
  choices have indices i*n .. i*n+n-1.
- `echo` puts the prompt text before the completion (in the first chunk when streaming); token-id
  prompts are echoed decoded. `echo` with `logprobs` scores the prompt too: its tokens come first in
  `logprobs`, the first with nulls (the engine computes such a prompt whole, without prefix-cache hits).
- `logprobs: k` returns the legacy shape; `text_offset` counts the characters of the tokens before each
  one (the echoed prompt's tokens included), its place in the returned text where the tokens' texts
  make up that text.
- `prompt_logprobs: k` (vLLM's extension) gives each choice its prompt's `prompt_logprobs`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request, Response

from kiln.engine.outputs import PromptLogprobs, TokenLogprobs
from kiln.serve.endpoint import answer, begin_request
from kiln.serve.errors import InvalidRequestError
from kiln.serve.generation import Generation, Prompt, TimeoutHeader
from kiln.serve.logprobs import completion_logprobs, merge_completion_logprobs, prompt_logprobs_out
from kiln.serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from kiln.serve.sampling import (
    check_token_ids,
    resolve_max_tokens,
    structured_output,
    to_sampling_params,
)
from kiln.serve.state import ServerState
from kiln.serve.text_chunks import TextChunks
from kiln.serve.tokenize import check_prompt_text, tokenize
from kiln.serve.usage import UsageCounter, running_usage, token_text_fn


async def _prompts(
    body: CompletionRequest, tokenizer: object, vocab_size: int, max_prompt_chars: int | None
) -> list[Prompt]:
    raw = body.prompt
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and isinstance(raw[0], int):  # the model's validation made the list all ints or no ints
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    texts = [item for item in items if isinstance(item, str)]
    chars = check_prompt_text(texts, limit=max_prompt_chars, param="prompt")
    encoded = iter(await tokenize(lambda: [tokenizer.encode(t) for t in texts], chars=chars))  # type: ignore[attr-defined]
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(list(next(encoded)), item))
        else:
            if not item:
                raise InvalidRequestError("a tokenized prompt must not be empty", param="prompt")
            check_token_ids(item, vocab_size=vocab_size, param="prompt")
            prompts.append(Prompt(item, None))
    keep = body.truncate_prompt_tokens
    if keep is not None:  # a cut text prompt is echoed as its kept tokens decode
        prompts = [p if len(p.token_ids) <= keep else Prompt(p.token_ids[-keep:], None) for p in prompts]
    return prompts


async def create_completion(
    body: CompletionRequest, request: Request, x_request_timeout: TimeoutHeader = None
) -> Response:
    start = begin_request(body, request, x_request_timeout, "cmpl-")
    state, deadline = start.state, start.deadline
    tokenizer = state.engine.tokenizer
    prompts = await _prompts(body, tokenizer, tokenizer.vocab_size, state.settings.max_prompt_chars)
    longest = max(len(p.token_ids) for p in prompts)
    max_tokens = resolve_max_tokens(
        body.max_tokens,
        param="max_tokens",
        prompt_tokens=longest,
        max_model_len=state.engine.model_info.max_model_len,
        default=state.default_max_tokens,
        limit=state.settings.max_tokens_limit,
        prompt_param="prompt",
    )
    structured, structured_param = structured_output(body)
    params = to_sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=body.logprobs,
        vocab_size=tokenizer.vocab_size,
        logprobs_param="logprobs",
        structured=structured,
        defaults=state.sampling_defaults,
        prompt_logprobs=body.logprobs if body.echo else None,
    )
    ticket = state.admission.admit(
        len(prompts) * params.n,
        params.n * sum(len(p.token_ids) + max_tokens for p in prompts),
        prompt_tokens=sum(len(p.token_ids) for p in prompts),
        time_left=None if deadline is None else deadline.left(),
    )
    generation = Generation(
        state,
        request_id=start.request_id,
        http_request_id=start.http_request_id,
        endpoint="completions",
        prompts=prompts,
        params=params,
        priority=body.priority,
        ticket=ticket,
        stream=body.stream,
        structured_param=structured_param,
        deadline=deadline,
        log_tags=body.log_tags(),
    )
    return await answer(
        start,
        request,
        generation,
        stream=(lambda: _stream(generation, body, state)) if body.stream else None,
        collect=lambda: _collect(generation, body, state),
    )


def _echo_text(prompt: Prompt, tokenizer: object) -> str:
    return prompt.text if prompt.text is not None else tokenizer.decode(prompt.token_ids)  # type: ignore[attr-defined]


async def _collect(generation: Generation, body: CompletionRequest, state: ServerState) -> CompletionResponse:
    tokenizer = state.engine.tokenizer
    token_text = token_text_fn(tokenizer)
    as_ids = body.return_tokens_as_token_ids
    n = body.n
    count = len(generation.prompts) * n
    texts = [_echo_text(generation.prompts[i // n], tokenizer) if body.echo else "" for i in range(count)]
    token_ids: list[list[int]] = [[] for _ in range(count)]
    entries: list[list[TokenLogprobs]] = [[] for _ in range(count)]
    scored: list[PromptLogprobs | None] = [None] * len(generation.prompts)
    choices = [CompletionChoice(index=i, text="") for i in range(count)]
    usage = UsageCounter()
    async for prompt_index, out in generation.outputs():
        usage.add(out)
        if out.prompt_logprobs is not None:
            scored[prompt_index] = out.prompt_logprobs
        for c in out.outputs:
            i = prompt_index * n + c.index
            texts[i] += c.text
            if body.logprobs is not None:
                token_ids[i] += c.token_ids
                entries[i] += c.logprobs or []
            if c.finish_reason is not None:
                choices[i].finish_reason, choices[i].stop_reason = c.finish_reason, c.stop_reason
    for i, choice in enumerate(choices):
        prompt, prompt_scores = generation.prompts[i // n], scored[i // n]
        choice.text = texts[i]
        if body.logprobs is not None:
            offset = 0
            choice.logprobs = CompletionLogprobs()
            if body.echo and prompt_scores is not None:
                choice.logprobs, offset = completion_logprobs(
                    prompt.token_ids, prompt_scores, body.logprobs, token_text, 0, as_ids
                )
            more, _ = completion_logprobs(token_ids[i], entries[i], body.logprobs, token_text, offset, as_ids)
            merge_completion_logprobs(choice.logprobs, more)
        if body.prompt_logprobs is not None and prompt_scores is not None:
            choice.prompt_logprobs = prompt_logprobs_out(
                prompt.token_ids, prompt_scores, body.prompt_logprobs, token_text, as_ids
            )
    return CompletionResponse(
        id=generation.request_id,
        model=state.model_name,
        system_fingerprint=generation.system_fingerprint,
        choices=choices,
        usage=usage.usage(),
    )


async def _stream(generation: Generation, body: CompletionRequest, state: ServerState) -> AsyncIterator[str]:
    tokenizer = state.engine.tokenizer
    token_text = token_text_fn(tokenizer)
    as_ids = body.return_tokens_as_token_ids
    created = int(time.time())
    n = body.n
    offsets = [0] * (len(generation.prompts) * n)
    exclude = None if body.include_usage else {"usage"}
    usage = UsageCounter()
    running = running_usage(body, sum(len(p.token_ids) for p in generation.prompts), usage)

    def chunk(choice: CompletionChoice) -> str:
        return CompletionResponse(
            id=generation.request_id,
            created=created,
            model=state.model_name,
            system_fingerprint=generation.system_fingerprint,
            choices=[choice],
            usage=None if running is None else running(),
        ).model_dump_json(exclude=exclude)

    echo_top = body.logprobs if body.echo else None  # echo with logprobs: the prompt's tokens lead
    if body.echo and echo_top is None:
        for i in range(len(offsets)):
            yield chunk(CompletionChoice(index=i, text=_echo_text(generation.prompts[i // n], tokenizer)))
    text_chunk = TextChunks(
        lambda index, text: chunk(CompletionChoice(index=index, text=text)), fixed=running is None
    )
    async for prompt_index, out in generation.outputs():
        usage.add(out)
        if echo_top is not None and out.prompt_logprobs is not None:
            # A prompt's first output carries its scores: its choices' echo chunks go first, with them.
            prompt = generation.prompts[prompt_index]
            for i in range(prompt_index * n, prompt_index * n + n):
                logprobs, offsets[i] = completion_logprobs(
                    prompt.token_ids, out.prompt_logprobs, echo_top, token_text, 0, as_ids
                )
                yield chunk(CompletionChoice(index=i, text=_echo_text(prompt, tokenizer), logprobs=logprobs))
        for c in out.outputs:
            i = prompt_index * n + c.index
            logprobs = None
            if body.logprobs is not None:
                logprobs, offsets[i] = completion_logprobs(
                    c.token_ids, c.logprobs or [], body.logprobs, token_text, offsets[i], as_ids
                )
            if not (c.text or c.token_ids or c.finish_reason is not None):
                continue
            if logprobs is None and c.finish_reason is None:
                yield text_chunk(i, c.text, generation.system_fingerprint)
            else:
                yield chunk(
                    CompletionChoice(index=i, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason)
                )
    if body.include_usage:
        yield CompletionResponse(
            id=generation.request_id,
            created=created,
            model=state.model_name,
            system_fingerprint=generation.system_fingerprint,
            choices=[],
            usage=usage.usage(),
        ).model_dump_json()
