"""Where a directory's safetensors weights live: one `model.safetensors`, or shards named by
`model.safetensors.index.json`.

Hugging Face checkpoints and Kiln's engine directories share this layout (kiln.build.shards writes
it), so one function finds the files of either: the index's shards when there is an index, all of
which must exist; else `model.safetensors`; else every `*.safetensors` in the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order; CheckpointError if incomplete."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (checkpoint_dir / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{checkpoint_dir} is missing shards listed in {WEIGHTS_INDEX_NAME}: {missing}"
            )
        return [checkpoint_dir / n for n in names]
    if (checkpoint_dir / WEIGHTS_NAME).is_file():
        # Some repos also carry other *.safetensors (e.g. Mistral's consolidated file) beside it.
        return [checkpoint_dir / WEIGHTS_NAME]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if files:
        return files
    if any(checkpoint_dir.glob("pytorch_model*.bin")):
        raise CheckpointError(
            f"{checkpoint_dir} holds only PyTorch pickle weights (pytorch_model*.bin), which Kiln does not "
            "load (unpickling can run arbitrary code). Convert them to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
        )
    if any(checkpoint_dir.glob("*.gguf")):
        raise CheckpointError(f"{checkpoint_dir} holds .gguf files; pass the .gguf file itself")
    raise CheckpointError(f"{checkpoint_dir} has no *.safetensors weights")
