"""`Rollout`: the control plane of a model repository — finds new versions and rolls them out, or back.

The state machine of one candidate version (docs/operations.md draws it):

    loading ──▶ checking ──▶ canary 1 ─▶ ... ─▶ canary k ──▶ promoted      (old stable: retiring ─▶ unloaded)
       │           │             │                 │
       └─ failed ◀─┘             └──── rolled_back ┘                    (canary: retiring ─▶ unloaded)

Rules:
- A candidate is a valid version above the stable one that was never failed or rolled back (polling
  every `repository_poll_seconds`), or any version the admin API loads. One rollout at a time.
- loading: the version's engine is opened and started beside the stable one. On one GPU each version's
  engine gets half of `gpu_memory_utilization` (kiln serve sets that up), so two fit; one that does not
  fails to load with the reason, and nothing else changes.
- checking: same tokenizer files as the stable version (requests are tokenized before they are routed),
  a smoke generation, and the golden prompts if any (`golden_prompts`).
- canary: step i gives it `canary_steps[i]` of new requests, for at least `canary_step_seconds` and
  `canary_min_requests` of its own; `kiln.serve.rollout_judge.judge` decides each tick. Every step
  passed: promoted. A bad verdict, a canary engine that dies, or the admin API: rolled back.
- Retiring versions take no new requests; each is unloaded once its requests have finished.
- Every transition is logged, kept in `history` and counted in the metrics (kiln.serve.rollout_metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kiln.clients.protocol import EngineClient
from kiln.config import EngineConfig
from kiln.serve.golden import GoldenPrompt, check_version, read_golden_prompts
from kiln.serve.repository import ModelRepository
from kiln.serve.rollout_judge import CanaryPolicy, judge
from kiln.serve.rollout_metrics import RolloutMetrics
from kiln.serve.settings import ServerSettings
from kiln.serve.versions import ServedVersion, VersionRouter

logger = logging.getLogger("kiln.rollout")

TICK_SECONDS = 0.1  # how often a running step is judged and admin requests are looked at


@dataclass(frozen=True, slots=True)
class Transition:
    at: str  # UTC, ISO 8601
    version: int
    state: str  # loading, checking, canary, promoted, failed, rolled_back, unloaded
    detail: str


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    steps: tuple[float, ...]
    step_seconds: float
    policy: CanaryPolicy
    poll_seconds: float
    golden: tuple[GoldenPrompt, ...] = ()


def plan_from_settings(settings: ServerSettings) -> RolloutPlan:
    """The rollout plan `kiln serve --repository` runs (ValueError: an unreadable golden-prompts file)."""
    golden = read_golden_prompts(settings.golden_prompts) if settings.golden_prompts else ()
    policy = CanaryPolicy(
        min_requests=settings.canary_min_requests,
        max_error_rate=settings.canary_max_error_rate,
        max_latency_ratio=settings.canary_max_latency_ratio,
    )
    return RolloutPlan(
        steps=tuple(settings.canary_steps),
        step_seconds=settings.canary_step_seconds,
        policy=policy,
        poll_seconds=settings.repository_poll_seconds,
        golden=golden,
    )


def version_engine_config(config: EngineConfig) -> EngineConfig:
    """Each version's engine config: half of the GPU memory budget, so a candidate fits beside the stable
    version (unless the KV cache's size is given in bytes, which then holds for each version)."""
    if config.kv_cache_memory_bytes is not None:
        return config
    return dataclasses.replace(config, gpu_memory_utilization=config.gpu_memory_utilization / 2)


class RolloutBusyError(RuntimeError):
    """A rollout is already running (the admin API answers 409)."""


class Rollout:
    def __init__(
        self,
        repository: ModelRepository,
        plan: RolloutPlan,
        open_version: Callable[[Path], EngineClient],
    ) -> None:
        self.repository = repository
        self.plan = plan
        self._open = open_version
        first = repository.latest()
        assert first.number is not None
        stable = ServedVersion(first.number, first.path, open_version(first.path))
        self.router = VersionRouter(stable, model_name=repository.model)
        self.router.on_canary_down = lambda why: self.request(
            "rollback", "engine_down", f"its engine is down: {why}"
        )
        self.metrics = RolloutMetrics(self)
        self.router.on_request_end = self.metrics.request_ended
        self.state = "idle"  # or the candidate's state
        self.step: int | None = None  # the canary step running, from 0
        self.rejected: set[int] = set()  # failed or rolled back: never picked by polling again
        self.history: deque[Transition] = deque(maxlen=200)
        self._task: asyncio.Task[None] | None = None
        self._asked: tuple[str, str, str] | None = None  # (action, reason, detail): see `request`
        self.rolling_out: int | None = None  # the version of the latest rollout (running while `busy`)
        self._wake = asyncio.Event()
        self._unloading: set[asyncio.Task[None]] = set()

    @property
    def candidate(self) -> ServedVersion | None:
        return self.router.canary

    # --- what the admin API and polling call --------------------------------------------------------
    def load(self, number: int) -> None:
        """Roll out version `number` (RolloutBusyError while another rollout runs; KeyError: no such
        version; ValueError: it is not a valid engine or is the stable one)."""
        if self._task is not None and not self._task.done():
            raise RolloutBusyError(
                f"version {self.rolling_out} is being rolled out; promote or roll it back first"
            )
        entry = self.repository.version(number)
        if not entry.valid:
            raise ValueError(f"version {number} is not a valid engine: {entry.problem}")
        if number == self.router.stable.number:
            raise ValueError(f"version {number} is already the stable version")
        self.rolling_out = number
        self._asked = None
        self._task = asyncio.ensure_future(self._roll_out(number, entry.path))

    def request(self, action: str, reason: str, detail: str) -> None:
        """Ask the running rollout to "promote" its canary now (skipping the steps left) or "rollback" it,
        at its next tick; `reason` labels the rollback metric, `detail` goes to the log and history."""
        self._asked = (action, reason, detail)
        self._wake.set()

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self) -> None:
        """Poll the repository until cancelled (not at all with `poll_seconds` 0)."""
        if self.plan.poll_seconds <= 0:
            return
        while True:
            await asyncio.sleep(self.plan.poll_seconds)
            if self.busy:
                continue
            newer = [n for n in self.repository.valid_versions() if n > self.router.stable.number]
            fresh = [n for n in newer if n not in self.rejected]
            if fresh:
                self.load(fresh[-1])

    async def close(self) -> None:
        for task in [self._task, *self._unloading]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # --- one rollout ---------------------------------------------------------------------------------
    def _transition(self, version: int, state: str, detail: str = "") -> None:
        self.history.append(
            Transition(datetime.now(UTC).isoformat(timespec="seconds"), version, state, detail)
        )
        self.metrics.transition(state)
        if state in ("loading", "checking", "canary"):
            self.state = state
        else:
            self.state, self.step = "idle", None
        log = logger.warning if state in ("failed", "rolled_back") else logger.info
        log("version %d: %s%s", version, state.replace("_", " "), f" ({detail})" if detail else "")

    async def _roll_out(self, number: int, path: Path) -> None:
        self._transition(number, "loading", str(path))
        engine: EngineClient | None = None
        try:
            engine = await asyncio.to_thread(self._open, path)
            await engine.start()
        except asyncio.CancelledError:  # the server stops while the version loads
            if engine is not None:
                await engine.shutdown()
            raise
        except Exception as exc:
            self._fail(number, f"could not load beside version {self.router.stable.number}: {exc}", engine)
            return
        version = ServedVersion(number, path, engine, role="checking")
        self._transition(number, "checking")
        try:
            await check_version(version, self.router.stable, self.plan.golden)
        except Exception as exc:
            self._fail(number, f"check failed: {exc}", engine)
            return
        await self.router.apply_batching(version)
        for step, share in enumerate(self.plan.steps):
            self.step = step
            self.router.set_canary(version, share)
            version.window.reset()
            self.router.stable.window.reset()
            steps = len(self.plan.steps)
            self._transition(number, "canary", f"step {step + 1} of {steps}: {share:.0%} of new requests")
            action, reason, detail = await self._run_step(version)
            if action == "rollback":
                self.rejected.add(number)
                self.metrics.rolled_back(reason)
                self._retire(self.router.withdraw_canary())
                self._transition(number, "rolled_back", detail)
                return
            if action == "promote":
                break
        old = self.router.promote()
        self.metrics.promoted()
        self._transition(number, "promoted", f"version {old.number} retires")
        self._retire(old)

    async def _run_step(self, version: ServedVersion) -> tuple[str, str, str]:
        """Wait for the step's end: ("pass", ...), ("promote", ...) from the admin API, or ("rollback",
        reason, detail)."""
        began = time.monotonic()
        while True:
            if self._asked is not None:
                (action, reason, detail), self._asked = self._asked, None
                return action, reason, detail
            time_is_up = time.monotonic() - began >= self.plan.step_seconds
            canary, stable = version.window.summary(), self.router.stable.window.summary()
            verdict = judge(canary, stable, self.plan.policy, time_is_up)
            if verdict.action != "wait":
                return verdict.action, verdict.reason, verdict.detail
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)

    def _fail(self, number: int, why: str, engine: EngineClient | None) -> None:
        self.rejected.add(number)
        self.metrics.rolled_back("load_failed" if why.startswith("could not load") else "check_failed")
        self._transition(number, "failed", why)
        if engine is not None:
            self._spawn(engine.shutdown())

    def _retire(self, version: ServedVersion | None) -> None:
        if version is not None:
            self._spawn(self._unload_when_drained(version))

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    async def _unload_when_drained(self, version: ServedVersion) -> None:
        while not self.router.drained(version):
            await asyncio.sleep(TICK_SECONDS)
        await version.engine.shutdown()
        self.router.forget(version)
        self._transition(version.number, "unloaded")
