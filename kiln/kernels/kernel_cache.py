"""Compiled Triton kernels kept in an engine directory, and put into Triton's cache when it loads.

How Triton 3.6 caches (triton/runtime/cache.py, compiler/compiler.py, runtime/build.py): every compile
looks in `<cache dir>/<key>/`, the cache dir read from TRITON_CACHE_DIR at that moment (default
`$TRITON_HOME/.triton/cache`, TRITON_HOME defaulting to the home directory). The key hashes Triton's own
sources and libtriton, the kernel's source and line, its specialisation (constexprs, argument
alignment and ==1), the compile options (warps, stages), the GPU architecture and ptxas version, and
the environment variables Triton lists as changing code. A kernel's entry holds its stages (cubin,
ptx, ...), a metadata json, and `__grp__<name>.json`, which lists those files by ABSOLUTE path; the
host-side launchers Triton builds with the C compiler (`__triton_launcher*.so` per kernel signature,
`cuda_utils*.so`) are entries of their own. An entry made for another architecture or Triton build is
never looked up, so a copied entry cannot make Triton run a wrong kernel.

Layout: `<engine_dir>/kernels/profile.json` (`kiln.kernels.tiles.KernelProfile`) and
`<engine_dir>/kernels/triton/<key>/<files>`, whose group files name their files without a directory.

Rules:
- `write_kernels_dir` builds the new kernels/ in a temporary sibling and renames it into place last: a
  crash leaves the old kernels/ or none, never half of one. A kernels/ without profile.json is ignored.
- `prepare_engine_kernels` never writes in the engine directory (it may be read-only), never replaces a
  file already in Triton's cache, does nothing on CPU, under KILN_ENGINE_KERNELS=off or without
  kernels/, and never fails a load: what it cannot read or write is logged and skipped.
- Entries are copied when the profile's compute capability and Triton version are this machine's (they
  could not be hit otherwise); the tile choices are applied only when the GPU model matches too.
- The launchers are native code the server process loads: trust an engine directory as a program.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.engine_dir import move_into_place
from kiln.kernels.switches import env_switch
from kiln.kernels.tiles import KernelProfile, apply_profile, current_target

logger = logging.getLogger(__name__)

KERNELS_DIR = "kernels"
TRITON_SUBDIR = "triton"
GROUP_PREFIX = "__grp__"


@dataclass(slots=True)
class KernelPrep:
    """What `prepare_engine_kernels` did."""

    entries_copied: int = 0  # cache entries that got at least one file from the engine dir
    entries_present: int = 0  # entries already complete in Triton's cache, left as they were
    profile_applied: bool = False
    skipped: str | None = None  # why nothing was done, when nothing was


def engine_kernels_enabled() -> bool:
    """KILN_ENGINE_KERNELS=off (or 0/false/no) makes loads ignore an engine directory's kernels/: to
    measure without it, or to keep its compiled code out of this process."""
    return bool(env_switch("KILN_ENGINE_KERNELS", True))


def triton_cache_dir() -> Path:
    """The directory Triton's next compile will use."""
    try:
        from triton import knobs

        return Path(knobs.cache.dir)  # honours a directory set in code as well as TRITON_CACHE_DIR
    except (ImportError, AttributeError):
        if os.environ.get("TRITON_CACHE_DIR"):
            return Path(os.environ["TRITON_CACHE_DIR"])
        home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
        return Path(home) / ".triton" / "cache"


def cache_entries(cache_dir: Path) -> dict[str, list[Path]]:
    """key -> the entry's files, for entries holding any (Triton also leaves empty dirs from lookups and
    `tmp.*` dirs from interrupted writes; neither is an entry)."""
    entries: dict[str, list[Path]] = {}
    if not Path(cache_dir).is_dir():
        return entries
    for entry in sorted(Path(cache_dir).iterdir()):
        if not entry.is_dir():
            continue
        files = sorted(f for f in entry.iterdir() if f.is_file() and not f.name.startswith("tmp."))
        if files:
            entries[entry.name] = files
    return entries


def count_compiled_kernels(cache_dir: Path) -> int:
    """Compiled GPU kernels in a cache dir (one group file each; launchers not counted)."""
    return sum(
        1 for files in cache_entries(cache_dir).values() for f in files if f.name.startswith(GROUP_PREFIX)
    )


def _group_with_dir(text: str, directory: Path | None) -> str:
    """A group file's text with each listed path moved into `directory` (None: bare file names)."""
    children = json.loads(text)["child_paths"]
    moved = {
        name: (Path(path).name if directory is None else str(directory / Path(path).name))
        for name, path in children.items()
    }
    return json.dumps({"child_paths": moved})


def save_cache_entries(cache_dir: Path, dest: Path) -> int:
    """Copy every entry of `cache_dir` into `dest` (made here), group files made directory-free; returns
    how many entries were copied."""
    entries = cache_entries(cache_dir)
    for key, files in entries.items():
        (dest / key).mkdir(parents=True)
        for f in files:
            if f.name.startswith(GROUP_PREFIX):
                (dest / key / f.name).write_text(_group_with_dir(f.read_text(), None))
            else:
                shutil.copy2(f, dest / key / f.name)
    return len(entries)


def seed_triton_cache(source: Path, cache_dir: Path) -> tuple[int, int]:
    """Copy the entries under `source` (a kernels/triton dir) into `cache_dir` without replacing any file
    there; group files are written last in each entry, pointing at the copies. Returns (entries that got
    files, entries already complete)."""
    copied = present = 0
    for key, files in cache_entries(source).items():
        target = cache_dir / key
        target.mkdir(parents=True, exist_ok=True)
        missing = [f for f in files if not (target / f.name).exists()]
        if not missing:
            present += 1
            continue
        # Data files first: a group file is what makes Triton treat the entry as a hit.
        for f in sorted(missing, key=lambda f: f.name.startswith(GROUP_PREFIX)):
            if f.name.startswith(GROUP_PREFIX):
                data = _group_with_dir(f.read_text(), target).encode()
            else:
                data = f.read_bytes()
            # Written aside and renamed, as Triton itself does, so a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(prefix="tmp.kiln.", dir=target)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target / f.name)
        copied += 1
    return copied, present


def write_kernels_dir(engine_dir: Path, profile: KernelProfile, cache_dir: Path) -> Path:
    """Write `<engine_dir>/kernels` (the profile and cache_dir's entries), replacing an old one whole."""

    engine_dir = Path(engine_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{KERNELS_DIR}.tmp-", dir=engine_dir))
    try:
        save_cache_entries(cache_dir, staging / TRITON_SUBDIR)
        profile.save(staging)
        move_into_place(staging, engine_dir / KERNELS_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return engine_dir / KERNELS_DIR


def prepare_engine_kernels(engine_dir: str | Path, device: torch.device | str) -> KernelPrep:
    """Before a native engine's model loads on `device`: seed Triton's cache with the engine directory's
    compiled kernels and apply its tuned tile shapes (see the module rules)."""
    device = torch.device(device)
    if device.type != "cuda":
        return KernelPrep(skipped="not a CUDA device")
    if not engine_kernels_enabled():
        return KernelPrep(skipped="KILN_ENGINE_KERNELS is off")
    kernels = Path(engine_dir) / KERNELS_DIR
    profile = KernelProfile.load(kernels)
    if profile is None:
        return KernelPrep(skipped=f"no {KERNELS_DIR}/profile.json")
    target = current_target(device)
    prep = KernelPrep()
    if profile.compute_capability != target.compute_capability:
        why_not = (
            f"compiled for compute capability {profile.compute_capability}, not {target.compute_capability}"
        )
    elif profile.triton_version != target.triton_version:
        why_not = f"compiled by Triton {profile.triton_version}, this is {target.triton_version}"
    else:
        why_not = None
    if why_not is None:
        cache_dir = triton_cache_dir()
        try:
            prep.entries_copied, prep.entries_present = seed_triton_cache(kernels / TRITON_SUBDIR, cache_dir)
            logger.info(
                "Triton cache %s: %d entries (compiled kernels, launchers) added from %s, %d already there",
                cache_dir,
                prep.entries_copied,
                kernels,
                prep.entries_present,
            )
        except OSError as exc:  # e.g. an unwritable home: the kernels then compile as usual
            logger.warning("could not copy %s into Triton's cache %s: %s", kernels, cache_dir, exc)
    else:
        logger.info("not using the compiled kernels in %s: %s", kernels, why_not)
    prep.profile_applied = apply_profile(profile, target)
    return prep
