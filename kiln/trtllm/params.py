"""Kiln `SamplingParams` -> keyword arguments of tensorrt_llm 1.2's `SamplingParams`.

Rules:
- Every Kiln field is either mapped or refused with RequestValidationError naming the Kiln field (the
  server turns it into a 400 with that `param`); nothing is silently dropped.
- `trtllm_sampling_kwargs` is pure (no tensorrt_llm import) so it is unit-tested on CPU;
  `make_trtllm_sampling_params` builds the library object and refuses any mapped keyword the installed
  library does not know, naming the Kiln field that needed it.

Semantics relied on (tensorrt_llm/sampling_params.py, 1.x):
- The C++ sampler treats top_k=0 together with top_p=0 as greedy, and the LLM API calls a request greedy
  when top_k is None/1 and top_p is None; so Kiln's temperature 0 becomes top_k=1, and sampling always
  passes top_p explicitly (1.0 = off) so an unset top_k never turns it greedy.
- presence/frequency penalties count prompt tokens unless `prompt_ignore_length` skips them; Kiln (like
  OpenAI) counts generated tokens only, so it is set to the prompt length. Repetition penalty (CTRL)
  covers prompt and output in both.
- Without a seed every request would use the runtime's seed 0 (identical samples for identical prompts);
  Kiln's unseeded requests are random, so the caller passes a fresh `fallback_seed`.
- `logprobs` on a TensorRT engine are computed from generation logits, which the runtime only returns when
  the LLM was created with gather_generation_logits=True (llmapi/llm.py `_check_arguments`).
- Stop *strings* are not passed on: the library matches them as token sequences of the encoded string
  (missing matches that tokenize differently) and trims them only after they were streamed. Kiln matches
  them on the text in `kiln.trtllm.outputs.OutputTranslator` with the native engine's StopChecker, and
  aborts the library request when one matches. Stop token ids are passed on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kiln.engine.sampling_params import SamplingParams
from kiln.errors import RequestValidationError


@dataclass(slots=True)
class TrtLlmRequestLimits:
    """What the loaded engine allows a request, for validating before anything is queued."""

    max_seq_len: int  # prompt + generated tokens
    max_batch_size: int  # sequences in flight; n of one request counts n times
    vocab_size: int
    eos_token_ids: list[int]
    gather_generation_logits: bool  # the engine can return logprobs


# The Kiln field each tensorrt_llm keyword comes from, for error messages when the library lacks one.
KILN_FIELD_OF: dict[str, str] = {
    "n": "n",
    "best_of": "n",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "prompt_ignore_length": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "max_tokens": "max_tokens",
    "min_tokens": "min_tokens",
    "stop_token_ids": "stop_token_ids",
    "end_id": "ignore_eos",
    "ignore_eos": "ignore_eos",
    "logprobs": "logprobs",
    "embedding_bias": "logit_bias",
    "skip_special_tokens": "skip_special_tokens",
    "detokenize": "skip_special_tokens",
}


def resolve_max_tokens(params: SamplingParams, prompt_len: int, max_seq_len: int) -> int:
    """Generated-token budget: Kiln's max_tokens, or (None) whatever the context has left.

    Raises RequestValidationError when the prompt alone fills the context, or max_tokens would overflow it
    (a TensorRT engine cannot run past the max_seq_len it was built for).
    """
    room = max_seq_len - prompt_len
    if room < 1:
        raise RequestValidationError(
            f"the prompt has {prompt_len} tokens, which leaves no room to generate within this engine's "
            f"maximum context of {max_seq_len} tokens",
            "prompt",
        )
    if params.max_tokens is None:
        return room
    if params.max_tokens > room:
        raise RequestValidationError(
            f"max_tokens ({params.max_tokens}) plus the prompt ({prompt_len} tokens) exceeds this engine's "
            f"maximum context of {max_seq_len} tokens; ask for at most {room}",
            "max_tokens",
        )
    return params.max_tokens


def trtllm_sampling_kwargs(
    params: SamplingParams,
    *,
    prompt_len: int,
    limits: TrtLlmRequestLimits,
    fallback_seed: int,
) -> dict[str, Any]:
    """Keyword arguments for `tensorrt_llm.SamplingParams` that honour `params` exactly, or RequestValidationError.

    `logit_bias` comes back as {"embedding_bias": {token_id: bias}}; `make_trtllm_sampling_params` turns it
    into the [vocab_size] float32 tensor the library wants.
    """
    if params.structured is not None:  # TensorRT-LLM's guided decoding is not mapped yet
        raise RequestValidationError(
            f"structured outputs ({params.structured.kind}) are not supported by the TensorRT-LLM backend yet; "
            "serve a native engine for them",
            "structured",
        )
    if params.prompt_logprobs is not None:
        raise RequestValidationError(
            "prompt scoring (prompt_logprobs, or a completion's echo with logprobs) is not supported by the "
            "TensorRT-LLM backend; serve a native engine for it",
            "prompt_logprobs",
        )
    if params.allowed_token_ids is not None:
        raise RequestValidationError(
            "allowed_token_ids is not supported by the TensorRT-LLM backend; serve a native engine for it",
            "allowed_token_ids",
        )
    if params.n > limits.max_batch_size:
        raise RequestValidationError(
            f"n ({params.n}) exceeds this engine's max batch size ({limits.max_batch_size})", "n"
        )
    if params.greedy and params.n > 1:
        raise RequestValidationError(
            "n > 1 with temperature 0 would return n identical completions; the TensorRT-LLM backend "
            "refuses it (set temperature > 0)",
            "n",
        )
    if params.logprobs is not None and not limits.gather_generation_logits:
        raise RequestValidationError(
            "logprobs needs generation logits, and this TensorRT-LLM engine was built without them; "
            "rebuild with `kiln build --backend trtllm --trtllm-gather-logits`",
            "logprobs",
        )

    kw: dict[str, Any] = {
        "n": params.n,
        "best_of": params.n,
        "max_tokens": resolve_max_tokens(params, prompt_len, limits.max_seq_len),
        "seed": params.seed if params.seed is not None else fallback_seed,
        "skip_special_tokens": params.skip_special_tokens,
        "detokenize": True,
        "ignore_eos": params.ignore_eos,
    }
    if params.greedy:
        kw.update(top_k=1, top_p=None, temperature=None)
    else:
        kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.min_p > 0.0:
            kw["min_p"] = params.min_p

    if params.presence_penalty != 0.0:
        kw["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty != 0.0:
        kw["frequency_penalty"] = params.frequency_penalty
    if "presence_penalty" in kw or "frequency_penalty" in kw:
        kw["prompt_ignore_length"] = prompt_len
    if params.repetition_penalty != 1.0:
        kw["repetition_penalty"] = params.repetition_penalty
    if params.min_tokens > 0:
        kw["min_tokens"] = params.min_tokens

    stop_token_ids = list(params.stop_token_ids)
    if limits.eos_token_ids:
        kw["end_id"] = limits.eos_token_ids[0]
        if not params.ignore_eos:
            # Llama 3 instruct models end turns with several ids; the runtime has one end_id.
            stop_token_ids += [t for t in limits.eos_token_ids[1:] if t not in stop_token_ids]
    if stop_token_ids:
        kw["stop_token_ids"] = stop_token_ids

    if params.logprobs is not None:
        # Kiln's 0 means "the sampled token only"; the library treats 0 as "none", so ask for one
        # alternative and trim in the output translation.
        kw["logprobs"] = max(params.logprobs, 1)

    if params.logit_bias:
        for token_id in params.logit_bias:
            if not 0 <= int(token_id) < limits.vocab_size:
                raise RequestValidationError(
                    f"logit_bias names token {token_id}, outside the vocabulary (0..{limits.vocab_size - 1})",
                    "logit_bias",
                )
        kw["embedding_bias"] = {int(t): float(b) for t, b in params.logit_bias.items()}
    return kw


def make_trtllm_sampling_params(
    trtllm_sampling_params_cls: Any, kwargs: dict[str, Any], *, vocab_size: int
) -> Any:
    """Build the library's SamplingParams; RequestValidationError naming the Kiln field if the library lacks a keyword."""
    known = {f.name for f in dataclasses.fields(trtllm_sampling_params_cls) if f.init}
    for key in kwargs:
        if key not in known:
            field = KILN_FIELD_OF.get(key, key)
            raise RequestValidationError(
                f"{field} cannot be honoured by the installed tensorrt_llm (its SamplingParams has no {key!r})",
                field,
            )
    kwargs = dict(kwargs)
    if "embedding_bias" in kwargs:
        import torch

        bias = torch.zeros(vocab_size, dtype=torch.float32)
        for token_id, value in kwargs["embedding_bias"].items():
            bias[token_id] = value
        kwargs["embedding_bias"] = bias
    return trtllm_sampling_params_cls(**kwargs)
