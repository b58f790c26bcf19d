"""`kiln tune` on a real GPU: the saved profile and kernels, and a fresh process that compiles nothing.

A tiny fp16 engine (head dim 128, as in 7B models) is tuned once (kiln.build.kernels.tune_engine_kernels,
which runs in its own child process). Then a FRESH process with an EMPTY Triton cache seeds it from the
engine directory (prepare_engine_kernels), loads the engine and replays the build's warm-up steps: Triton
must report no cache miss and the cache must gain no file. The same process then compares greedy tokens
with the tuned tiles, with the built-in tiles, and with a deliberately different candidate.

Run on the GPU machine (scripts/gpu_check.sh); skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import dataclasses, gc, json, os, sys
from pathlib import Path
import torch
from triton import knobs
from kiln.build.kernels import warm_steps
from kiln.engine_dir import EngineManifest
from kiln.kernels import tiles as tuning
from kiln.kernels.tile_sweep import candidate_configs
from kiln.kernels.kernel_cache import cache_entries, prepare_engine_kernels, triton_cache_dir
from kiln.kernels.triton_attention import builtin_config
from kiln.engine.llm_engine import LLMEngine
from kiln.config import EngineConfig
from kiln.engine.sampling_params import SamplingParams

engine_dir = Path(sys.argv[1])
limits = EngineManifest.load(engine_dir).limits
options = EngineConfig(device="cuda", gpu_memory_utilization=0.3)
misses = []
knobs.compilation.listener = lambda **kw: None if kw["cache_hit"] else misses.append(kw["metadata"].get("name", "?"))

def cache_files():
    return sorted(str(f) for files in cache_entries(triton_cache_dir()).values() for f in files)

def greedy():
    engine = LLMEngine.from_path(engine_dir, options)
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 33, 100, 257)]
    ids = [engine.add_request(None, params=params, prompt_token_ids=p) for p in prompts]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.outputs[0].token_ids)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return [tokens[i] for i in ids]

prep = prepare_engine_kernels(engine_dir, "cuda")
seeded = cache_files()
engine = LLMEngine.from_path(engine_dir, options)
warm_steps(engine, max_num_tokens=limits.max_num_tokens, max_num_seqs=limits.max_batch_size)
torch.cuda.synchronize()
after = cache_files()
del engine
gc.collect()
torch.cuda.empty_cache()
result = {
    "prep": dataclasses.asdict(prep),
    "seeded": len(seeded),
    "new_files": sorted(set(after) - set(seeded)),
    "misses": sorted(set(misses)),
    "tuned": greedy(),
}
os.environ["KILN_ENGINE_KERNELS"] = "off"  # from here on, loads must not re-apply the engine's profile
profile = tuning.KernelProfile.load(engine_dir / "kernels")
tuning.clear_profile()
result["builtin"] = greedy()
other = {decode: candidate_configs(builtin_config(decode, 128), decode)[1] for decode in (True, False)}
tuning.apply_profile(dataclasses.replace(profile, decode=other[True], prefill=other[False]))
result["other"] = greedy()
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory):
    from kiln.build import build_tiny_engine
    from kiln.build.kernels import tune_engine_kernels
    from kiln.config import EngineLimits

    engine_dir = tmp_path_factory.mktemp("tuned") / "engine"
    build_tiny_engine(
        engine_dir,
        dtype="float16",
        limits=EngineLimits(max_batch_size=8, max_num_tokens=256, max_seq_len=512),
        hidden_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
    )
    return engine_dir, tune_engine_kernels(engine_dir, progress=True)


def test_tune_saves_a_profile_for_this_gpu_and_the_compiled_kernels(tuned) -> None:
    from kiln.kernels.kernel_cache import GROUP_PREFIX, cache_entries
    from kiln.kernels.tile_sweep import candidate_configs
    from kiln.kernels.tiles import KernelProfile
    from kiln.kernels.triton_attention import builtin_config

    engine_dir, summary = tuned
    profile = KernelProfile.load(engine_dir / "kernels")
    assert profile is not None
    assert profile.gpu_name == torch.cuda.get_device_name()
    assert profile.head_dim == 128 and profile.dtype == "float16"
    for kind, decode, chosen in (("decode", True, profile.decode), ("prefill", False, profile.prefill)):
        candidates = candidate_configs(builtin_config(decode, 128), decode)
        timed = [t for t in profile.timings if t.kind == kind]
        assert [t.config for t in timed] == candidates
        assert timed[0].total_us is not None and timed[0].error is None  # the built-in choice always runs
        winner = next(t for t in timed if t.config == chosen)
        finished = [t.total_us for t in timed if t.total_us is not None]
        assert winner.total_us == min(finished)
        assert len(winner.case_us) == len(profile.cases[kind]) == 3
    assert (summary.decode, summary.prefill) == (profile.decode, profile.prefill)
    entries = cache_entries(engine_dir / "kernels" / "triton")
    assert summary.num_entries == len(entries) and summary.num_kernels > 10
    groups = [f for files in entries.values() for f in files if f.name.startswith(GROUP_PREFIX)]
    assert len(groups) == summary.num_kernels
    for group in groups:  # names only: no path of the build machine's temporary cache
        assert all("/" not in p for p in json.loads(group.read_text())["child_paths"].values())
    assert sorted(p.name for p in engine_dir.iterdir() if p.name.startswith(".")) == []


def test_a_fresh_process_compiles_nothing_and_the_tiles_do_not_change_tokens(tuned, tmp_path) -> None:
    engine_dir, summary = tuned
    cache = tmp_path / "empty-triton-cache"
    # This tree first, then whatever the parent's path held (packages installed beside it, e.g. --target).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), PYTHONPATH=path)
    env.pop("KILN_ENGINE_KERNELS", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(engine_dir)], capture_output=True, text=True, env=env, timeout=500
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["prep"]["profile_applied"] is True
    assert result["prep"]["entries_copied"] == summary.num_entries and result["seeded"] > 0
    assert result["misses"] == [], "kernels compiled in a fresh process despite the seeded cache"
    assert result["new_files"] == []
    assert result["tuned"] == result["builtin"]
    assert result["other"] == result["builtin"]
