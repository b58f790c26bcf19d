"""kiln.bench.profile.PhaseClock: host time per engine phase, installed on one engine and removed cleanly."""

from __future__ import annotations

from pathlib import Path

from kiln.bench.profile import PHASES, PhaseClock
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams


def test_phases_are_timed_while_installed_and_gone_after(tiny_gqa_dir: Path) -> None:
    engine = LLMEngine.from_path(tiny_gqa_dir, config=EngineConfig(device="cpu"))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    with PhaseClock(engine) as clock:
        assert "step" in vars(engine) and "schedule" in vars(engine.scheduler)
        for i in range(3):
            engine.add_request(f"r{i}", prompt_token_ids=[5, 6, 7, 8], params=params)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    # Removed: the class's own methods show through again, and a later step counts nowhere.
    assert "step" not in vars(engine) and "schedule" not in vars(engine.scheduler)
    engine.add_request("after", prompt_token_ids=[5, 6], params=params)
    while engine.has_unfinished_requests():
        engine.step()
    assert clock.calls["step"] == steps == clock.calls["schedule"]
    per_step = clock.per_step_ms()
    assert set(per_step) <= {label for label, _, _ in PHASES}
    assert {"step", "schedule", "prepare_inputs", "collect", "process_outputs"} <= set(per_step)
    # Phases run inside the step: none took longer than the steps themselves.
    assert all(0 <= ms <= per_step["step"] for ms in per_step.values())
    assert "start_masks" not in per_step  # no structured request: no masks were begun
