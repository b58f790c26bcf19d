"""The step message's outputs between the engine process and the front end (`ProcessEngine`).

Pickling `RequestOutput` objects cost ~1.2 ms each way per step at 256 requests, and the message
(~110 KB, most of it every request's prompt ids, sent again at every step) overflowed the 64 KB pipe
buffer: the engine's send then waited for the front end's receiver thread, which waits for the GIL,
so a busy front end slowed the engine's steps. On the wire an output is a tuple of plain values
without the prompt (the front end has it from the request): ~16 KB and ~0.1 ms per step.

Rule: `decode_output(encode_output(out), out.prompt, out.prompt_token_ids) == out` for every output.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

from kiln.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

_METRIC_FIELDS = tuple(f.name for f in dataclasses.fields(RequestMetrics))
_metric_values = operator.attrgetter(*_METRIC_FIELDS)

WireOutput = tuple[Any, ...]


def encode_output(out: RequestOutput) -> WireOutput:
    return (
        out.request_id,
        [
            (c.index, c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason, c.stop_reason)
            for c in out.outputs
        ],
        out.finished,
        None if out.metrics is None else _metric_values(out.metrics),
        out.num_cached_tokens,
        out.prompt_logprobs,
    )


def decode_output(wire: WireOutput, prompt: str | None, prompt_token_ids: list[int]) -> RequestOutput:
    request_id, completions, finished, metrics, num_cached_tokens, prompt_logprobs = wire
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
        outputs=[CompletionOutput(*c) for c in completions],
        finished=finished,
        metrics=None if metrics is None else RequestMetrics(*metrics),
        num_cached_tokens=num_cached_tokens,
        prompt_logprobs=prompt_logprobs,
    )
