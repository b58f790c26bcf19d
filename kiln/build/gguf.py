"""Reading a Llama-family GGUF file as a Hugging Face checkpoint: config, dequantized tensors, tokenizer.

We lean on transformers' own GGUF support, so a GGUF converted by Kiln is exactly what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` loads (tests/build/test_gguf.py checks it):
- `AutoConfig.from_pretrained(..., gguf_file=)` maps GGUF metadata to an HF config dict;
- `load_gguf_checkpoint(..., return_tensors=True)` dequantizes every tensor through the `gguf` package
  and undoes llama.cpp's Q/K row permutation, returning HF tensor names (fp32, or the dtype asked).
  Tied embeddings show as the absence of `lm_head.weight`;
- `AutoTokenizer.from_pretrained(..., gguf_file=)` rebuilds the tokenizer and chat template.

Quantized GGUFs are dequantized: the engine stores plain `dtype` weights. The GGUF's file type
(e.g. "MOSTLY_Q4_1") is reported so the manifest can say what the weights went through.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.build.checkpoint import model_config_from_hf
from kiln.errors import CheckpointError

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class GGUFCheckpoint:
    """A GGUF file read as Hugging Face pieces."""

    hf_config: dict[str, Any]  # as AutoConfig produces it (transformers' spelling)
    tensors: dict[str, torch.Tensor]  # HF names, dequantized; no lm_head.weight when tied
    file_type: str | None  # llama.cpp file type, e.g. "MOSTLY_Q4_1"; None if the file does not say


def read_gguf_config(path: Path) -> dict[str, Any]:
    """The HF config dict of a Llama-family GGUF (metadata only); CheckpointError if unreadable or not Llama."""
    from transformers import AutoConfig

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, struct.error) as exc:  # struct.error: a truncated header
        raise CheckpointError(f"cannot read GGUF {path}: {exc}") from exc
    hf = config.to_dict()
    hf["architectures"] = hf.get("architectures") or ["LlamaForCausalLM"]
    model_config_from_hf(hf, where=str(path))  # refuse non-Llama files before the slow part
    return hf


def _file_type_name(value: Any) -> str | None:
    """llama.cpp's `general.file_type` number as a name ("MOSTLY_Q4_1", "ALL_F32", ...), or None."""
    from gguf import LlamaFileType

    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name
    except ValueError:
        return f"file_type_{value}"


def expected_tensor_count(hf_config: dict[str, Any]) -> int:
    """Tensors a llama.cpp Llama GGUF holds for this config: token_embd, output_norm, [output], 9 per layer.

    For progress bars only (saves parsing the file once more); a file with extras (rope_freqs)
    just runs one past the total.
    """
    untied_output = 0 if hf_config.get("tie_word_embeddings") else 1
    return 2 + untied_output + 9 * int(hf_config["num_hidden_layers"])


@contextmanager
def _tensor_progress(on_tensor: Callable[[], None] | None) -> Iterator[None]:
    """Route load_gguf_checkpoint's per-tensor tqdm loop to on_tensor (or to nothing).

    transformers offers no progress hook, and its tqdm bar would interleave with Kiln's rich bar;
    the module looks `tqdm` up at call time, so swapping that one name for the call is enough.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a transformers without that loop: nothing to route
        yield
        return

    def quiet(iterable: Iterable[Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
        for item in iterable:
            yield item
            if on_tensor is not None:
                on_tensor()

    gguf_utils.tqdm = quiet
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_gguf(
    path: Path,
    *,
    hf_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    on_tensor: Callable[[], None] | None = None,
) -> GGUFCheckpoint:
    """Read config and all tensors of a Llama-family GGUF (dequantized to fp32, HF names).

    hf_config: read_gguf_config(path) when the caller already has it (each parse of a GGUF's
    metadata costs seconds: the vocabulary is in it). on_tensor is called once per GGUF tensor
    converted (about expected_tensor_count(hf_config) times). dtype: convert each tensor right after
    dequantizing it (same values as converting later; a 7B model then never sits in memory as fp32).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    hf = hf_config if hf_config is not None else read_gguf_config(path)
    config = CONFIG_MAPPING[hf["model_type"]].from_dict(hf)
    # transformers maps GGUF names to HF names through a model instance; on the meta device it costs
    # nothing (no memory is allocated for its parameters).
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        with _tensor_progress(on_tensor):
            parsed = load_gguf_checkpoint(
                str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=dtype
            )
    except (ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"cannot convert GGUF {path}: {exc}") from exc
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    if hf.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    file_type = _file_type_name(parsed.get("ignore", {}).get("file_type"))
    return GGUFCheckpoint(hf_config=hf, tensors=tensors, file_type=file_type)


def save_gguf_tokenizer(path: Path, out_dir: Path) -> list[str]:
    """Rebuild the GGUF's tokenizer (with its chat template) and save it in HF format into out_dir.

    Returns the names of the files written, relative to out_dir.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"cannot read the tokenizer of GGUF {path}: {exc}") from exc
    written = tokenizer.save_pretrained(str(out_dir))
    return sorted(Path(p).name for p in written if Path(p).is_file())
