"""Structured outputs: a request's output held to a JSON schema, a regex, a choice or a grammar.

Rules:
- Enforced by llguidance, token by token: before each sampling step the request's matcher fills a
  bitmask of the tokens that keep the output valid, and the sampler sets every other logit to -inf; the
  sampled token then advances the matcher. Why llguidance: no dependencies, broad JSON Schema support
  that names what it cannot enforce, Lark grammars with embedded JSON schemas (tool calls), and masks
  for a batch filled in parallel off the GIL (figures: docs/server.md).
- A grammar is compiled once per distinct `StructuredOutput` into a matcher that is cached (bounded)
  and never advanced; each request gets a copy of it. The grammar is checked when the request is
  added: what llguidance cannot enforce is a RequestValidationError naming `structured`, never a
  silent ignore.
- The matcher follows the output tokens only, so preemption and recompute leave it as it is. Once the
  grammar is complete only end-of-sequence is allowed: the request stops there.
- At batch the host's grammar work must hide behind the GPU: a step's masks fill on llguidance's
  threads, off the GIL, while the engine processes outputs and prepares the next step (`MaskFill`);
  one row is done inline, where a thread hand-off would cost more than it hides.
- JSON is generated compact (no free whitespace between items), so a model cannot pad it without end.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch

from kiln.engine.sampling_params import StructuredOutput
from kiln.errors import RequestValidationError

GRAMMAR_CACHE_SIZE = 512
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(structured: StructuredOutput) -> str:
    """llguidance's grammar for `structured` (not yet checked against a tokenizer)."""
    kind, spec = structured.kind, structured.spec
    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        options = json.loads(spec)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise RequestValidationError("choice needs at least one non-empty string", "structured")
        # Lark string literals are JSON-escaped strings.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
        )
    return llguidance.LLMatcher.grammar_from_lark(spec)


class Grammars:
    """One engine's matchers: the tokenizer llguidance reads, compiled grammars by `StructuredOutput`."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        # One matcher per grammar, never advanced: requests get copies of it.
        self._matchers: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._executor: llguidance.LLExecutor | None = None
        self._filler: ThreadPoolExecutor | None = None  # the one thread that waits on background fills

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:  # ~0.4 s for a 50k vocabulary: only once a request asks
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf)
        return self._tokenizer

    def matcher(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the output; RequestValidationError when it cannot be enforced.
        A copy of the grammar's cached matcher: it shares the lexer states that earlier requests of the
        same grammar built, which makes both the copy and its masks cheaper than a new matcher's."""
        pristine = self._matchers.get(structured)
        if pristine is None:
            try:
                grammar = grammar_text(structured)
            except (ValueError, RuntimeError) as exc:  # llguidance's parse errors
                raise RequestValidationError(f"{structured.kind}: {exc}", "structured") from None
            pristine = llguidance.LLMatcher(self.tokenizer, grammar)
            if pristine.is_error():
                raise RequestValidationError(f"{structured.kind}: {pristine.get_error()}", "structured")
            self._matchers[structured] = pristine
        self._matchers.move_to_end(structured)
        while len(self._matchers) > GRAMMAR_CACHE_SIZE:
            self._matchers.popitem(last=False)
        return pristine.deep_copy()

    def fill_masks(self, matchers: Sequence[llguidance.LLMatcher | None], mask: torch.Tensor) -> None:
        """Fill `mask` ([rows, words] int32, CPU): each matcher's row with its allowed tokens, the rows
        without one with every token allowed."""
        with torch.inference_mode():  # the buffer may be an inference tensor, and this a helper thread
            mask.fill_(-1)
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if len(rows) == 1:
            m, i = rows[0]
            m.unsafe_compute_mask_ptr(mask[i].data_ptr(), mask.shape[1] * 4)
        elif rows:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(rows, mask.data_ptr(), mask.shape[1] * 4, mask.shape[0])

    def start_fill(self, matchers: Sequence[llguidance.LLMatcher | None], mask: torch.Tensor) -> MaskFill:
        """`fill_masks` begun in the background when more than one row is held (done at once otherwise).
        Until the fill's `wait` returns, neither `mask` nor those matchers may be touched."""
        if sum(m is not None for m in matchers) < 2:
            self.fill_masks(matchers, mask)
            return MaskFill(mask, None)
        if self._filler is None:
            self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-masks")
        return MaskFill(mask, self._filler.submit(self.fill_masks, matchers, mask))

    def mask_words(self) -> int:
        return (self.tokenizer.vocab_size + 31) // 32


@dataclass(slots=True)
class MaskFill:
    """Token masks being filled (`Grammars.start_fill`); `wait` returns them once complete."""

    mask: torch.Tensor
    future: Future[None] | None  # None: filled already

    def wait(self) -> torch.Tensor:
        """The filled masks; re-raises what the fill raised."""
        if self.future is not None:
            self.future.result()
        return self.mask


def apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set every logit whose bit in `mask` ([rows, words] int32, on the logits' device) is 0 to -inf;
    tokens past the mask's width (the model's padded vocabulary) are never allowed."""
    width = mask.shape[1] * 32
    shifts = torch.arange(32, device=mask.device, dtype=torch.int32)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(mask.shape[0], width).bool()
    vocab = logits.shape[1]
    if vocab > width:
        logits[:, width:] = float("-inf")
    logits[:, : min(vocab, width)].masked_fill_(~allowed[:, :vocab], float("-inf"))
