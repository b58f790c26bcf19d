"""`validate_request`: what every front end refuses before a request reaches an engine.

Rules: every refusal is a `RequestValidationError` naming the request field at fault, so front ends
(the server's 400s with `param`) never parse messages; the same checks for every front end, so they
refuse the same things the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from kiln.engine.sampling_params import SamplingParams
from kiln.errors import RequestValidationError


def check_token_ids(token_ids: Iterable[int], *, vocab_size: int, field: str) -> None:
    """Raise RequestValidationError(field=`field`) for the first id outside [0, vocab_size)."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise RequestValidationError(f"token id {token_id} is out of range [0, {vocab_size})", field)


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int
) -> None:
    """Raise RequestValidationError for a request the engine could never run (see the module rules)."""
    if not prompt_token_ids:
        raise RequestValidationError("the prompt is empty: give at least one token", "prompt")
    check_token_ids(prompt_token_ids, vocab_size=vocab_size, field="prompt")
    n_prompt = len(prompt_token_ids)
    if n_prompt >= max_model_len:
        raise RequestValidationError(
            f"the prompt has {n_prompt} tokens; this model's context is {max_model_len} tokens, "
            "which must also hold at least one generated token",
            "prompt",
        )
    if params.max_tokens is not None and n_prompt + params.max_tokens > max_model_len:
        raise RequestValidationError(
            f"prompt ({n_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds the context "
            f"length of {max_model_len} tokens",
            "max_tokens",
        )
    check_token_ids(params.logit_bias or {}, vocab_size=vocab_size, field="logit_bias")
    check_token_ids(params.allowed_token_ids or (), vocab_size=vocab_size, field="allowed_token_ids")
    check_token_ids(params.stop_token_ids, vocab_size=vocab_size, field="stop_token_ids")
