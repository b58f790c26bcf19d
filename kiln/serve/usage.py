"""Token accounting of one response (`usage`) and the token -> text function for logprobs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from kiln.engine.outputs import RequestOutput
from kiln.serve.logprobs import TokenText
from kiln.serve.protocol import PromptTokensDetails, SamplingRequest, Usage


class UsageCounter:
    """Sums usage over the deltas of a request (all its prompts, all n choices).

    Rules (OpenAI's): prompt_tokens counts each prompt once, not once per choice; completion_tokens
    counts every generated token of every choice; cached_tokens are prompt tokens served from the
    prefix cache.
    """

    def __init__(self) -> None:
        self._prompt_tokens: dict[str, int] = {}
        self._cached_tokens: dict[str, int] = {}
        self.completion_tokens = 0

    def add(self, out: RequestOutput) -> None:
        self._prompt_tokens[out.request_id] = len(out.prompt_token_ids)
        self._cached_tokens[out.request_id] = out.num_cached_tokens
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

    def usage(self, prompt_tokens: int | None = None) -> Usage:
        """The usage so far; `prompt_tokens`: the request's prompt total when known before every prompt
        has had an output (a stream's running usage)."""
        prompt = sum(self._prompt_tokens.values()) if prompt_tokens is None else prompt_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached_tokens.values())),
        )


def running_usage(
    body: SamplingRequest, prompt_tokens: int, counter: UsageCounter
) -> Callable[[], Usage] | None:
    """The usage so far for every chunk of a stream that asks for it (`continuous_usage`), else None:
    the request's prompt tokens from the start, the completion tokens as `counter` adds them."""
    if not body.continuous_usage:
        return None
    return lambda: counter.usage(prompt_tokens)


def token_text_fn(tokenizer: Any) -> TokenText:
    """One token's text as the tokenizer decodes it alone (cached: logprobs ask for the same ids often)."""

    @functools.lru_cache(maxsize=4096)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return token_text
