"""`validate_request`: what every front end refuses before a request reaches an engine."""

from __future__ import annotations

from kiln.engine.sampling_params import SamplingParams


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int
) -> None:
    """Raise ValueError (message starting with the offending field where there is one) for a request the
    engine could never run; shared by every front end so they refuse the same things the same way."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    n_prompt = len(prompt_token_ids)
    if n_prompt >= max_model_len:
        raise ValueError(
            f"the prompt has {n_prompt} tokens; this model's context is {max_model_len} tokens, "
            "which must also hold at least one generated token"
        )
    if params.max_tokens is not None and n_prompt + params.max_tokens > max_model_len:
        raise ValueError(
            f"prompt ({n_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds the context "
            f"length of {max_model_len} tokens"
        )
    for tid in list(params.logit_bias or {}) + list(params.stop_token_ids):
        if not 0 <= tid < vocab_size:
            raise ValueError(f"token id {tid} is out of range [0, {vocab_size})")
