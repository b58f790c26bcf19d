"""Compiled Triton kernels in an engine directory (kiln.kernels.kernel_cache), on the CPU.

Cache entries are laid out as Triton 3.6 writes them (group files listing ABSOLUTE paths); the last test
compiles a real kernel for sm_90 with Triton (no GPU needed to compile) and checks that Triton's own
lookup hits the seeded copy after the original cache is gone, where a plain copy misses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import kiln.kernels.kernel_cache as kc
from kiln.kernels.tiles import AttentionConfig, GpuTarget, KernelProfile, clear_profile, tuned_config

H100 = GpuTarget("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0")
KERNELS = {"KEYA": "paged_attention", "KEYB": "rms_norm"}
LAUNCHER = ("KEYC", "__triton_launcher.cpython-311-x86_64-linux-gnu.so")


def profile(**changes) -> KernelProfile:
    fields = dict(
        gpu_name=H100.name,
        compute_capability=H100.compute_capability,
        triton_version=H100.triton_version,
        torch_version="2.11.0",
        kiln_version="0.1.0",
        num_heads=4,
        num_kv_heads=2,
        head_dim=128,
        block_size=16,
        dtype="float16",
        decode=AttentionConfig(16, 32, 4, 2),
        prefill=AttentionConfig(64, 64, 4, 3),
    )
    return KernelProfile(**{**fields, **changes})


def fake_triton_cache(root: Path) -> Path:
    """Two kernel entries and a launcher entry as Triton writes them, plus what is not an entry: an
    empty directory (Triton makes one per lookup) and an interrupted write's tmp.* directory."""
    for key, name in KERNELS.items():
        entry = root / key
        entry.mkdir(parents=True)
        children = {}
        for ext in ("cubin", "ptx", "json"):
            (entry / f"{name}.{ext}").write_bytes(f"{key}.{ext}".encode())
            children[f"{name}.{ext}"] = str(entry / f"{name}.{ext}")
        (entry / f"__grp__{name}.json").write_text(json.dumps({"child_paths": children}))
        (entry / "tmp.pid_7_abc").mkdir()
        (entry / "tmp.pid_7_abc" / f"{name}.cubin").write_bytes(b"half")
    (root / LAUNCHER[0]).mkdir()
    (root / LAUNCHER[0] / LAUNCHER[1]).write_bytes(b"\x7fELF launcher")
    (root / "EMPTYLOOKUP").mkdir()
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.json").write_text("{}")
    kc.write_kernels_dir(engine, profile(), fake_triton_cache(tmp_path / "build-cache"))
    shutil.rmtree(tmp_path / "build-cache")  # as at serve time: the build's temporary cache is gone
    return engine


@pytest.fixture
def serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A CUDA machine like the one the profile was tuned on, with an empty Triton cache dir."""
    monkeypatch.setattr(kc, "current_target", lambda device=None: H100)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.delenv("KILN_ENGINE_KERNELS", raising=False)
    clear_profile()
    yield tmp_path / "triton-cache"
    clear_profile()


def test_the_kernels_dir_holds_the_profile_and_portable_entries(engine_dir: Path) -> None:
    kernels = engine_dir / "kernels"
    assert KernelProfile.load(kernels) == profile()
    saved = kc.cache_entries(kernels / "triton")
    assert sorted(saved) == ["KEYA", "KEYB", "KEYC"]
    assert [f.name for f in saved["KEYC"]] == [LAUNCHER[1]]
    for key, name in KERNELS.items():
        assert not (kernels / "triton" / key / "tmp.pid_7_abc").exists()
        group = json.loads((kernels / "triton" / key / f"__grp__{name}.json").read_text())
        assert group["child_paths"] == {f"{name}.{ext}": f"{name}.{ext}" for ext in ("cubin", "ptx", "json")}
    assert kc.count_compiled_kernels(kernels / "triton") == 2
    assert sorted(p.name for p in engine_dir.iterdir()) == ["engine.json", "kernels"]  # no temp dirs left


def test_a_failed_write_keeps_the_old_kernels_dir_whole(
    engine_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(engine_dir / "kernels")
    copies = []

    def copy_then_crash(src: Path, dst: Path) -> None:
        if copies:
            raise OSError("disk full")
        copies.append(dst)
        shutil.copyfile(src, dst)

    monkeypatch.setattr(kc.shutil, "copy2", copy_then_crash)
    new = profile(decode=AttentionConfig(16, 128, 4, 2))
    with pytest.raises(OSError, match="disk full"):
        kc.write_kernels_dir(engine_dir, new, fake_triton_cache(tmp_path / "cache2"))
    assert copies  # it crashed mid-copy
    assert snapshot(engine_dir / "kernels") == before
    assert sorted(p.name for p in engine_dir.iterdir()) == ["engine.json", "kernels"]
    monkeypatch.undo()
    kc.write_kernels_dir(engine_dir, new, tmp_path / "cache2")
    assert KernelProfile.load(engine_dir / "kernels") == new
    assert sorted(p.name for p in engine_dir.iterdir()) == ["engine.json", "kernels"]


def test_seeding_fills_an_empty_cache_and_applies_the_profile(engine_dir: Path, serving: Path) -> None:
    before = snapshot(engine_dir)
    prep = kc.prepare_engine_kernels(engine_dir, "cuda")
    assert (prep.entries_copied, prep.entries_present, prep.profile_applied) == (3, 0, True)
    assert tuned_config(True, 128) == profile().decode
    for key, name in KERNELS.items():
        group = json.loads((serving / key / f"__grp__{name}.json").read_text())["child_paths"]
        for child, path in group.items():  # what Triton reads: absolute paths to the copies
            assert Path(path) == serving / key / child
            assert Path(path).read_bytes() == (engine_dir / "kernels" / "triton" / key / child).read_bytes()
    assert (serving / LAUNCHER[0] / LAUNCHER[1]).read_bytes() == b"\x7fELF launcher"
    assert not list(serving.rglob("tmp.*"))
    assert snapshot(engine_dir) == before  # nothing written in the engine directory
    again = kc.prepare_engine_kernels(engine_dir, "cuda")
    assert (again.entries_copied, again.entries_present) == (0, 3)


def test_seeding_never_replaces_what_the_cache_has(engine_dir: Path, serving: Path) -> None:
    (serving / "KEYA").mkdir(parents=True)
    (serving / "KEYA" / "paged_attention.cubin").write_bytes(b"compiled here")
    (serving / "KEYC").mkdir()
    (serving / "KEYC" / LAUNCHER[1]).write_bytes(b"built here")
    prep = kc.prepare_engine_kernels(engine_dir, "cuda")
    assert (prep.entries_copied, prep.entries_present) == (2, 1)  # KEYA completed, KEYB new, KEYC kept
    assert (serving / "KEYA" / "paged_attention.cubin").read_bytes() == b"compiled here"
    assert (serving / "KEYA" / "paged_attention.ptx").read_bytes() == b"KEYA.ptx"
    assert (serving / "KEYC" / LAUNCHER[1]).read_bytes() == b"built here"


@pytest.mark.parametrize("case", ["cpu", "switched off", "no profile", "no kernels dir"])
def test_nothing_is_done_on_cpu_when_off_or_without_a_profile(
    case: str, engine_dir: Path, serving: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = "cpu" if case == "cpu" else "cuda"
    if case == "switched off":
        monkeypatch.setenv("KILN_ENGINE_KERNELS", "off")
    if case == "no profile":  # e.g. copied by hand, or a tune that never finished: ignored
        (engine_dir / "kernels" / "profile.json").unlink()
    if case == "no kernels dir":
        shutil.rmtree(engine_dir / "kernels")
    prep = kc.prepare_engine_kernels(engine_dir, device)
    assert prep.skipped and prep.entries_copied == 0 and not prep.profile_applied
    assert not serving.exists() and tuned_config(True, 128) is None


def test_other_architecture_copies_nothing_other_gpu_model_keeps_the_builtin_tiles(
    engine_dir: Path, serving: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kc, "current_target", lambda device=None: GpuTarget(H100.name, (8, 0), "3.6.0"))
    prep = kc.prepare_engine_kernels(engine_dir, "cuda")
    assert prep.entries_copied == 0 and not prep.profile_applied and not serving.exists()
    monkeypatch.setattr(
        kc, "current_target", lambda device=None: GpuTarget("NVIDIA H100 PCIe", (9, 0), "3.6.0")
    )
    prep = kc.prepare_engine_kernels(engine_dir, "cuda")
    assert prep.entries_copied == 3 and not prep.profile_applied  # same code, other tuning target
    assert tuned_config(True, 128) is None


def test_an_unwritable_cache_does_not_fail_the_load(engine_dir: Path, serving: Path, caplog) -> None:
    serving.parent.mkdir(parents=True, exist_ok=True)
    serving.write_text("a file where the cache dir should be")
    prep = kc.prepare_engine_kernels(engine_dir, "cuda")
    assert prep.entries_copied == 0 and prep.profile_applied
    assert "could not copy" in caplog.text


def test_triton_hits_a_seeded_entry_after_the_build_cache_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    hits: list[bool] = []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: hits.append(kw["cache_hit"]))

    def compile_in(cache: Path) -> None:
        monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
        signature = {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
        src = ASTSource(fn=add_one, signature=signature, constexprs={"BLOCK": 64})
        triton.compile(src, target=GPUTarget("cuda", 90, 32))  # sm_90 code; no GPU needed to compile

    compile_in(tmp_path / "build-cache")
    engine = tmp_path / "engine"
    engine.mkdir()
    kc.write_kernels_dir(engine, profile(), tmp_path / "build-cache")
    shutil.copytree(tmp_path / "build-cache", tmp_path / "plain-copy")
    shutil.rmtree(tmp_path / "build-cache")
    kc.seed_triton_cache(engine / "kernels" / "triton", tmp_path / "seeded")
    compile_in(tmp_path / "seeded")
    compile_in(tmp_path / "plain-copy")  # its group file still names the deleted build cache's files
    assert hits == [False, True, False]
