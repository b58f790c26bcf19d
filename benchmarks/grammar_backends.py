"""llguidance against xgrammar on one JSON schema: tokenizer setup, compile, per-token mask time.

    python -m benchmarks.grammar_backends ENGINE_OR_TOKENIZER_DIR [--batch 256] [--json OUT.json]

Rules: the same schema and the same compact answer (its token ids under the given tokenizer) for both;
each mask is filled for one sequence on the host, then the answer's next token is consumed, so a row is
the host time a constrained request adds per generated token. `--batch N`: N sequences at once, each
library's batched fill (threads off the GIL), timed per step, and Kiln's own fill of N requests that walk
apart through the schema, with one thread and with its filling threads; on CUDA also the masks applied to
[N, vocabulary] logits on the device (Kiln's `apply_token_bitmask` beside xgrammar's kernel). A library
that is not installed is reported as such, not measured. Kiln uses llguidance (docs/server.md says why);
xgrammar is only here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["a", "c"],
    "address": {"city": "London", "zip": "12345"},
}


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_llguidance(hf: Any, ids: list[int]) -> dict[str, float]:
    import llguidance  # deferred: each library is optional here
    import llguidance.hf
    import llguidance.torch

    tokenizer, setup = _timed(lambda: llguidance.hf.from_tokenizer(hf))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    matcher, compile_s = _timed(lambda: llguidance.LLMatcher(tokenizer, grammar))
    mask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
    per_token = []
    for token in ids:
        per_token.append(_timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, mask, 0))[1])
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")
    return _row(setup, compile_s, per_token)


def bench_xgrammar(hf: Any, ids: list[int]) -> dict[str, float]:
    import xgrammar  # deferred: each library is optional here

    compiler, setup = _timed(
        lambda: xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf)))
    )
    compiled, compile_s = _timed(
        lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    )
    matcher = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, len(hf))
    per_token = []
    for token in ids:
        per_token.append(_timed(lambda: matcher.fill_next_token_bitmask(mask, 0))[1])
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")
    return _row(setup, compile_s, per_token)


def batch_llguidance(hf: Any, ids: list[int], batch: int) -> dict[str, float]:
    import llguidance  # deferred: each library is optional here
    import llguidance.hf
    import torch

    tokenizer = llguidance.hf.from_tokenizer(hf)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(batch)]
    words = (tokenizer.vocab_size + 31) // 32
    mask = torch.empty((batch, words), dtype=torch.int32)
    executor = llguidance.LLExecutor()
    rows = [(m, i) for i, m in enumerate(matchers)]
    per_step = []
    for token in ids:
        per_step.append(
            _timed(lambda: executor.unsafe_compute_mask_ptr(rows, mask.data_ptr(), words * 4, batch))[1]
        )
        for m in matchers:
            m.consume_token(token)
    return {
        "batch_mask_median_ms": statistics.median(per_step) * 1e3,
        "batch_mask_max_ms": max(per_step) * 1e3,
    }


def batch_xgrammar(hf: Any, ids: list[int], batch: int) -> dict[str, float]:
    import xgrammar  # deferred: each library is optional here

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf)))
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
    mask = xgrammar.allocate_token_bitmask(batch, len(hf))
    filler = xgrammar.BatchGrammarMatcher()
    per_step = []
    for token in ids:
        per_step.append(_timed(lambda: filler.batch_fill_next_token_bitmask(matchers, mask))[1])
        for m in matchers:
            m.accept_token(token)
    return {
        "batch_mask_median_ms": statistics.median(per_step) * 1e3,
        "batch_mask_max_ms": max(per_step) * 1e3,
    }


def apply_on_device(batch: int, vocab: int, model_vocab: int) -> dict[str, Any]:
    """Median device time of applying [batch, words] masks to bf16 [batch, model_vocab] logits."""
    import torch
    import triton.testing  # deferred: CUDA only

    from kiln.kernels import apply_token_bitmask  # deferred: torch

    words = (vocab + 31) // 32
    mask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, device="cuda")
    logits = torch.randn(batch, model_vocab, dtype=torch.bfloat16, device="cuda")
    rows: dict[str, Any] = {
        "kiln_apply_token_bitmask_us": 1e3
        * triton.testing.do_bench(lambda: apply_token_bitmask(logits, mask))
    }
    try:
        import xgrammar  # deferred: optional
    except ImportError:
        rows["xgrammar_apply_token_bitmask_inplace_us"] = "not installed"
        return rows
    padded = torch.full((batch, (model_vocab + 31) // 32), -1, dtype=torch.int32, device="cuda")
    padded[:, :words] = mask
    rows["xgrammar_apply_token_bitmask_inplace_us"] = 1e3 * triton.testing.do_bench(
        lambda: xgrammar.apply_token_bitmask_inplace(logits, padded)
    )
    return rows


def batch_families(hf: Any, batch: int, steps: int = 40, seed: int = 0) -> dict[str, Any]:
    """Kiln's own fill (`Grammars.fill_masks`) of `batch` requests of SCHEMA that walk apart, each taking a
    random allowed token per step (seeded, so both runs walk alike): with one filling thread (one cached
    matcher: every copy shares its lexer lock, so this is also what any number of threads did with
    one family) and with the default threads, one family each. Mean and median ms per step."""
    import random

    import torch  # deferred: torch

    from kiln.engine.sampling_params import StructuredOutput
    from kiln.engine.structured import Grammars, default_fill_threads

    structured = StructuredOutput.json_schema(SCHEMA)
    rows: dict[str, Any] = {}
    for label, threads in (("one_thread", 1), ("families", default_fill_threads())):
        grammars = Grammars(hf, threads=threads)
        matchers: list[Any] = [grammars.matcher(structured) for _ in range(batch)]
        mask = torch.empty((batch, grammars.mask_words()), dtype=torch.int32)
        shifts = torch.arange(32, dtype=torch.int32)
        rng = random.Random(seed)
        per_step = []
        for _ in range(steps):
            if all(m is None for m in matchers):
                break
            start = time.perf_counter()
            grammars.fill_masks(matchers, mask)
            per_step.append(time.perf_counter() - start)
            for i, matcher in enumerate(matchers):
                if matcher is None:
                    continue
                bits = ((mask[i].unsqueeze(-1) >> shifts) & 1).view(-1)[: grammars.tokenizer.vocab_size]
                if (
                    not matcher.consume_token(rng.choice(bits.nonzero().flatten().tolist()))
                    or matcher.is_stopped()
                ):
                    matchers[i] = None
        rows[label] = {
            "threads": threads,
            "mean_ms": statistics.mean(per_step) * 1e3,
            "median_ms": statistics.median(per_step) * 1e3,
            "steps": len(per_step),
        }
    return rows


def _row(setup: float, compile_s: float, per_token: list[float]) -> dict[str, float]:
    return {
        "tokenizer_setup_ms": setup * 1e3,
        "compile_ms": compile_s * 1e3,
        "mask_median_us": statistics.median(per_token) * 1e6,
        "mask_max_us": max(per_token) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.grammar_backends", description=__doc__.splitlines()[0]
    )
    p.add_argument("tokenizer_dir", type=Path)
    p.add_argument("--batch", type=int, default=0, help="also time batched fills of N sequences")
    p.add_argument("--model-vocab", type=int, default=128256, help="logits width for the device rows")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    from kiln.models.tokenizer import Tokenizer  # deferred: loads transformers

    hf = Tokenizer(args.tokenizer_dir).hf
    ids = hf.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False)
    print(f"vocabulary {len(hf)}, answer {len(ids)} tokens")
    rows: dict[str, Any] = {}
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            rows[name] = bench(hf, ids)
        except ImportError:
            rows[name] = "not installed"
        print(name, rows[name])
    if args.batch:
        for name, bench_batch in (("llguidance", batch_llguidance), ("xgrammar", batch_xgrammar)):
            key = f"{name}_batch{args.batch}"
            try:
                rows[key] = bench_batch(hf, ids, args.batch)
            except ImportError:
                rows[key] = "not installed"
            print(key, rows[key])
        try:
            rows[f"kiln_families_batch{args.batch}"] = batch_families(hf, args.batch)
        except ImportError:
            rows[f"kiln_families_batch{args.batch}"] = "llguidance not installed"
        print(f"kiln_families_batch{args.batch}", rows[f"kiln_families_batch{args.batch}"])
        import torch  # deferred: only the device rows need it

        if torch.cuda.is_available():
            rows[f"device_apply_batch{args.batch}"] = apply_on_device(args.batch, len(hf), args.model_vocab)
            print("device", rows[f"device_apply_batch{args.batch}"])
    if args.json:
        args.json.write_text(
            json.dumps({"vocab_size": len(hf), "answer_tokens": len(ids), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
