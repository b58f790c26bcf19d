"""Profiles of the native engine for `kiln bench --profile`: a run of steps, and one prompt to its first token;
`PhaseClock`, the host's time per engine phase without a profiler's overhead."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.bench.workload import greedy, random_prompts, sync


def profile_steps(
    engine,
    num_requests: int,
    input_len: int,
    output_len: int,
    num_steps: int,
    path: Path,
    seed: int = 0,
    after_steps: int = 3,
) -> dict[str, float]:
    """Profile `num_steps` engine steps of a throughput-shaped run, begun after `after_steps` unprofiled
    steps (3: past the first prefill-heavy steps; more to profile decode deep into long sequences);
    writes a text report to `path`.

    The report says how much of each step's wall time the GPU was busy (the rest is host work the
    GPU waits for), the host time of each engine phase, the running sequences and their mean length
    when profiling began, and the top kernels. Returns the summary.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(name, fn):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return wrapper

    # Label the phases on this engine instance only (the profile needs names, the engine has none).
    engine.scheduler.schedule = labelled("phase: schedule", engine.scheduler.schedule)
    engine.scheduler.update = labelled("phase: scheduler.update", engine.scheduler.update)
    engine.runner.prepare_inputs = labelled("phase: prepare_inputs", engine.runner.prepare_inputs)
    engine.runner.model.forward = labelled("phase: model.forward", engine.runner.model.forward)
    engine.runner.sampler.__class__.__call__ = labelled(
        "phase: sampler", engine.runner.sampler.__class__.__call__
    )
    engine.outputs.process = labelled("phase: outputs.process", engine.outputs.process)
    vocab = engine.model_config.vocab_size
    for i, prompt in enumerate(random_prompts(num_requests, [input_len] * num_requests, vocab, seed)):
        engine.add_request(f"p{i}", prompt_token_ids=prompt, params=greedy(output_len))
    for _ in range(after_steps):
        engine.step()
    sync(engine)
    running = len(engine.scheduler.running)
    context = sum(r.num_tokens for r in engine.scheduler.running) / running if running else 0.0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        sync(engine)
        wall = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if _is_device_work(e))
    phases: dict[str, float] = {}
    for e in events:  # a label appears twice: its host range and its (host-time-free) GPU range
        if e.key.startswith("phase: "):
            phases[e.key] = max(phases.get(e.key, 0.0), e.cpu_time_total / 1000 / num_steps)
    summary = {
        "step_ms": 1000 * wall / num_steps,
        "gpu_busy_ms_per_step": gpu_us / 1000 / num_steps,
        "running_at_start": float(running),
        "mean_tokens_at_start": context,
    }
    lines = [
        f"{num_steps} steps, {num_requests} requests of {input_len} in / {output_len} out, after {after_steps} steps",
        f"at the start: {running} running, {context:.1f} tokens each on average",
        f"wall per step: {summary['step_ms']:.2f} ms; GPU kernels per step: {summary['gpu_busy_ms_per_step']:.2f} ms",
        "host time per step by phase (ms, inclusive):",
        *(f"  {name[7:]:24s} {ms:8.2f}" for name, ms in sorted(phases.items(), key=lambda kv: -kv[1])),
        "",
        events.table(sort_by="self_device_time_total", row_limit=25),
        events.table(sort_by="self_cpu_time_total", row_limit=25),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return summary | {f"host_ms_{k[7:]}": v for k, v in phases.items()}


def profile_first_token(engine, input_len: int, path: Path, seed: int = 0) -> dict[str, float]:
    """Profile one prompt from add_request to its first token on an idle engine (after a warm-up);
    writes the host and GPU op tables to `path`. Returns wall and GPU-busy milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    vocab = engine.model_config.vocab_size
    prompts = random_prompts(2, [input_len] * 2, vocab, seed + 99)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    for i, prompt in enumerate(prompts):  # the first one warms up
        sync(engine)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            engine.add_request(f"ttft{i}", prompt_token_ids=prompt, params=greedy(1))
            while engine.has_unfinished_requests():
                engine.step()
            wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if _is_device_work(e))
    summary = {"wall_ms": 1000 * wall, "gpu_busy_ms": gpu_us / 1000}
    lines = [
        f"one prompt of {input_len} tokens, add_request -> first token: wall {summary['wall_ms']:.2f} ms, "
        f"GPU kernels {summary['gpu_busy_ms']:.2f} ms",
        events.table(sort_by="self_cpu_time_total", row_limit=30),
        events.table(sort_by="self_device_time_total", row_limit=20),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return summary


def _is_device_work(event) -> bool:
    """Kernels, copies and memsets: the events whose own time is GPU time. CPU ops (aten::mm) also
    carry their kernels' time, and a record_function label has a GPU range spanning its kernels;
    counting either would count those kernels twice."""
    from torch.autograd import DeviceType

    return getattr(event, "device_type", None) == DeviceType.CUDA and not event.key.startswith("phase: ")


# (label, owner attribute of the engine or "" for the engine itself, method). Nested phases count in their
# callers too: `settle_masks` inside `launch`, `collect` and `advance_matchers` inside `collect_step`.
PHASES: tuple[tuple[str, str, str], ...] = (
    ("step", "", "step"),
    ("schedule", "scheduler", "schedule"),
    ("prepare_inputs", "runner", "host_inputs"),
    ("launch_forward", "runner", "launch_forward_host"),
    ("launch", "runner", "launch"),
    ("settle_masks", "runner", "settle_masks"),
    ("collect_step", "", "_collect_step"),
    ("collect", "runner", "collect"),
    ("advance_matchers", "", "_advance_matchers"),
    ("start_masks", "runner", "start_masks"),
    ("process_outputs", "outputs", "process"),
)


class PhaseClock:
    """Wall time of the engine's host phases, summed per phase while installed on one engine.

    Rule: a phase is an engine method (PHASES), shadowed on the instance by a timed wrapper between
    `install` and `remove`, so the engine's code is unchanged and the cost is two clock reads a call.
    `collect` is the host waiting for the GPU's tokens: time there means the GPU, not the host, set the
    pace of the step."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.seconds: dict[str, float] = {label: 0.0 for label, _, _ in PHASES}
        self.calls: dict[str, int] = {label: 0 for label, _, _ in PHASES}
        self._installed: list[tuple[Any, str]] = []

    def install(self) -> PhaseClock:
        for label, owner, name in PHASES:
            target = getattr(self.engine, owner) if owner else self.engine
            setattr(target, name, self._timed(label, getattr(target, name)))
            self._installed.append((target, name))
        return self

    def remove(self) -> None:
        for target, name in self._installed:
            delattr(target, name)  # the class's method shows through again
        self._installed.clear()

    def __enter__(self) -> PhaseClock:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _timed(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        return timed

    def per_step_ms(self) -> dict[str, float]:
        """Milliseconds per engine step of each phase that ran (the steps: calls of `step`)."""
        steps = max(self.calls["step"], 1)
        return {label: round(1e3 * s / steps, 3) for label, s in self.seconds.items() if self.calls[label]}
