"""What `kiln serve [MODEL]` (and `kiln chat` / `kiln complete` in-process) serves, as a directory.

Rules:
- MODEL is an engine directory, a Hugging Face checkpoint directory (both open directly), or a hub
  id (`org/name`, downloaded once into the Hugging Face cache). A quantized checkpoint is refused with
  what to do: a pre-quantized FP8 one is built first (`kiln build`), others are not supported.
- No MODEL: the embedded default (SmolLM2-135M-Instruct), built into Kiln's cache the first time;
  without network that raises OfflineError, whose message the CLI prints with a hint to use --tiny.
- `tiny`: a tiny random-weight model built into Kiln's cache (no download; output is gibberish,
  for trying the plumbing).
"""

from __future__ import annotations

from pathlib import Path

from kiln.build.checkpoint import read_hf_config, resolve_checkpoint
from kiln.build.default_model import default_cache_dir, ensure_default_engine
from kiln.engine_dir import is_engine_dir
from kiln.errors import CheckpointError

TINY_ENGINE_NAME = "tiny"


def tiny_engine_dir(cache_dir: Path | None = None) -> Path:
    """Build (once) and return the tiny random model's engine directory in Kiln's cache."""
    engine_dir = (cache_dir or default_cache_dir()) / "engines" / TINY_ENGINE_NAME
    if not is_engine_dir(engine_dir):
        from kiln.build.native import build_tiny_engine  # deferred: torch (`kiln serve` imports this first)

        build_tiny_engine(engine_dir, served_model_name=TINY_ENGINE_NAME, overwrite=True)
    return engine_dir


def resolve_model_dir(model: str | None, *, tiny: bool = False, progress: bool = True) -> Path:
    """The directory to open for MODEL (see the module rules). May build or download."""
    if tiny:
        if model is not None:
            raise ValueError("give either MODEL or --tiny, not both")
        return tiny_engine_dir()
    if model is None:
        return ensure_default_engine(progress=progress)
    path = Path(model).expanduser()
    resolved = path if path.exists() else resolve_checkpoint(model).path  # a hub id: may download
    if not is_engine_dir(resolved) and (resolved / "config.json").is_file():
        _refuse_quantized_checkpoint(resolved)
    return resolved


def _refuse_quantized_checkpoint(checkpoint_dir: Path) -> None:
    """A quantized Hugging Face checkpoint opens only as a built engine: the loader reads 16-bit weights."""
    # Deferred: torch, imported only for a quantized checkpoint.
    from kiln.build.prequantized import prequantized_fp8

    hf = read_hf_config(checkpoint_dir)
    if "quantization_config" not in hf and not (checkpoint_dir / "hf_quant_config.json").is_file():
        return  # hf_quant_config.json: ModelOpt's older exports say it there only (kiln.build.modelopt)
    prequantized_fp8(checkpoint_dir, hf)  # CheckpointError naming what Kiln cannot build
    raise CheckpointError(
        f"{checkpoint_dir} is a pre-quantized FP8 checkpoint: build it into an fp8 engine first "
        f"(kiln build {checkpoint_dir} -o ENGINE_DIR), then serve ENGINE_DIR"
    )
