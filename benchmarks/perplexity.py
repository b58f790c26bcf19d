"""Perplexity per quantization scheme on a real English text that ships with Python, on the CPU in float32.

    python -m benchmarks.perplexity --json perplexity.json           # the default model, every scheme
    python -m benchmarks.perplexity --schemes none,fp8 --tokens 2048
    python -m benchmarks.perplexity ENGINE_DIR [ENGINE_DIR ...]      # the first is the reference

The reference is the default model's float32 engine (`--default-model`, the default when no ENGINE_DIR
is given; built once into Kiln's cache) or else the first ENGINE_DIR. Each scheme of `--schemes` but
`none` (the reference itself) is built into a temporary directory from the reference's own source (the
checkpoint its engine.json names: for the default model, the GGUF in Kiln's cache), in float32, so the
scheme is the only difference. Further ENGINE_DIRs are measured as they are. A scheme is a
`kiln build --quantization` name with an optional group size, `int8-wo-g64` = int8-wo in groups of 64;
the default list has `int8-sq` when the native build runs it, calibrated on the `--calib-tokens` tokens
of the same text that follow the measured slice (never on the tokens it is scored on).

The text (`corpus_text`): Python's own `pydoc_data.topics` (the help topics of the Python docs, in the
standard library): its topics sorted by key, joined by blank lines, the first `--tokens` tokens of it
under the reference's tokenizer. The text is the running Python's, so its version and the text's sha256
are in the JSON. Windows (`windows`): `--window` tokens (capped by the model's context) advanced by
`--stride`; the first window scores every token after its first, each later one only the tokens no
window scored before, so every token but the first is scored once, after at least
`window - stride` tokens of context (fewer in the first window).

Per engine, over the scored tokens: perplexity = exp(mean negative log-likelihood of each token);
top-1 = share of positions where its most likely token is the reference's; KL = mean KL(reference ||
engine) in nats. The logits are Kiln's own model's, one prefill per window (kiln.bench.accuracy).
Output: the JSON (`--json`) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.bench.accuracy import load_float32, prefill_logits
from kiln.config import NATIVE_QUANTIZATIONS, canonical_quantization
from kiln.engine_dir import EngineManifest
from kiln.models.tokenizer import Tokenizer

DEFAULT_SCHEMES = ("none", "int8-wo", "int8-wo-g64", "fp8") + (
    ("int8-sq",) if "int8_sq" in NATIVE_QUANTIZATIONS else ()
)
DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512
DEFAULT_CALIB_TOKENS = 8192  # int8-sq's calibration: 16 samples of 512 tokens after the measured slice
TEXT_SOURCE = "pydoc_data.topics: topics sorted by key, joined by blank lines"


@dataclass(slots=True)
class Scheme:
    """A quantization to build: `scheme` None is the reference itself."""

    label: str  # as given: none, int8-wo, int8-wo-g64, fp8
    scheme: str | None  # kiln.config's canonical name
    group_size: int | None = None


@dataclass(slots=True)
class EngineResult:
    label: str
    engine: str  # the engine dir; for a variant built here, "built from <source>" (its dir is gone)
    quantization: str | None
    group_size: int | None
    perplexity: float
    mean_nll: float
    top1: float
    mean_kl: float
    scored_tokens: int


@dataclass(slots=True)
class Report:
    text: dict[str, Any]
    window: int
    stride: int
    windows: list[tuple[int, int, int]]  # (start, end, first scored position) of each window
    reference: str
    results: list[EngineResult] = field(default_factory=list)


def parse_scheme(text: str) -> Scheme:
    """'none' | a quantization name | 'int8-wo-gN' (groups of N). ValueError for anything else."""
    name, group = text.strip(), None
    head, sep, tail = name.rpartition("-g")
    if sep and tail.isdigit():
        name, group = head, int(tail)
    scheme = canonical_quantization(name)
    if group is not None and scheme != "int8_wo":
        raise ValueError(f"{text!r}: a group size applies to int8-wo only")
    if scheme is None and name.lower() not in ("none", ""):
        raise ValueError(f"{text!r}: not a scheme")
    return Scheme(text.strip(), scheme, group)


def corpus_text() -> str:
    """The fixed real text: Python's help topics (pydoc_data.topics), sorted by key, blank-line joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over num_tokens tokens.

    A position p is scored when the logits of p - 1 (inside the same window) predict token p; the first
    window scores 1..end-1, each later one end_before..end-1. Every position but 0 is scored once.
    """
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got {window}, {stride}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens, got {num_tokens}")
    out, start, scored_to = [], 0, 1
    while scored_to < num_tokens:
        end = min(start + window, num_tokens)
        out.append((start, end, scored_to))
        scored_to, start = end, start + stride
    return out


def measure(
    reference: Path,
    engines: Sequence[tuple[str, Path]],
    token_ids: list[int],
    window: int,
    stride: int,
) -> Report:
    """Score token_ids under the reference and each (label, engine dir); the reference comes first."""
    ref_model = load_float32(reference)
    window = min(window, ref_model.config.max_position_embeddings)
    spans = windows(len(token_ids), window, stride)
    models = [(label, path, load_float32(path)) for label, path in engines]
    nll = [0.0] * (len(models) + 1)
    kl = [0.0] * (len(models) + 1)
    same = [0] * (len(models) + 1)
    scored = 0
    for start, end, first in spans:
        ids = token_ids[start:end]
        targets = torch.tensor(token_ids[first:end])
        rows = slice(first - 1 - start, end - 1 - start)  # the rows that predict targets
        log_p = prefill_logits(ref_model, ids)[rows].log_softmax(-1)
        top_p = log_p.argmax(-1)
        scored += len(targets)
        for i, model in enumerate([ref_model] + [m for _, _, m in models]):
            log_q = log_p if i == 0 else prefill_logits(model, ids)[rows].log_softmax(-1)
            nll[i] -= log_q.gather(-1, targets[:, None]).sum().item()
            kl[i] += (log_p.exp() * (log_p - log_q)).sum().item()
            same[i] += int((log_q.argmax(-1) == top_p).sum().item())
    report = Report(text={}, window=window, stride=stride, windows=spans, reference=str(reference))
    for i, (label, path) in enumerate([("none", reference), *((lb, p) for lb, p, _ in models)]):
        manifest = EngineManifest.load(path)
        quant = manifest.quant_config
        report.results.append(
            EngineResult(
                label=label,
                engine=str(path),
                quantization=manifest.quantization,
                group_size=quant.group_size if quant is not None else None,
                perplexity=math.exp(nll[i] / scored),
                mean_nll=nll[i] / scored,
                top1=same[i] / scored,
                mean_kl=kl[i] / scored,
                scored_tokens=scored,
            )
        )
    return report


def build_variants(
    reference: Path, schemes: Sequence[Scheme], out_dir: Path, calib_text: str
) -> list[tuple[str, Path]]:
    """Build each scheme (but `none`) from the reference engine's recorded source, float32, into out_dir.

    int8_sq calibrates on calib_text (the part of the text after the measured slice, so the scheme is
    never scored on what it was calibrated on), in samples of kiln.build.calibrate.CALIB_SEQ_LEN tokens.
    """
    from kiln.build import build_engine  # deferred: the build floor only when something is built

    todo = [s for s in schemes if s.scheme is not None]
    if not todo:
        return []
    source = Path(EngineManifest.load(reference).source)
    if not source.exists():
        raise FileNotFoundError(
            f"{reference}: its engine.json names {source} as its source, which is not on disk; "
            "build the variants with kiln build and pass their directories instead"
        )
    built = []
    for s in todo:
        engine = out_dir / s.label
        options: dict[str, Any] = {}
        if s.scheme == "int8_sq":
            calib_file = out_dir / "calibration.txt"
            calib_file.write_text(calib_text, encoding="utf-8")
            options = {"calib_dataset": calib_file, "calib_size": 1 << 20}  # the whole file
        print(f"building {s.label} from {source}", file=sys.stderr)
        build_engine(
            source,
            engine,
            dtype="float32",
            quantization=s.scheme,
            quant_group_size=s.group_size,
            progress=False,
            **options,
        )
        built.append((s.label, engine))
    return built


def run(
    reference: Path,
    schemes: Sequence[Scheme],
    extra_engines: Sequence[Path],
    num_tokens: int,
    window: int = DEFAULT_WINDOW,
    stride: int = DEFAULT_STRIDE,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    work_dir: Path | None = None,
) -> Report:
    """The whole benchmark: the text's first num_tokens tokens, the variants built, every engine scored."""
    text = corpus_text()
    tokenizer = Tokenizer(reference)
    all_ids = tokenizer.encode(text)
    token_ids = all_ids[:num_tokens]
    if len(token_ids) < num_tokens:
        raise ValueError(f"the text has only {len(token_ids)} tokens, fewer than {num_tokens}")
    calib_text = tokenizer.decode(all_ids[num_tokens : num_tokens + calib_tokens])
    with tempfile.TemporaryDirectory(prefix="kiln-ppl-", dir=work_dir) as tmp:
        engines = build_variants(reference, schemes, Path(tmp), calib_text)
        engines += [(path.name, path) for path in extra_engines]
        report = measure(reference, engines, token_ids, window, stride)
    source = EngineManifest.load(reference).source
    for result in report.results[1 : len(report.results) - len(extra_engines)]:
        result.engine = f"built from {source}"
    report.text = {
        "source": TEXT_SOURCE,
        "python": platform.python_version(),
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "tokens": len(token_ids),
        "tokenizer": str(reference),
        "calibration": f"int8-sq only: tokens {num_tokens}..{num_tokens + calib_tokens} of the same text",
    }
    return report


def to_markdown(report: Report) -> str:
    rows = [
        "| scheme | perplexity | top-1 vs unquantized | mean KL (nats) |",
        "| --- | --- | --- | --- |",
    ]
    for r in report.results:
        label = "unquantized float32" if r.engine == report.reference else f"`{r.label}`"
        rows.append(f"| {label} | {r.perplexity:.3f} | {r.top1:.3f} | {r.mean_kl:.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("engines", nargs="*", type=Path, help="engine dirs; the first is the reference")
    p.add_argument(
        "--default-model", action="store_true", help="the reference is the default model (float32)"
    )
    p.add_argument(
        "--schemes",
        default=None,
        help=f"comma-separated; default {','.join(DEFAULT_SCHEMES)} with the default model, none with ENGINE_DIRs",
    )
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="first N tokens of the text")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE)
    p.add_argument(
        "--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, help="int8-sq's calibration tokens"
    )
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)

    extra = list(args.engines)
    if args.default_model or not extra:
        from kiln.build.default_model import ensure_default_engine  # deferred: only for the default model

        reference = ensure_default_engine(dtype="float32")
        schemes_text = args.schemes or ",".join(DEFAULT_SCHEMES)
    else:
        reference = extra.pop(0)
        schemes_text = args.schemes or "none"
    schemes = [parse_scheme(s) for s in schemes_text.split(",") if s.strip()]
    report = run(reference, schemes, extra, args.tokens, args.window, args.stride, args.calib_tokens)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(
        f"{report.text['tokens']} tokens of {report.text['source']} (Python {report.text['python']}), "
        f"windows of {report.window} advanced by {report.stride}\n"
    )
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
