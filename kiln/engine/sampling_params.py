"""`SamplingParams`: how one request is sampled and when it stops (shaped like vLLM's)."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from typing import Literal

from kiln.errors import RequestValidationError

# Bounds on what one request may ask for, so no request can cost the engine more than a request should:
# fan-out, stop strings (matched per generated character), biased and stop token ids (applied per step).
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 4096
MAX_STRUCTURED_AFTER = 64  # characters of a structured output's `after` (a closing tag)
MAX_TOKEN_ID_LIST = 1024  # entries of logit_bias; stop_token_ids; allowed_token_ids
# torch.Generator.manual_seed takes 64-bit seeds; sequence i of a request with n > 1 uses seed + i.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
STRUCTURED_KINDS = frozenset(typing.get_args(StructuredKind))


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What a request's output must match, enforced token by token (kiln.engine.structured).

    `spec` by kind: "json_schema" a JSON Schema as JSON text; "json_object" empty (any JSON object);
    "regex" a regular expression the whole output matches; "choice" a JSON list of the strings the output
    may be; "grammar" a Lark grammar in llguidance's dialect. With `after`, the output is free up to and
    including the first `after` and held from there (a reasoning model's thinking, then `</think>`).
    Hashable: compiled grammars are cached by it.
    """

    kind: StructuredKind
    spec: str = ""
    after: str | None = None

    @classmethod
    def json_schema(cls, schema: dict | str) -> StructuredOutput:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, options: list[str]) -> StructuredOutput:
        return cls("choice", json.dumps(list(options)))


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling and stopping rules.

    Rules: temperature 0 means greedy (top_k/top_p/min_p are then ignored); top_k None or 0
    means no top-k; penalties follow the OpenAI (presence/frequency, over generated tokens) and
    CTRL (repetition, over prompt and generated tokens) definitions; `seed` makes this request's
    samples reproducible whatever else is in the batch; stop strings are never part of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return besides the sampled token
    # Score the prompt: each prompt token's logprob given the tokens before it, with this many top
    # alternatives (RequestOutput.prompt_logprobs). The prompt is computed whole, without prefix-cache hits.
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    # Only these tokens may be sampled (every other logit -inf before anything else reads them); None: any.
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None  # what the output must match (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.validate()

    def validate(self) -> None:
        """Raise RequestValidationError for the first bad field (the server turns it into a 400 with `param`)."""
        seed_max = SEED_MAX - (self.n - 1)
        checks = [
            ("n", 1 <= self.n <= MAX_N, f"must be in [1, {MAX_N}]"),
            (
                "seed",
                self.seed is None or SEED_MIN <= self.seed <= seed_max,
                f"must be in [-2**63, {seed_max}]",
            ),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 0, "must be >= 0 (0 or null: disabled)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "must be in [0, 20]",
            ),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise RequestValidationError(f"{name} {rule}, got {getattr(self, name)!r}", name)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestValidationError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestValidationError(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS}", "stop"
            )
        longest = max(self.stop, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise RequestValidationError(
                f"a stop string has {len(longest)} characters; at most {MAX_STOP_CHARS}", "stop"
            )
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise RequestValidationError(
                "allowed_token_ids must name at least one token", "allowed_token_ids"
            )
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids"):
            count = len(getattr(self, name) or ())
            if count > MAX_TOKEN_ID_LIST:
                raise RequestValidationError(f"{name} has {count} entries; at most {MAX_TOKEN_ID_LIST}", name)
        if self.structured is not None and self.structured.kind not in STRUCTURED_KINDS:
            raise RequestValidationError(
                f"unknown structured output kind {self.structured.kind!r}", "structured"
            )
        after = self.structured.after if self.structured is not None else None
        if after is not None and not 0 < len(after) <= MAX_STRUCTURED_AFTER:
            raise RequestValidationError(
                f"a structured output's `after` has 1 to {MAX_STRUCTURED_AFTER} characters, got {len(after)}",
                "structured",
            )
        for tok, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise RequestValidationError(
                    f"logit_bias for token {tok} must be in [-100, 100], got {bias}", "logit_bias"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_output_ids(self) -> bool:
        """Sampling reads the ids of the tokens generated so far (penalties; a structured output's mask
        follows them), so a step cannot be prepared before the previous step's token has reached the host."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.structured is not None
        )
