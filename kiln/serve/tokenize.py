"""Prompt text -> token ids for the server: bounded, off the event loop when large, bad text a 400.

Rules:
- A request whose prompt text (every prompt, or every message, together) is over `max_prompt_chars`
  characters is refused with 400 before any other work.
- Text that is not valid Unicode (a lone surrogate, which JSON can spell as "\\ud800") is a 400 naming
  the field, never the tokenizer's 500.
- More than `INLINE_CHARS` characters are tokenized on a worker thread, so one large prompt never stalls
  the streams this event loop serves (fast tokenizers release the GIL while they encode).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from kiln.serve.errors import InvalidRequestError
from kiln.serve.protocol import TemplateOptions

INLINE_CHARS = 16_384
T = TypeVar("T")


def check_prompt_text(texts: Iterable[str], *, limit: int | None, param: str) -> int:
    """The texts' total length in characters; 400 (`param`) when it is over `limit` or any is not
    valid Unicode."""
    texts = list(texts)
    total = sum(len(text) for text in texts)
    if limit is not None and total > limit:
        raise InvalidRequestError(
            f"the prompt has {total:,} characters; this server takes at most {limit:,} (max_prompt_chars)",
            param=param,
        )
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"the prompt is not valid Unicode: {exc.reason} at character {exc.start}", param=param
            ) from None
    return total


async def tokenize(encode: Callable[[], T], *, chars: int) -> T:
    """Run `encode` here, or on a worker thread when it reads more than INLINE_CHARS characters."""
    if chars <= INLINE_CHARS:
        return encode()
    return await asyncio.to_thread(encode)


def chat_template_options(body: TemplateOptions, tokenizer: Any) -> dict[str, Any]:
    """`body`'s options of rendering its conversation (`TemplateOptions.template_options`); 400 naming
    `chat_template_kwargs` for a key that is the rendering's own argument."""
    options = body.template_options()
    try:
        tokenizer.check_template_kwargs(options["template_kwargs"] or {})
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="chat_template_kwargs") from None
    return options
