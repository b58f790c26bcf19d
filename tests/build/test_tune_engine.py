"""kiln.build.kernels on the CPU: the warm-up steps against a real engine, and the parent's side of
`tune_engine_kernels` (the child's environment, the kernels/ it writes) with the GPU child stood in for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kiln.build.kernels as bk
from kiln.build import build_tiny_engine
from kiln.config import EngineLimits
from kiln.errors import BackendUnavailableError
from kiln.kernels.tiles import AttentionConfig, KernelProfile

LIMITS = EngineLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=256)


@pytest.fixture(scope="module")
def tiny_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("warm") / "engine"
    build_tiny_engine(path, limits=LIMITS)
    return path


def test_warm_steps_cover_every_kind_of_step(tiny_engine_dir: Path) -> None:
    from kiln.config import EngineConfig
    from kiln.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_path(tiny_engine_dir, EngineConfig(device="cpu"))
    steps: list[list[tuple[int, int]]] = []  # per step: (start, new tokens) of each request
    launch = engine.runner.launch

    def recording_launch(scheduled: Any, forwarded: Any = None) -> Any:
        steps.append([(item.start, item.num_new_tokens) for item in scheduled.scheduled])
        return launch(scheduled, forwarded)

    engine.runner.launch = recording_launch  # type: ignore[method-assign]
    count = bk.warm_steps(engine, max_num_tokens=LIMITS.max_num_tokens, max_num_seqs=LIMITS.max_batch_size)
    assert count >= len(steps) > 20
    assert not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0
    prefill_sizes = {new for step in steps if len(step) == 1 for start, new in step if start == 0}
    assert {1, 7, 16, LIMITS.max_num_tokens} <= prefill_sizes
    assert any(sum(new for _, new in step) == LIMITS.max_num_tokens for step in steps)  # a full budget
    assert any(start > 0 and new > 1 for step in steps for start, new in step)  # chunk over cached keys
    assert engine.stats().prefix_cache_hits > 0
    mixed = [step for step in steps if {new == 1 for _, new in step} == {True, False}]
    assert mixed, "no step mixed prefills into running decodes"
    decode_batches = {len(step) for step in steps if all(new == 1 for _, new in step)}
    assert {1, 3} <= decode_batches


def test_warm_steps_decode_each_batch_at_every_variant_length(
    tiny_engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where decode_lengths names contexts (on CUDA: where the split count or the decode tile changes),
    every eager batch size runs decode-only steps at each: all of its requests at once (here three prompts
    of 69 tokens take four prefill steps of 64), the longest context a few tokens past the length."""
    from kiln.config import EngineConfig
    from kiln.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_path(tiny_engine_dir, EngineConfig(device="cpu"))
    asked: list[int] = []
    monkeypatch.setattr(bk, "decode_lengths", lambda eng, batch: asked.append(batch) or [40, 70])
    decodes: list[tuple[int, int]] = []  # (batch, longest context) of each decode-only step
    launch = engine.runner.launch

    def recording_launch(scheduled: Any, forwarded: Any = None) -> Any:
        items = scheduled.scheduled
        if all(item.num_new_tokens == 1 for item in items):
            decodes.append((len(items), max(item.start for item in items) + 1))
        return launch(scheduled, forwarded)

    engine.runner.launch = recording_launch  # type: ignore[method-assign]
    bk.warm_steps(engine, max_num_tokens=LIMITS.max_num_tokens, max_num_seqs=LIMITS.max_batch_size)
    assert asked == [1, 3]  # the eager batch sizes within max_num_seqs
    for batch in (1, 3):
        for length in (40, 70):
            assert any(n == batch and length <= ctx < length + 8 for n, ctx in decodes), (batch, length)
    assert not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0


def test_variant_lengths_are_the_first_of_each_split_count_and_tile_class() -> None:
    def splits(n: int) -> int:
        return 1 if n < 128 else 2 if n < 256 else 4

    assert bk.variant_lengths(splits, (), 300) == [2, 128, 256]
    assert bk.variant_lengths(splits, (512,), 1000) == [2, 128, 256, 513]  # the tile past 512 keys
    assert bk.variant_lengths(splits, (100,), 1000) == [2, 101, 128, 256]  # 101-127: one split, long tile
    assert bk.variant_lengths(splits, (512,), 200) == [2, 128]


def test_tune_engine_kernels_refuses_a_machine_without_a_gpu(
    tiny_engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="kiln tune ENGINE_DIR"):
        bk.tune_engine_kernels(tiny_engine_dir)
    assert not (tiny_engine_dir / "kernels").exists()


def test_the_parent_runs_a_fresh_child_on_an_empty_cache_and_saves_what_it_compiled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine_dir = tmp_path / "engine"  # check_tunable is stood in for below: any directory will do
    engine_dir.mkdir()
    profile = KernelProfile(
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        triton_version="3.6.0",
        torch_version="2.11.0",
        kiln_version="0.1.0",
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        dtype="float32",
        decode=AttentionConfig(16, 32, 4, 2),
        prefill=AttentionConfig(64, 64, 4, 3),
        tune_seconds=3.5,
    )
    seen: dict[str, Any] = {}

    def child(command: list[str], *, env: dict[str, str], capture_output: bool, text: bool) -> Any:
        """Stands in for `python -m kiln.build.kernels` on a GPU: compiles two kernels into its cache."""
        seen.update(command=command, env=env)
        cache = Path(env["TRITON_CACHE_DIR"])
        seen["cache_was_empty"] = not cache.exists() or not any(cache.iterdir())
        for key in ("K1", "K2"):
            (cache / key).mkdir(parents=True)
            (cache / key / "k.cubin").write_bytes(b"sass")
            (cache / key / "__grp__k.json").write_text(
                json.dumps({"child_paths": {"k.cubin": str(cache / key)}})
            )
        result = Path(command[command.index("--result") + 1])
        result.write_text(json.dumps({"profile": profile.to_dict(), "warm_seconds": 7.0}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bk, "check_tunable", lambda engine_dir, device="cuda": None)
    monkeypatch.setattr(bk.subprocess, "run", child)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "users-cache"))
    summary = bk.tune_engine_kernels(engine_dir, progress=False)

    command, env = seen["command"], seen["env"]
    assert command[:3] == [sys.executable, "-m", "kiln.build.kernels"] and str(engine_dir) in command
    assert seen["cache_was_empty"] and env["TRITON_CACHE_DIR"] != str(tmp_path / "users-cache")
    assert env["KILN_ENGINE_KERNELS"] == "off"  # an older kernels/ must not be applied in the child
    assert str(Path(bk.__file__).resolve().parents[2]) in env["PYTHONPATH"].split(os.pathsep)
    assert not Path(env["TRITON_CACHE_DIR"]).exists()  # the temporary cache is gone
    assert (summary.num_kernels, summary.num_entries, summary.warm_seconds) == (2, 2, 7.0)
    assert summary.kernels_dir == engine_dir / "kernels" and summary.decode == profile.decode
    assert KernelProfile.load(engine_dir / "kernels") == profile
    assert sorted(p.name for p in (engine_dir / "kernels" / "triton").iterdir()) == ["K1", "K2"]

    monkeypatch.setattr(
        bk.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 3, "", "boom")
    )
    with pytest.raises(bk.KernelTuningError, match="exit status 3"):
        bk.tune_engine_kernels(engine_dir, progress=False)
    assert KernelProfile.load(engine_dir / "kernels") == profile  # the old kernels/ is kept


def test_the_sweep_picks_the_fastest_candidate_that_matches_the_builtin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tune_attention's choice, with the kernel and the GPU timer stood in for (CPU tensors, the reference
    attention): a faster candidate with a wrong result and one that fails to run cannot win."""
    pytest.importorskip("triton")
    import torch

    import kiln.kernels.tile_sweep as shapes
    import kiln.kernels.triton_attention as ta
    from kiln.kernels import reference
    from kiln.kernels.tile_sweep import tune_attention

    wrong, broken, faster = (
        AttentionConfig(16, 32, 4, 2),
        AttentionConfig(16, 128, 4, 2),
        AttentionConfig(16, 64, 2, 2),
    )

    def attention(query, k_cache, v_cache, meta, scale, config=None):
        if config == broken:
            raise RuntimeError("out of resource: shared memory")
        out = reference.paged_attention(query, k_cache, v_cache, meta, scale)
        return out + 1 if config == wrong else out

    times = {wrong: 1.0, faster: 5.0}  # per case; every other candidate 8.0 (prefill: all tie)
    monkeypatch.setattr(ta, "paged_attention", attention)
    monkeypatch.setattr(
        shapes, "graph_time_us", lambda fn, batch, scale, config, calls: times.get(config, 8.0)
    )
    result = tune_attention(
        num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device="cpu",
        max_context=64, max_tokens=32,
    )  # fmt: skip
    assert result.decode == faster
    assert result.prefill == ta.builtin_config(False, 16)  # a tie keeps the built-in choice
    by_config = {t.config: t for t in result.timings if t.kind == "decode"}
    assert by_config[faster].case_us == [5.0, 5.0, 5.0] and by_config[faster].total_us == 15.0
    assert by_config[wrong].total_us is None and "differs from the built-in" in by_config[wrong].error
    assert by_config[broken].total_us is None and "out of resource" in by_config[broken].error
    assert result.cases["decode"] == ["decode B=1", "decode B=32", "decode B=256"]
    assert len([t for t in result.timings if t.kind == "prefill"]) == 4


def test_an_fp8_cache_engine_is_swept_over_an_fp8_cache_with_its_scales(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep of an fp8-cache engine times the tiles on e4m3 caches with k_scale / v_scale, as the
    engine runs them (CPU tensors, the reference attention standing in for the kernel)."""
    pytest.importorskip("triton")
    import torch

    import kiln.kernels.tile_sweep as shapes
    import kiln.kernels.triton_attention as ta
    from kiln.kernels import reference

    seen: set[tuple] = set()

    def attention(query, k_cache, v_cache, meta, scale, config=None, k_scale=None, v_scale=None):
        seen.add((k_cache.dtype, v_cache.dtype, None if k_scale is None else k_scale.item()))
        return reference.paged_attention(
            query, k_cache, v_cache, meta, scale, k_scale=k_scale, v_scale=v_scale
        )

    monkeypatch.setattr(ta, "paged_attention", attention)
    monkeypatch.setattr(
        shapes,
        "graph_time_us",
        lambda fn, batch, scale, config, calls: (fn(*shapes.first_args(batch), scale, config=config), 1.0)[1],
    )
    result = shapes.tune_attention(
        num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device="cpu",
        max_context=64, max_tokens=32, kv_cache_dtype=torch.float8_e4m3fn,
    )  # fmt: skip
    assert seen == {(torch.float8_e4m3fn, torch.float8_e4m3fn, 1.0)}
    assert all(t.error is None for t in result.timings)


def test_the_child_tunes_before_loading_and_reports_the_profile(
    tiny_engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tune_and_warm's glue on the CPU, the GPU parts stood in for: the tuned tiles are installed before
    the engine loads (so its CUDA graphs and warm-up compile them) and come back as a loadable profile."""
    import torch

    import kiln.kernels.tile_sweep as tile_sweep
    from kiln.engine.llm_engine import LLMEngine
    from kiln.engine_dir import EngineManifest
    from kiln.kernels.tile_sweep import TuneResult
    from kiln.kernels.tiles import CandidateTiming, GpuTarget, clear_profile, tuned_config

    chosen = AttentionConfig(16, 32, 4, 2), AttentionConfig(64, 64, 4, 3)
    seen: dict[str, Any] = {}

    def sweep(**shape: Any) -> TuneResult:
        seen.update(shape)
        return TuneResult(*chosen, [CandidateTiming("decode", chosen[0], [1.0], 1.0)], {"decode": ["a"]}, 2.5)

    def from_path(path: Path, options: Any) -> Any:
        seen["installed_at_load"] = (tuned_config(True, 16), tuned_config(False, 16))
        return load(path, dataclasses.replace(options, device="cpu"))

    load = LLMEngine.from_path
    monkeypatch.setattr(
        bk, "check_tunable", lambda engine_dir, device="cuda": EngineManifest.load(engine_dir)
    )
    monkeypatch.setattr(bk, "current_target", lambda device=None: GpuTarget("GPU", (9, 0), "3.6.0"))
    monkeypatch.setattr(tile_sweep, "tune_attention", sweep)
    monkeypatch.setattr(LLMEngine, "from_path", from_path)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    try:
        data = json.loads(json.dumps(bk.tune_and_warm(tiny_engine_dir, "cuda", say=lambda line: None)))
        assert seen["installed_at_load"] == chosen
    finally:
        clear_profile()
    profile = KernelProfile.from_dict(data["profile"])
    assert (profile.decode, profile.prefill, profile.gpu_name, profile.tune_seconds) == (*chosen, "GPU", 2.5)
    assert (profile.head_dim, profile.num_kv_heads, profile.block_size, profile.dtype) == (
        16,
        2,
        16,
        "float32",
    )
    assert (seen["max_context"], seen["max_tokens"]) == (256, 64)  # the engine's limits bound the sweep
    assert seen["kv_cache_dtype"] is None and profile.kv_cache_dtype == "auto"  # a 16-bit cache
    assert data["warm_seconds"] > 0


def test_opening_an_engine_dir_prepares_its_kernels_before_the_model_loads(
    tiny_engine_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln.engine.llm_engine as llm_engine
    from kiln.config import EngineConfig

    calls: list[tuple[str, Any]] = []
    real_load = llm_engine.load_model
    monkeypatch.setattr(
        llm_engine, "prepare_engine_kernels", lambda path, device: calls.append(("prep", path, device))
    )
    monkeypatch.setattr(
        llm_engine, "load_model", lambda *a, **k: calls.append(("load",)) or real_load(*a, **k)
    )
    llm_engine.LLMEngine.from_path(tiny_engine_dir, EngineConfig(device="cpu"))
    assert calls[0] == ("prep", tiny_engine_dir, llm_engine.torch.device("cpu"))
    assert calls[1] == ("load",)
