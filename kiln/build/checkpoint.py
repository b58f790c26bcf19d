"""Resolving what `kiln build CHECKPOINT` was given, and reading Hugging Face checkpoints from disk.

CHECKPOINT may be:
- a local Hugging Face directory: `config.json` + `model.safetensors`, or shards listed by
  `model.safetensors.index.json` (all listed shards must be present);
- a `.gguf` file (read by `kiln.build.gguf`);
- a hub id `org/name` (only when no such local path exists), downloaded with
  `huggingface_hub.snapshot_download` limited to config, tokenizer and safetensors files.

PyTorch pickle checkpoints (`pytorch_model.bin`) are refused: unpickling runs arbitrary code and
streams badly. Errors are `CheckpointError` (unreadable, not Llama-family) or `OfflineError` (a hub
id while the hub is unreachable or `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.config import ModelConfig
from kiln.errors import CheckpointError, OfflineError
from kiln.models.weight_files import hf_weight_files

if TYPE_CHECKING:
    import torch

# What a build needs from a hub repo; skips .bin/.pt/.gguf/onnx duplicates that many repos also carry.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(slots=True)
class ResolvedCheckpoint:
    """A checkpoint found on local disk. `path` is a directory for "hf", the file for "gguf"."""

    kind: Literal["hf", "gguf"]
    path: Path
    source: str  # what the user gave (path or hub id), for the manifest
    from_hub: bool = False  # path is a hub snapshot downloaded for `source`


def resolve_checkpoint(checkpoint: str | Path) -> ResolvedCheckpoint:
    """Find the checkpoint on disk, downloading a hub id first; raises CheckpointError / OfflineError."""
    source = str(checkpoint)
    path = Path(checkpoint).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedCheckpoint("gguf", path, source)
        raise CheckpointError(
            f"{path} is a file but not a .gguf; give a Hugging Face checkpoint directory or a .gguf file"
        )
    if path.is_dir():
        hf_weight_files(path)  # fail now, with a clear message, rather than mid-build
        return ResolvedCheckpoint("hf", path, source)
    if isinstance(checkpoint, str) and _HUB_ID.match(checkpoint) and not checkpoint.startswith("."):
        return ResolvedCheckpoint("hf", download_from_hub(checkpoint), source, from_hub=True)
    raise CheckpointError(
        f"checkpoint {source!r} not found: no such file or directory, and not a hub id (org/name)"
    )


def download_from_hub(repo_id: str) -> Path:
    """snapshot_download the files a build needs; returns the local snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except LocalEntryNotFoundError as exc:
        # Raised both for HF_HUB_OFFLINE=1 and for a hub that cannot be reached, when nothing is cached.
        raise OfflineError(
            f"cannot download {repo_id!r}: the Hugging Face hub is offline or unreachable "
            "(or HF_HUB_OFFLINE=1) and it is not in the local cache. Download it where the hub is "
            "reachable and pass the directory, or use `kiln build --tiny` for an offline test model."
        ) from exc
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{repo_id!r} is gated: accept its license on the hub and log in (hf auth login)"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise CheckpointError(f"{repo_id!r} was not found on the Hugging Face hub (or is private)") from exc
    hf_weight_files(local)
    return local


def read_hf_config(checkpoint_dir: Path) -> dict[str, Any]:
    """Load `config.json` and check that Kiln can run it; returns the raw dict."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no config.json; is it a Hugging Face checkpoint?")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    model_config_from_hf(hf, where=str(path))  # validate now
    return hf


def model_config_from_hf(hf: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
    """ModelConfig.from_hf with Kiln's checks; CheckpointError for anything that is not a plain Llama."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in ("LlamaForCausalLM", "MistralForCausalLM"):
        raise CheckpointError(
            f"{where}: architecture {archs[0]} is not a Llama-family causal LM Kiln can run"
        )
    if hf.get("model_type") == "mistral" and hf.get("sliding_window"):
        raise CheckpointError(f"{where}: sliding-window attention (Mistral) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: activation {hf['hidden_act']!r} is not supported (Llama uses silu)")
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as exc:
        raise CheckpointError(f"{where}: missing required field {exc}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def iter_hf_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every tensor of the checkpoint, one file at a time.

    Tensors are read lazily (safetensors memory-maps the file), so a consumer that writes or
    releases each tensor before asking for the next never holds the whole model twice.
    """
    from safetensors import SafetensorError, safe_open

    for file in hf_weight_files(checkpoint_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc


def hf_tensor_count(checkpoint_dir: Path) -> int:
    """How many tensors iter_hf_tensors will yield (reads only the headers); for progress bars."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in hf_weight_files(checkpoint_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                total += len(f.keys())
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
    return total
