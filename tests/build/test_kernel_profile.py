"""The tuned-kernel profile (kiln.kernels.tiles) and the `kiln build --tune-kernels` / `kiln tune` CLI.

What needs a GPU (the sweep, the warm-up, a fresh process compiling nothing) is in
tests/gpu/test_kernel_tuning.py; here: the profile's round trip, when it is applied, what it changes,
the sweep's candidates and cases, and the CLI's refusals.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import kiln.cli
from kiln.kernels.tile_sweep import candidate_configs
from kiln.kernels.tiles import (
    AttentionConfig,
    CandidateTiming,
    GpuTarget,
    KernelProfile,
    apply_profile,
    clear_profile,
    tuned_config,
)

runner = CliRunner()
H100 = GpuTarget("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0")


def make_profile(**changes: Any) -> KernelProfile:
    profile = KernelProfile(
        gpu_name=H100.name,
        compute_capability=H100.compute_capability,
        triton_version=H100.triton_version,
        torch_version="2.11.0+cu128",
        kiln_version="0.1.0",
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype="bfloat16",
        decode=AttentionConfig(16, 32, 4, 2),
        prefill=AttentionConfig(64, 64, 4, 3, keys_transposed=True),
        timings=[
            CandidateTiming("decode", AttentionConfig(16, 64, 4, 2), [10.5, 80.0, 900.25], 990.75),
            CandidateTiming("decode", AttentionConfig(16, 32, 4, 2), [10.0, 79.0, 899.0], 988.0),
            CandidateTiming("prefill", AttentionConfig(128, 64, 8, 3), error="OutOfResources: shared memory"),
        ],
        cases={"decode": ["decode B=1", "decode B=32", "decode B=256"], "prefill": ["prefill 2048"]},
        tune_seconds=21.5,
    )
    return dataclasses.replace(profile, **changes)


@pytest.fixture(autouse=True)
def no_profile() -> Iterator[None]:
    clear_profile()
    yield
    clear_profile()


def test_profile_round_trip(tmp_path: Path) -> None:
    profile = make_profile()
    path = profile.save(tmp_path)
    assert path == tmp_path / "profile.json"
    loaded = KernelProfile.load(tmp_path)
    assert loaded == profile
    assert loaded.compute_capability == (9, 0) and loaded.prefill.keys_transposed is True


def test_missing_unreadable_or_newer_profiles_load_as_none(tmp_path: Path, caplog) -> None:
    assert KernelProfile.load(tmp_path) is None
    (tmp_path / "profile.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert KernelProfile.load(tmp_path) is None
    assert "ignoring" in caplog.text
    make_profile(format=99).save(tmp_path)
    assert KernelProfile.load(tmp_path) is None


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (dataclasses.replace(H100, name="NVIDIA A100-SXM4-80GB"), "this GPU is 'NVIDIA A100-SXM4-80GB'"),
        (dataclasses.replace(H100, compute_capability=(8, 9)), "compute capability"),
        (dataclasses.replace(H100, triton_version="3.5.1"), "this is Triton 3.5.1"),
    ],
)
def test_a_profile_from_another_gpu_or_triton_is_not_applied(target: GpuTarget, reason: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kiln.kernels.tiles"):
        assert apply_profile(make_profile(), target) is False
    assert tuned_config(True, 128) is None and tuned_config(False, 128) is None
    assert "not applying the tuned kernel profile" in caplog.text and reason in caplog.text


def test_a_matching_profile_is_installed_for_its_head_size_only() -> None:
    profile = make_profile()
    assert apply_profile(profile, H100) is True
    assert tuned_config(True, 128) == profile.decode
    assert tuned_config(False, 128) == profile.prefill
    assert tuned_config(True, 64) is None
    clear_profile()
    assert tuned_config(True, 128) is None


def test_apply_profile_changes_default_config_and_the_builtin_stays_the_fallback() -> None:
    pytest.importorskip("triton")
    from kiln.kernels.triton_attention import builtin_config, decode_context_bounds, default_config

    builtin = {decode: builtin_config(decode, 128) for decode in (True, False)}
    assert default_config(True, 128) == builtin[True] == AttentionConfig(16, 64, 4, 2)
    assert default_config(False, 128) == builtin[False] == AttentionConfig(128, 64, 4, 3)
    # decode over an fp8 cache: five stages, which double-buffer its K/V tiles (attention_plan.builtin_config),
    # except where every context is short: a small tile that keeps more programs on each SM
    long_fp8 = AttentionConfig(16, 64, 4, 5)
    assert default_config(True, 128, fp8_cache=True) == long_fp8
    assert default_config(True, 128, fp8_cache=True, max_seq_len=513) == long_fp8
    assert default_config(True, 128, fp8_cache=True, max_seq_len=512) == AttentionConfig(16, 32, 2, 2)
    assert default_config(True, 128, max_seq_len=100) == builtin[True]  # a 16-bit cache: one tile
    assert default_config(False, 128, fp8_cache=True, max_seq_len=100) == builtin[False]
    assert decode_context_bounds(128, fp8_cache=True) == (512,)
    assert decode_context_bounds(128, fp8_cache=False) == decode_context_bounds(256, fp8_cache=True) == ()
    profile = make_profile(head_dim=96)  # tuned by its power-of-two size, as the kernel pads it
    apply_profile(profile, H100)
    assert default_config(True, 128) == profile.decode != builtin[True]
    assert default_config(False, 128) == profile.prefill != builtin[False]
    assert default_config(True, 256) == builtin_config(True, 256)  # another head size: untouched
    # a tuned decode tile serves every length: no length classes
    assert default_config(True, 128, fp8_cache=True, max_seq_len=100) == profile.decode
    assert decode_context_bounds(128, fp8_cache=True) == ()
    clear_profile()
    assert default_config(True, 128) == builtin[True] and default_config(False, 128) == builtin[False]


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("head_dim_p2", [64, 128, 256])
def test_candidates_start_with_the_builtin_choice_and_are_few(decode: bool, head_dim_p2: int) -> None:
    pytest.importorskip("triton")
    from kiln.kernels.triton_attention import builtin_config

    default = builtin_config(decode, head_dim_p2)
    candidates = candidate_configs(default, decode)
    assert candidates[0] == default
    assert len(candidates) == len(set(candidates)) == 4
    for c in candidates:
        assert c.block_n >= 16 and c.block_m >= 16 and c.num_warps >= 1 and c.num_stages >= 1


def test_tuning_cases_fit_the_context_and_token_budget() -> None:
    from kiln.kernels.tile_sweep import tuning_cases

    decode = tuning_cases(True, max_context=512, max_tokens=256)
    assert [len(q) for _, q, _ in decode] == [1, 32, 256]
    for _, q_lens, ctx_lens in decode:
        assert set(q_lens) == {1} and max(ctx_lens) + 1 == 512 and min(ctx_lens) + 1 >= 256
    for _, q_lens, ctx_lens in tuning_cases(False, max_context=512, max_tokens=256):
        assert sum(q_lens) <= 256
        assert all(q + c <= 512 for q, c in zip(q_lens, ctx_lens, strict=True))


def test_tuning_batches_give_each_replica_its_own_blocks() -> None:
    import torch

    from kiln.kernels import reference
    from kiln.kernels.tile_sweep import first_args, paged_batch, rel_error

    batch = paged_batch(
        [1, 1, 1],
        [40, 7, 70],
        copies=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        dtype=torch.float32,
        generator=torch.Generator().manual_seed(0),
    )
    _, _, replicas = batch
    owned = [
        {int(b) for row, n in zip(meta.block_tables, [3, 1, 5], strict=True) for b in row[:n]}
        for _, meta in replicas
    ]
    assert all(0 not in blocks and len(blocks) == 9 for blocks in owned)
    assert not (owned[0] & owned[1]) and not (owned[1] & owned[2]) and not (owned[0] & owned[2])
    out = reference.paged_attention(*first_args(batch), 0.25)
    assert out.shape == (3, 4, 16) and rel_error(out, out) == 0.0


# -- CLI ------------------------------------------------------------------------------------------------


def said(result: Any) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def test_build_tune_kernels_without_a_gpu_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kiln.cli, "_cuda_available", lambda: False)
    out = tmp_path / "engine"
    result = runner.invoke(kiln.cli.app, ["build", "--tiny", "-o", str(out), "--tune-kernels"])
    assert result.exit_code == 2
    assert "--tune-kernels needs a CUDA GPU" in said(result) and "kiln tune ENGINE_DIR" in said(result)
    assert not out.exists()
    result = runner.invoke(
        kiln.cli.app, ["build", "org/model", "-o", str(out), "--backend", "trtllm", "--tune-kernels"]
    )
    assert result.exit_code == 2 and "native backend" in said(result)


def test_build_tunes_by_default_only_where_a_gpu_is_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln.build.kernels

    tuned: list[Path] = []

    def fake_tune(engine_dir: Path, *, device: str = "cuda", progress: bool = True) -> Any:
        tuned.append(Path(engine_dir))
        config = AttentionConfig(16, 64, 4, 2)
        return kiln.build.kernels.TuneSummary(
            Path(engine_dir) / "kernels", 1.0, 0.5, 0.5, 3, 5, config, config
        )

    monkeypatch.setattr(kiln.build.kernels, "tune_engine_kernels", fake_tune)
    for gpu, flags, expect_tuned in [
        (False, [], False),
        (True, [], True),
        (True, ["--no-tune-kernels"], False),
    ]:
        monkeypatch.setattr(kiln.cli, "_cuda_available", lambda gpu=gpu: gpu)
        out = tmp_path / f"engine-{gpu}-{len(flags)}"
        result = runner.invoke(
            kiln.cli.app, ["build", "--tiny", "-o", str(out), "--max-seq-len", "64", *flags]
        )
        assert result.exit_code == 0, result.output
        assert (out in tuned) == expect_tuned
        assert ("Saved 3 compiled kernels" in said(result)) == expect_tuned


def test_tune_refuses_a_missing_or_trtllm_engine_and_a_machine_without_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from kiln.build import build_tiny_engine
    from kiln.config import EngineLimits
    from kiln.engine_dir import EngineManifest

    result = runner.invoke(kiln.cli.app, ["tune", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in said(result)

    trt = tmp_path / "trt"
    native = tmp_path / "native"
    manifest = build_tiny_engine(native, limits=EngineLimits(max_seq_len=64))
    (trt / "trtllm").mkdir(parents=True)
    (trt / "trtllm" / "rank0.engine").write_bytes(b"plan")
    engine_files = {"trtllm/rank0.engine": "0" * 64}
    dataclasses.replace(
        manifest, backend="trtllm", weight_files=engine_files, tokenizer_files=[], file_sizes={}
    ).save(trt)
    result = runner.invoke(kiln.cli.app, ["tune", str(trt)])
    assert result.exit_code == 1 and "'trtllm' engine" in said(result)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(kiln.cli.app, ["tune", str(native)])
    assert result.exit_code == 2 and "needs a CUDA GPU" in said(result)
    assert EngineManifest.load(native) and not (native / "kernels").exists()
