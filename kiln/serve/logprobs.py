"""Engine logprobs -> OpenAI's two logprob shapes.

The engine gives, per generated token, `{token_id: Logprob}` holding the sampled token and the top-k
alternatives (rank 1 = most likely). OpenAI wants:
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`
- completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`
`top_logprobs` lists the `top_n` best-ranked entries, best first (the sampled token is among them
only if it ranks there). With `echo` the prompt's tokens come first, the first of them with null
logprobs (nothing before it to score it).
- prompt logprobs (vLLM's extension): `[null, {token_id: {"logprob", "rank", "decoded_token"}}, ...]`,
  each entry the prompt's token and the `top_n` best-ranked ones.
With `as_ids` (vLLM's `return_tokens_as_token_ids`) a token is named `token_id:<id>` instead of by its
text, so tokens whose texts collide (parts of characters all read U+FFFD) stay apart; `text_offset` still
counts the text's characters.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.engine.outputs import Logprob, PromptLogprobs, TokenLogprobs
from kiln.serve.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprobsOut,
    PromptTokenLogprob,
    TopLogprob,
)

# The server's token -> text function (Logprob.decoded when the engine filled it in).
TokenText = Callable[[int], str]
# Token -> the bytes it stands for (kiln.models.tokenizer.Tokenizer.token_bytes): chat's `bytes`, which
# joined over the tokens give the text's UTF-8 even where a token is part of a character.
TokenBytes = Callable[[int], bytes]


def _text(token_id: int, logprob: Logprob | None, token_text: TokenText) -> str:
    if logprob is not None and logprob.decoded is not None:
        return logprob.decoded
    return token_text(token_id)


def _name(token_id: int, logprob: Logprob | None, token_text: TokenText, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else _text(token_id, logprob, token_text)


def _top(entry: TokenLogprobs, top_n: int) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda item: item[1].rank)[:top_n]


def _sampled_logprob(token_id: int, entry: TokenLogprobs) -> Logprob:
    found = entry.get(token_id)
    # An engine always includes the sampled token; a missing one is -inf rather than a crash.
    return found if found is not None else Logprob(logprob=float("-inf"), rank=0)


def chat_logprobs(
    token_ids: list[int],
    entries: list[TokenLogprobs],
    top_n: int,
    token_text: TokenText,
    token_bytes: TokenBytes,
    as_ids: bool = False,
) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        sampled = _sampled_logprob(token_id, entry)
        tops = [
            TopLogprob(
                token=_name(tid, lp, token_text, as_ids), logprob=lp.logprob, bytes=list(token_bytes(tid))
            )
            for tid, lp in _top(entry, top_n)
        ]
        content.append(
            ChatTokenLogprob(
                token=_name(token_id, sampled, token_text, as_ids),
                logprob=sampled.logprob,
                bytes=list(token_bytes(token_id)),
                top_logprobs=tops,
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: list[int],
    entries: list[TokenLogprobs] | PromptLogprobs,
    top_n: int,
    token_text: TokenText,
    text_offset: int,
    as_ids: bool = False,
) -> tuple[CompletionLogprobs, int]:
    """The legacy shape for these tokens, their text starting at `text_offset`; also the next offset.
    An entry None (a prompt's first token) has null logprobs."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=False):
        if entry is None:
            sampled = None
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            sampled = _sampled_logprob(token_id, entry)
            result.token_logprobs.append(sampled.logprob)
            result.top_logprobs.append(
                {_name(tid, lp, token_text, as_ids): lp.logprob for tid, lp in _top(entry, top_n)}
                if top_n
                else None
            )
        text = _text(token_id, sampled, token_text)
        result.tokens.append(f"token_id:{token_id}" if as_ids else text)
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result, text_offset


def prompt_logprobs_out(
    prompt_ids: list[int], entries: PromptLogprobs, top_n: int, token_text: TokenText, as_ids: bool = False
) -> PromptLogprobsOut:
    """vLLM's prompt-logprobs shape: per position the prompt's token and the `top_n` best-ranked ones."""
    out: PromptLogprobsOut = []
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        kept = dict(_top(entry, top_n))
        kept[token_id] = _sampled_logprob(token_id, entry)
        out.append(
            {
                str(tid): PromptTokenLogprob(
                    logprob=lp.logprob, rank=lp.rank, decoded_token=_name(tid, lp, token_text, as_ids)
                )
                for tid, lp in kept.items()
            }
        )
    return out


def merge_completion_logprobs(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
    into.text_offset.extend(more.text_offset)
