"""`KILN_*` environment variables that Kiln reads nowhere: a mistyped setting is named, not ignored.

Rules: Kiln reads `KILN_<FIELD>` for each `ServerSettings` field (through pydantic-settings, in any
case) and the variables of `OTHER_VARIABLES`, exactly as spelled there (the CLI's and the kernels';
tests/unit/test_environment.py checks that every `KILN_*` name the package reads is one of them). Any
other `KILN_*` variable is reported with the closest name Kiln does read, so `KILN_MAX_NUM_SEQZ=4`
asks "did you mean KILN_MAX_NUM_SEQS?" instead of leaving the server on the default without a word.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from kiln.serve.settings import ServerSettings

# Read outside `ServerSettings`, each where its comment says.
OTHER_VARIABLES = frozenset(
    {
        "KILN_API_KEY",  # kiln chat / kiln complete: the key for --url (kiln/cli.py)
        "KILN_CACHE_DIR",  # the default model's, tiny builds' and chat history's root (kiln/build/default_model.py)
        "KILN_KERNELS",  # `reference`: the PyTorch kernels on CUDA too (kiln/kernels/__init__.py)
        "KILN_ENGINE_KERNELS",  # the kernel switches (kiln/kernels/switches.py)
        "KILN_PDL",
        "KILN_WIDEN_BITS",
        "KILN_FP8_FAST_ACCUM",
        "KILN_COMPILE_WATCH",
    }
)


def setting_variables() -> frozenset[str]:
    """`KILN_<FIELD>` for every `ServerSettings` field."""
    return frozenset(f"KILN_{name.upper()}" for name in ServerSettings.model_fields)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each `KILN_*` variable of `environ` that Kiln does not read, with the closest name it reads
    (None when nothing is close), in name order."""
    settings = setting_variables()
    known = sorted(settings | OTHER_VARIABLES)
    unknown = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("KILN_") or upper in settings or name in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        unknown.append((name, close[0] if close else None))
    return unknown
