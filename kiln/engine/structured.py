"""Structured outputs: a request's output held to a JSON schema, a regex, a choice or a grammar.

Rules:
- Enforced by llguidance, token by token: before each sampling step the request's matcher fills a
  bitmask of the tokens that keep the output valid, and the sampler sets every other logit to -inf; the
  sampled token then advances the matcher. Why llguidance: no dependencies, broad JSON Schema support
  that names what it cannot enforce, Lark grammars with embedded JSON schemas (tool calls), and masks
  for a batch filled in parallel off the GIL (figures: docs/server.md).
- A grammar is compiled into matchers that are cached (bounded) and never advanced; each request gets
  a copy of one of them. llguidance's copy shares the original's lexer, and its lazily built states,
  behind one lock that a mask computation holds throughout: copies of one matcher fill their masks one
  at a time. So a grammar keeps one matcher per mask-filling thread (its families, made as requests
  arrive), requests take them in turn, and a batch's rows are handed to the threads grouped by
  family. The grammar is checked when the request is added: what llguidance cannot enforce is a
  RequestValidationError naming `structured`, never a silent ignore.
- The matcher follows the output tokens only, so preemption and recompute leave it as it is. Once the
  grammar is complete only end-of-sequence is allowed: the request stops there.
- At batch the host's grammar work must hide behind the GPU: a step's masks fill on llguidance's
  threads, off the GIL, while the engine processes outputs and prepares the next step (`MaskFill`);
  one row is done inline, where a thread hand-off would cost more than it hides.
- JSON is generated compact (no free whitespace between items), so a model cannot pad it without end.
- `StructuredOutput.after` (a reasoning model's `</think>`) leaves the output free up to and including
  its first occurrence: one grammar, a lexeme ending there and then the constraint as a named
  sub-grammar, so the constraint keeps its own options.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from kiln.engine.sampling_params import StructuredOutput
from kiln.errors import RequestValidationError

# Cached matchers over all grammars: a matcher keeps the lexer states its requests built (~0.2 MB for a
# typical schema), and a grammar may hold one per filling thread. The least recently used go first.
MATCHER_CACHE_SIZE = 1024
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(structured: StructuredOutput) -> str:
    """llguidance's grammar for `structured` (not yet checked against a tokenizer)."""
    text = _constraint_text(structured)
    return text if structured.after is None else _after(structured.after, text)


def _after(after: str, constraint: str) -> str:
    """A grammar of free text up to and including the first `after`, then `constraint`: the constraint
    becomes a named grammar that a Lark start rule refers to, after a lexeme that ends at `after`'s first
    occurrence (any text ending with it, and it nowhere before the end)."""
    # llguidance's builders give JSON (a TopLevelGrammar) for schemas and regexes, Lark text for Lark.
    inner = (
        json.loads(constraint)
        if constraint.lstrip().startswith("{")
        else {"grammars": [{"lark_grammar": constraint}]}
    )
    inner["grammars"][0]["name"] = "constraint"
    tag = "".join(f"\\x{{{ord(c):x}}}" for c in after)  # every character as \x{..}: nothing to escape
    lead = f"start: FREE @constraint\nFREE: /(?s:.*){tag}/ & ~/(?s:.*){tag}(?s:.+)/\n"
    return json.dumps({"grammars": [{"lark_grammar": lead}, *inner["grammars"]]})


def _constraint_text(structured: StructuredOutput) -> str:
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


# More mask-filling threads than this filled a batch's masks no sooner (256 streams on a 16-core host:
# docs/server.md), and each one is one more cached matcher per grammar.
MAX_FILL_THREADS = 4


def default_fill_threads() -> int:
    """Threads that fill a batch's masks: 80% of the cores this process may use (llguidance's own
    rule), 1 to MAX_FILL_THREADS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_FILL_THREADS, max(1, cores * 80 // 100))


@dataclass(slots=True)
class Matcher:
    """One request's place in its grammar: a copy of its family's matcher (see the module's rules)."""

    inner: llguidance.LLMatcher
    family: int

    def consume_token(self, token: int) -> bool:
        return self.inner.consume_token(token)

    def is_stopped(self) -> bool:
        return self.inner.is_stopped()

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def get_error(self) -> str:
        return self.inner.get_error()


@dataclass(slots=True)
class _Grammar:
    text: str
    families: list[llguidance.LLMatcher]  # never advanced; grows to one per filling thread
    handed: int = 0  # matchers handed out: the next goes to family handed % threads


class Grammars:
    """One engine's matchers: the tokenizer llguidance reads, compiled grammars by `StructuredOutput`.
    `threads` fill a batch's masks (default: `default_fill_threads`); `tokenizer`: llguidance's view of
    `hf_tokenizer` when one was set up already (it takes ~0.5 s)."""

    def __init__(
        self, hf_tokenizer: Any, threads: int | None = None, tokenizer: llguidance.LLTokenizer | None = None
    ) -> None:
        self._hf = hf_tokenizer
        self.threads = threads if threads is not None else default_fill_threads()
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
        self._tokenizer = tokenizer
        self._grammars: OrderedDict[StructuredOutput, _Grammar] = OrderedDict()
        self.cached_matchers = 0  # over all grammars
        self._executor: llguidance.LLExecutor | None = None
        self._filler: ThreadPoolExecutor | None = None  # the one thread that waits on background fills

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:  # ~0.4 s for a 50k vocabulary: only once a request asks
            # Imported here, not at the top: llguidance.hf imports transformers, which an engine's
            # start would otherwise wait for before it loads its weights (kiln.engine.llm_engine).
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf)
        return self._tokenizer

    def matcher(self, structured: StructuredOutput) -> Matcher:
        """A fresh matcher at the start of the output; RequestValidationError when it cannot be enforced.
        A copy of one of the grammar's cached matchers, taken in turn: the copy shares the lexer states
        that earlier requests of its family built, which makes it and its masks cheaper than a new one."""
        grammar = self._grammars.get(structured)
        if grammar is None:
            try:
                text = grammar_text(structured)
            except (ValueError, RuntimeError) as exc:  # llguidance's parse errors
                raise RequestValidationError(f"{structured.kind}: {exc}", "structured") from None
            first = llguidance.LLMatcher(self.tokenizer, text)
            if first.is_error():
                raise RequestValidationError(f"{structured.kind}: {first.get_error()}", "structured")
            grammar = self._grammars[structured] = _Grammar(text, [first])
            self.cached_matchers += 1
        self._grammars.move_to_end(structured)
        family = grammar.handed % self.threads
        grammar.handed += 1
        if family == len(grammar.families):  # the text compiled once already: this one cannot fail
            grammar.families.append(llguidance.LLMatcher(self.tokenizer, grammar.text))
            self.cached_matchers += 1
        while self.cached_matchers > MATCHER_CACHE_SIZE and len(self._grammars) > 1:  # never this one
            self.cached_matchers -= len(self._grammars.popitem(last=False)[1].families)
        return Matcher(grammar.families[family].deep_copy(), family)

    def fill_masks(self, matchers: Sequence[Matcher | None], mask: torch.Tensor) -> None:
        """Fill `mask` ([rows, words] int32, CPU): each matcher's row with its allowed tokens, the rows
        without one with every token allowed."""
        self._fill_rows(self._held_rows(matchers, mask), mask)

    def start_fill(self, matchers: Sequence[Matcher | None], mask: torch.Tensor) -> MaskFill:
        """`fill_masks` begun in the background when more than one row is held (done at once otherwise).
        Until the fill's `wait` returns, neither `mask` nor those matchers may be touched.

        Everything but llguidance's call is done here, and this returns only once the filler thread is
        inside that call (which runs off the GIL): a Python thread that still needed the GIL would wait
        for it while the engine's thread runs Python, up to the interpreter's switch interval (5 ms) at
        every hand-over, longer than a whole fill."""
        rows = self._held_rows(matchers, mask)
        if len(rows) < 2:
            self._fill_rows(rows, mask)
            return MaskFill(mask, None)
        if self._filler is None:
            self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-masks")
        started = threading.Event()

        def fill() -> None:
            started.set()
            self._fill_rows(rows, mask)

        future = self._filler.submit(fill)
        started.wait()  # blocks without the GIL: the filler thread takes it at once
        return MaskFill(mask, future)

    @staticmethod
    def _held_rows(
        matchers: Sequence[Matcher | None], mask: torch.Tensor
    ) -> list[tuple[llguidance.LLMatcher, int]]:
        """The rows a matcher holds, with their row index, grouped by family (so the pool's contiguous
        shares of the rows seldom wait on each other's lexer lock); the rows without one are set to
        every token allowed now (llguidance writes whole rows, so the others need nothing)."""
        held = sorted((m.family, i) for i, m in enumerate(matchers) if m is not None)
        if len(held) < len(matchers):
            free = [i for i, m in enumerate(matchers) if m is None]
            with torch.inference_mode():  # the buffer may be an inference tensor
                mask[free] = -1
        return [(matchers[i].inner, i) for _, i in held]  # type: ignore[union-attr]

    def _fill_rows(self, rows: list[tuple[llguidance.LLMatcher, int]], mask: torch.Tensor) -> None:
        """Fill the held rows: one directly, more on llguidance's pool."""
        if len(rows) == 1:
            matcher, i = rows[0]
            matcher.unsafe_compute_mask_ptr(mask[i].data_ptr(), mask.shape[1] * 4)
            return
        if not rows:
            return
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self.threads)
        self._executor.unsafe_compute_mask_ptr(rows, mask.data_ptr(), mask.shape[1] * 4, mask.shape[0])

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
