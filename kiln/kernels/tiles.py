"""Attention tile shapes tuned for one GPU: the profile an engine directory keeps, and the registry
`attention_plan.default_config` consults.

Rules:
- A `KernelProfile` is `<engine_dir>/kernels/profile.json` (written by `kiln tune`, see
  kiln/build/kernels.py). It names the GPU model, compute capability and Triton version it was tuned
  on; `apply_profile` installs its choices only where all three match this machine, and says at INFO
  why not otherwise (another GPU or compiler may prefer other tiles).
- Installed choices are keyed by (decode, head_dim_p2); `default_config` returns them when present
  and its built-in H100 values otherwise. `clear_profile` goes back to the built-in values.
- The sweep that makes a profile's choices is `kiln.kernels.tile_sweep`.
- Nothing here imports Triton or touches CUDA at import: profiles load and the registry works on any
  machine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROFILE_NAME = "profile.json"
PROFILE_FORMAT = 1  # bump when a reader of the old layout would misread the new one


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """Tile shape and pipelining of one launch. block_m: rows (query token x head) per prefill tile
    (decode tiles are one token's query-head group); block_n: keys per inner step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    keys_transposed: bool = False  # load key tiles as [head_dim, block_n] (see _attend_keys)


@dataclass(frozen=True, slots=True)
class GpuTarget:
    """What a profile must match to be applied."""

    name: str  # torch.cuda.get_device_name, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]
    triton_version: str


@dataclass(slots=True)
class CandidateTiming:
    """One candidate of a sweep: its time per case (µs, CUDA events), their total, or why it lost."""

    kind: str  # "decode" | "prefill"
    config: AttentionConfig
    case_us: list[float] = field(default_factory=list)
    total_us: float | None = None  # None: it failed to run or did not match the default's output
    error: str | None = None


@dataclass(slots=True)
class KernelProfile:
    gpu_name: str
    compute_capability: tuple[int, int]
    triton_version: str
    torch_version: str
    kiln_version: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    decode: AttentionConfig
    prefill: AttentionConfig
    timings: list[CandidateTiming] = field(default_factory=list)
    kv_cache_dtype: str = "auto"  # the cache the sweep ran over: "auto" (dtype's) or "fp8" (E4M3)
    cases: dict[str, list[str]] = field(default_factory=dict)  # kind -> case labels, in case_us order
    tune_seconds: float = 0.0
    format: int = PROFILE_FORMAT

    @property
    def target(self) -> GpuTarget:
        return GpuTarget(self.gpu_name, self.compute_capability, self.triton_version)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelProfile:
        """Raises ValueError (KeyError/TypeError included) on a malformed or newer profile."""
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile format {data.get('format')!r}, this Kiln reads {PROFILE_FORMAT}")
        data = dict(data)
        data["compute_capability"] = tuple(data["compute_capability"])
        data["decode"] = AttentionConfig(**data["decode"])
        data["prefill"] = AttentionConfig(**data["prefill"])
        data["timings"] = [
            CandidateTiming(**{**t, "config": AttentionConfig(**t["config"])}) for t in data["timings"]
        ]
        return cls(**data)

    def save(self, kernels_dir: Path) -> Path:
        path = Path(kernels_dir) / PROFILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, kernels_dir: Path) -> KernelProfile | None:
        """The profile in kernels_dir; None when there is none, or (logged as a warning) when it cannot
        be read: a bad profile must never stop an engine from loading."""
        path = Path(kernels_dir) / PROFILE_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cannot read %s (%s); using the built-in kernel choices", path, exc)
            return None
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring %s: %s", path, exc)
            return None


def mismatch(profile: KernelProfile, target: GpuTarget) -> str | None:
    """Why `profile` does not fit `target` (None: it does)."""
    if profile.gpu_name != target.name:
        return f"tuned on {profile.gpu_name!r}, this GPU is {target.name!r}"
    if tuple(profile.compute_capability) != tuple(target.compute_capability):
        return f"tuned for compute capability {profile.compute_capability}, this GPU has {target.compute_capability}"
    if profile.triton_version != target.triton_version:
        return f"tuned with Triton {profile.triton_version}, this is Triton {target.triton_version}"
    return None


def current_target(device: torch.device | str | None = None) -> GpuTarget:
    """This machine's GPU (CUDA only) and Triton version."""
    import triton

    device = torch.device(device or "cuda")
    return GpuTarget(
        name=torch.cuda.get_device_name(device),
        compute_capability=tuple(torch.cuda.get_device_capability(device)),  # type: ignore[arg-type]
        triton_version=triton.__version__,
    )


# (decode, head_dim_p2) -> the installed choice. Written only by apply_profile / clear_profile, which run
# before the model's first forward; read on every attention launch.
_TUNED: dict[tuple[bool, int], AttentionConfig] = {}


def tuned_config(decode: bool, head_dim_p2: int) -> AttentionConfig | None:
    return _TUNED.get((decode, head_dim_p2))


def head_dim_p2(head_dim: int) -> int:
    return 1 << max(0, head_dim - 1).bit_length()


def apply_profile(profile: KernelProfile, target: GpuTarget | None = None) -> bool:
    """Install the profile's decode and prefill choices when it fits `target` (default: this machine's
    GPU); returns whether it did. Replaces what an earlier profile installed for the same head size."""
    why_not = mismatch(profile, target or current_target())
    if why_not is not None:
        logger.info("not applying the tuned kernel profile: %s; using the built-in tile shapes", why_not)
        return False
    p2 = head_dim_p2(profile.head_dim)
    _TUNED[(True, p2)] = profile.decode
    _TUNED[(False, p2)] = profile.prefill
    logger.info(
        "applied the tuned kernel profile for %s: decode %s, prefill %s",
        profile.gpu_name,
        profile.decode,
        profile.prefill,
    )
    return True


def clear_profile() -> None:
    """Back to the built-in tile shapes everywhere."""
    _TUNED.clear()
