"""The engine directory's format: `engine.json`, the manifest that says what the directory holds and how
to serve it, and `move_into_place`, how a finished directory (a build, its `kernels/`) replaces the old one.

Build writes this format, models and engines read it; it sits below all three.

Rules of the format:
- `engine.json` is written last (atomically, by rename), so a directory whose build crashed has none
  and is refused. Its presence means every file it lists was complete when it was written.
- Every weight file carries its sha256 and every listed file (weights and tokenizer) its size.
  `load` always checks presence and sizes (cheap: one stat per file, catches truncation);
  `load(verify_checksums=True)` also hashes the weights (slow for big models; `kiln serve --verify`).
- `format_version` only goes up when older readers could not load the layout; a reader refuses a
  newer one. Keys this reader does not know are ignored, so additions that old readers may skip
  need no bump. A native build writes the lowest version that holds its layout
  (`format_version_for`): 1 unquantized, 2 with quantized weights, which a version-1 reader would
  try to load as plain ones, 3 with an fp8 KV cache, whose scale tensors a version-2 reader does not
  know; so an older Kiln still loads an engine this one builds whenever it could run it.
- `quantization` names the scheme (kiln.config's canonical names: int8_wo, fp8, int8_sq) for both
  backends; a native quantized engine also has `quant_config` (kiln.config.QuantConfig: scale
  layout, which linears), and the two must agree; `quant_config` belongs to native engines only.
- `kv_cache_dtype` ("auto" | "fp8"; absent in older files: "auto") is the KV cache's dtype for both
  backends; a native fp8 one also has `kv_cache_config` (kiln.config.KVCacheConfig: the scale layout,
  the calibration set), and the two must agree; `kv_cache_config` belongs to native engines only.
- `generation_defaults` is the one home of the model's sampling defaults in an engine: the sampling
  fields of the checkpoint's `generation_config.json` (vLLM's and Ollama's source of them), under the
  request's field names (`max_new_tokens` -> `max_tokens`), recorded at build. A Hugging Face directory
  served without a build has them in its `generation_config.json` (`read_generation_defaults`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from kiln.config import (
    EngineLimits,
    KVCacheConfig,
    ModelConfig,
    QuantConfig,
    canonical_dtype,
    canonical_kv_cache_dtype,
)
from kiln.errors import InvalidEngineError
from kiln.version import ENGINE_FORMAT_VERSION, __version__

MANIFEST_NAME = "engine.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# generation_config.json key -> the request field it is the default of (vLLM's set; `do_sample` is not
# read, as vLLM does not: a config meaning greedy says temperature 0).
GENERATION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
_INTEGER_FIELDS = ("top_k", "max_tokens")
BACKENDS = ("native", "trtllm")
# Fields a manifest must carry; the rest have defaults (and may be absent from hand-written files).
_REQUIRED = ("backend", "model", "dtype", "weight_files", "format_version")
UNQUANTIZED_FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2  # native quantized weights + `quant_config`
FP8_KV_CACHE_FORMAT_VERSION = 3  # native fp8 KV cache: per-layer k_scale / v_scale + `kv_cache_config`
_Section = TypeVar("_Section")  # a parsed manifest section (QuantConfig, KVCacheConfig)


def format_version_for(quant_config: QuantConfig | None, kv_cache: KVCacheConfig | None = None) -> int:
    """The lowest format version that holds a native engine with this quantization and KV-cache
    layout (see the rules)."""
    if kv_cache is not None:
        return FP8_KV_CACHE_FORMAT_VERSION
    return UNQUANTIZED_FORMAT_VERSION if quant_config is None else QUANTIZED_FORMAT_VERSION


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(slots=True)
class EngineManifest:
    """What `engine.json` holds. Paths in it are file names relative to the engine directory."""

    backend: str  # "native" | "trtllm"
    model: ModelConfig
    dtype: str  # canonical name: "float32" | "float16" | "bfloat16"
    weight_files: dict[str, str]  # file name -> sha256 hex
    limits: EngineLimits = field(default_factory=EngineLimits)
    # Files the serving side reads for text: tokenizer.json, tokenizer_config.json, chat template,
    # generation_config.json (when the checkpoint had one).
    tokenizer_files: list[str] = field(default_factory=list)
    # file name -> size in bytes, for every file the engine needs (weights, their index, tokenizer):
    # the cheap truncation check. A file listed only here must exist too.
    file_sizes: dict[str, int] = field(default_factory=dict)
    served_model_name: str = "model"
    source: str = ""  # what it was built from: a path, a hub id, "tiny(seed=0)"
    quantization: str | None = None  # None: weights stored unquantized in `dtype`
    kiln_version: str = __version__
    format_version: int = ENGINE_FORMAT_VERSION
    created: str = field(default_factory=_now_iso)  # ISO 8601, UTC
    # Backend-specific facts, e.g. {"tensorrt_llm_version": "1.2.0", "gpu_arch": "sm90"} or the GGUF
    # file type a native engine was dequantized from.
    extra: dict[str, Any] = field(default_factory=dict)
    # Request field -> the model's default for it (see the module rules); {}: Kiln's own defaults.
    generation_defaults: dict[str, float | int] = field(default_factory=dict)
    # A native engine's quantized layout (None: unquantized, or a trtllm engine, whose layout is
    # TensorRT-LLM's own); `quantization` is then its scheme.
    quant_config: QuantConfig | None = None
    # The KV cache's dtype, "auto" (the engine's dtype) or "fp8" (both backends), and a native fp8
    # cache's scale layout and calibration (None otherwise; a trtllm engine's scales are its own).
    kv_cache_dtype: str = "auto"
    kv_cache_config: KVCacheConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        data["limits"] = dataclasses.asdict(self.limits)
        data["quant_config"] = None if self.quant_config is None else self.quant_config.to_dict()
        kv = self.kv_cache_config
        data["kv_cache_config"] = None if kv is None else kv.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineManifest:
        """Parse a manifest dict; raises InvalidEngineError naming the first problem found."""
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise InvalidEngineError(f"{MANIFEST_NAME} is missing fields {missing}")
        version = data["format_version"]
        if not isinstance(version, int):
            raise InvalidEngineError(f"{MANIFEST_NAME}: format_version must be an integer, got {version!r}")
        if version > ENGINE_FORMAT_VERSION:
            raise InvalidEngineError(
                f"engine format version {version} is newer than this Kiln reads ({ENGINE_FORMAT_VERSION}); "
                f"it was built by kiln {data.get('kiln_version', '?')}: upgrade kiln or rebuild the engine"
            )
        if data["backend"] not in BACKENDS:
            raise InvalidEngineError(
                f"{MANIFEST_NAME}: unknown backend {data['backend']!r} (this Kiln knows {list(BACKENDS)})"
            )
        try:
            model = ModelConfig.from_dict(data["model"])
            limits = EngineLimits(**data.get("limits", {}))
            dtype = canonical_dtype(data["dtype"])
        except (TypeError, ValueError) as exc:
            raise InvalidEngineError(f"{MANIFEST_NAME}: invalid model, limits or dtype: {exc}") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}  # unknown keys: additions we may skip
        kwargs.update(model=model, limits=limits, dtype=dtype)
        try:
            kwargs["generation_defaults"] = _checked_defaults(data.get("generation_defaults", {}))
        except ValueError as exc:
            raise InvalidEngineError(f"{MANIFEST_NAME}: generation_defaults: {exc}") from exc
        kwargs["quant_config"] = _checked_quant_config(data, version)
        kwargs["kv_cache_dtype"], kwargs["kv_cache_config"] = _checked_kv_cache(data, version)
        if not isinstance(kwargs["weight_files"], dict) or not kwargs["weight_files"]:
            raise InvalidEngineError(
                f"{MANIFEST_NAME}: weight_files must be a non-empty {{name: sha256}} map"
            )
        for name in [
            *kwargs["weight_files"],
            *kwargs.get("tokenizer_files", []),
            *kwargs.get("file_sizes", {}),
        ]:
            # Names are relative to the engine directory; anything else could point outside it.
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise InvalidEngineError(
                    f"{MANIFEST_NAME}: file name {name!r} is not inside the engine directory"
                )
        return cls(**kwargs)

    def save(self, engine_dir: Path) -> Path:
        """Write `engine.json` into engine_dir atomically (temp file + rename); returns its path."""
        engine_dir = Path(engine_dir)
        target = engine_dir / MANIFEST_NAME
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".engine-", suffix=".json", dir=engine_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, engine_dir: Path, *, verify_checksums: bool = False) -> EngineManifest:
        """Read and check `engine_dir/engine.json`; raises InvalidEngineError saying what is wrong.

        Always checks that every listed file exists with its recorded size; with verify_checksums
        also that each weight file's sha256 matches.
        """
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise InvalidEngineError(f"engine directory {engine_dir} does not exist")
        path = engine_dir / MANIFEST_NAME
        if not path.is_file():
            raise InvalidEngineError(
                f"{engine_dir} has no {MANIFEST_NAME}: not an engine directory, or its build did not finish"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidEngineError(f"{path} is not valid JSON ({exc}); rebuild the engine") from exc
        if not isinstance(data, dict):
            raise InvalidEngineError(f"{path} must hold a JSON object, got {type(data).__name__}")
        manifest = cls.from_dict(data)
        manifest.check_files(engine_dir, verify_checksums=verify_checksums)
        return manifest

    def check_files(self, engine_dir: Path, *, verify_checksums: bool = False) -> None:
        """Raise InvalidEngineError if a listed file is missing, has the wrong size or (opt.) wrong hash."""
        for name in dict.fromkeys([*self.weight_files, *self.tokenizer_files, *self.file_sizes]):
            file = engine_dir / name
            if not file.is_file():
                raise InvalidEngineError(f"engine {engine_dir} is missing file {name}; rebuild the engine")
            expected = self.file_sizes.get(name)
            if expected is not None and file.stat().st_size != expected:
                raise InvalidEngineError(
                    f"engine file {name} is {file.stat().st_size} bytes, expected {expected}: "
                    "truncated or replaced; rebuild the engine"
                )
        if verify_checksums:
            for name, expected_sha in self.weight_files.items():
                if sha256_file(engine_dir / name) != expected_sha:
                    raise InvalidEngineError(
                        f"engine file {name} fails its sha256 check: corrupt or replaced; rebuild the engine"
                    )

    def weight_paths(self, engine_dir: Path) -> list[Path]:
        """Absolute paths of the weight files, in manifest order."""
        return [Path(engine_dir) / name for name in self.weight_files]


def _native_section(
    data: dict[str, Any], key: str, parse: Callable[[Any], _Section], version: int, minimum: int, needs: str
) -> _Section:
    """`data[key]` parsed by `parse`: a native engine's only, of format version `minimum` or later
    (`needs`: what requires that version, with its verb, e.g. "an fp8 KV cache needs")."""
    if data["backend"] != "native":
        raise InvalidEngineError(f"{MANIFEST_NAME}: {key} is for native engines, not {data['backend']!r}")
    try:
        section = parse(data[key])
    except (TypeError, ValueError) as exc:
        raise InvalidEngineError(f"{MANIFEST_NAME}: {key}: {exc}") from exc
    if version < minimum:
        raise InvalidEngineError(f"{MANIFEST_NAME}: {needs} format_version >= {minimum}, it says {version}")
    return section


def _checked_quant_config(data: dict[str, Any], version: int) -> QuantConfig | None:
    """The manifest's `quant_config`, checked against its backend, `quantization` and format version."""
    if data.get("quant_config") is None:
        return None  # a native engine quantized without one is refused by the loader (kiln.models.loader)
    quant = _native_section(
        data,
        "quant_config",
        QuantConfig.from_dict,
        version,
        QUANTIZED_FORMAT_VERSION,
        "quantized weights need",
    )
    scheme = data.get("quantization")
    if scheme != quant.scheme:
        raise InvalidEngineError(
            f"{MANIFEST_NAME}: quantization {scheme!r} disagrees with quant_config's scheme {quant.scheme!r}"
        )
    return quant


def _checked_kv_cache(data: dict[str, Any], version: int) -> tuple[str, KVCacheConfig | None]:
    """The manifest's `kv_cache_dtype` ("auto" when absent) and `kv_cache_config`, checked against each
    other, the backend and the format version."""
    try:
        dtype = canonical_kv_cache_dtype(data.get("kv_cache_dtype") or "auto")
    except (AttributeError, ValueError) as exc:
        raise InvalidEngineError(f"{MANIFEST_NAME}: kv_cache_dtype: {exc}") from exc
    if data.get("kv_cache_config") is None:
        if dtype == "fp8" and data["backend"] == "native":
            raise InvalidEngineError(
                f"{MANIFEST_NAME}: kv_cache_dtype is fp8 but there is no kv_cache_config (its scales' "
                "layout); rebuild the engine"
            )
        return dtype, None
    kv = _native_section(
        data,
        "kv_cache_config",
        KVCacheConfig.from_dict,
        version,
        FP8_KV_CACHE_FORMAT_VERSION,
        "an fp8 KV cache needs",
    )
    if kv.dtype != dtype:
        raise InvalidEngineError(
            f"{MANIFEST_NAME}: kv_cache_dtype {dtype!r} disagrees with kv_cache_config's dtype {kv.dtype!r}"
        )
    return dtype, kv


def generation_config_defaults(config: dict[str, Any]) -> dict[str, float | int]:
    """The sampling defaults a `generation_config.json` object sets, under request field names.

    Absent and null keys set nothing; a value that is not a number (an integer for top_k and
    max_new_tokens) raises ValueError naming the key. Ranges are `SamplingParams.validate`'s to check."""
    if not isinstance(config, dict):
        raise ValueError(f"{GENERATION_CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    return {
        name: _number(key, config[key], integer=name in _INTEGER_FIELDS)
        for key, name in GENERATION_FIELDS.items()
        if config.get(key) is not None
    }


def _checked_defaults(defaults: Any) -> dict[str, float | int]:
    """`defaults` (request field -> number) with numbers coerced; ValueError names the bad entry."""
    if not isinstance(defaults, dict):
        raise ValueError(f"must be a {{field: number}} map, got {type(defaults).__name__}")
    known = sorted(GENERATION_FIELDS.values())
    for name in defaults:
        if name not in known:
            raise ValueError(f"unknown field {name!r} (known: {known})")
    return {name: _number(name, value, integer=name in _INTEGER_FIELDS) for name, value in defaults.items()}


def _number(name: str, value: Any, *, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if integer:
        if value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def read_generation_defaults(path: Path) -> dict[str, float | int]:
    """The model's sampling defaults at `path`: an engine directory's `generation_defaults`, else (a
    Hugging Face directory) `checkpoint_generation_defaults`. Raises InvalidEngineError for a corrupt
    manifest."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return dict(EngineManifest.load(path).generation_defaults)
    return checkpoint_generation_defaults(path)


def checkpoint_generation_defaults(directory: Path) -> dict[str, float | int]:
    """The sampling fields of `directory`'s generation_config.json (none without one); ValueError
    naming the file when it is not valid."""
    config = Path(directory) / GENERATION_CONFIG_NAME
    if not config.is_file():
        return {}
    try:
        return generation_config_defaults(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # json's errors are ValueErrors too
        raise ValueError(f"{config}: {exc}") from None


def is_engine_dir(path: Path) -> bool:
    """True when path is a directory whose engine.json loads (checksums not verified)."""
    try:
        EngineManifest.load(Path(path))
    except InvalidEngineError:
        return False
    return True


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished staging dir to output_dir, replacing an old one only now that the new is whole."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    os.replace(output_dir, retired / "engine")
    os.replace(staging, output_dir)
    shutil.rmtree(retired, ignore_errors=True)
