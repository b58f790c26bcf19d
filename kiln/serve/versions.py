"""`VersionRouter`: one `EngineClient` over the loaded versions of a model, routing each new request.

Rules:
- Roles: one `stable` version; at most one `canary`, given `canary_share` of new requests; `retiring`
  versions take no new requests and are unloaded by the rollout once drained (`drained`).
- Routing is by owner (the server passes its request id), so a completions request's prompts all run on
  one version, and a stream finishes on the version it started on. The canary's share is dealt exactly,
  not drawn: a credit grows by the share with each new owner and a request goes to the canary each time
  the credit reaches one (share 0.25: every fourth request).
- A canary request that fails in the engine before its first output (the request failed, or the canary
  engine died) is run again on the stable version, under the same id: the client never sees the
  canary's failure, and the canary's window counts it.
- The tokenizer, model card and health are the stable version's; the model's name is the repository's. A canary engine that dies is reported
  to `on_canary_down` (the rollout rolls it back), never taken for the server's engine being down.
- Latency samples are kept only while a canary is judged (the windows are reset as each step begins), so
  a server with no rollout running holds none.
- `stats()` sums the live versions' counts. `set_batching` (the SLO controller's) reaches every loaded
  version and each canary before its first request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.clients.messages import EngineDeadError
from kiln.clients.protocol import EngineClient
from kiln.engine.info import BatchingLimits, EngineStats, ModelInfo
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.serve.rollout_judge import LiveWindow
from kiln.serve.slo import can_set_batching
from kiln.serve.supervisor import can_restart


@dataclass(slots=True)
class ServedVersion:
    number: int
    path: Path
    engine: EngineClient
    role: str = "loading"  # loading, checking, canary, stable, retiring
    in_flight: int = 0
    window: LiveWindow = field(default_factory=LiveWindow)
    finished: int = 0  # requests finished on it, over its life
    failed: int = 0


def version_of(engine: EngineClient, owner: str) -> int | None:
    """The version serving `owner`'s requests when `engine` routes between versions, else None."""
    route = getattr(engine, "route_of", None)
    return route(owner) if route is not None else None


class VersionRouter:
    def __init__(self, stable: ServedVersion, model_name: str | None = None) -> None:
        stable.role = "stable"
        self.model_name = model_name  # the name every version serves under (None: the stable engine's)
        self._info: tuple[ModelInfo, ModelInfo] | None = None  # (the stable engine's, as served)
        self.stable = stable
        self.canary: ServedVersion | None = None
        self.canary_share = 0.0
        self.retiring: list[ServedVersion] = []
        self.on_canary_down: Callable[[str], None] | None = None
        self.on_request_end: Callable[[ServedVersion, str], None] | None = None  # (version, outcome)
        self._batching: BatchingLimits | None = None  # the SLO controller's latest limits
        self._credit = 0.0
        self._owners: dict[str, tuple[ServedVersion, int]] = {}  # owner -> (version, its live requests)
        self._requests: dict[str, ServedVersion] = {}  # request id -> the version running it

    # --- the versions ------------------------------------------------------------------------------
    @property
    def live(self) -> list[ServedVersion]:
        return [self.stable, *([self.canary] if self.canary else []), *self.retiring]

    def set_canary(self, version: ServedVersion | None, share: float) -> None:
        if version is not None:
            version.role = "canary"
        self.canary, self.canary_share = version, share if version is not None else 0.0
        self._credit = 0.0

    def promote(self) -> ServedVersion:
        """The canary becomes the stable version; the old stable one retires. Returns the old one."""
        assert self.canary is not None
        old, self.stable = self.stable, self.canary
        self.stable.role = "stable"
        self.set_canary(None, 0.0)
        self._retire(old)
        return old

    def withdraw_canary(self) -> ServedVersion | None:
        """The canary takes no more new requests and retires; returns it."""
        canary = self.canary
        self.set_canary(None, 0.0)
        if canary is not None:
            self._retire(canary)
        return canary

    def _retire(self, version: ServedVersion) -> None:
        version.role = "retiring"
        self.retiring.append(version)

    def drained(self, version: ServedVersion) -> bool:
        return version.in_flight == 0

    def forget(self, version: ServedVersion) -> None:
        """Drop a retired version (after it was unloaded)."""
        self.retiring = [v for v in self.retiring if v is not version]

    def route_of(self, owner: str) -> int | None:
        entry = self._owners.get(owner)
        return entry[0].number if entry is not None else None

    def _route(self, owner: str) -> ServedVersion:
        entry = self._owners.get(owner)
        if entry is not None:
            self._owners[owner] = (entry[0], entry[1] + 1)
            return entry[0]
        version = self.stable
        if self.canary is not None and self.canary_share > 0:
            self._credit += self.canary_share
            if self._credit >= 1.0 - 1e-9:
                self._credit -= 1.0
                version = self.canary
        self._owners[owner] = (version, 1)
        return version

    def _release(self, owner: str) -> None:
        version, count = self._owners[owner]
        if count > 1:
            self._owners[owner] = (version, count - 1)
        else:
            del self._owners[owner]

    # --- EngineClient ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.stable.engine.tokenizer

    @property
    def model_info(self) -> ModelInfo:
        info = self.stable.engine.model_info
        if self.model_name is None:
            return info
        if self._info is None or self._info[0] is not info:
            self._info = (info, dataclasses.replace(info, name=self.model_name))
        return self._info[1]

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        prompt: str | None = None,
        priority: int = 0,
        owner: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        owner = owner if owner is not None else request_id
        version = self._route(owner)  # now, not at the first output: the response names its version
        return self._run(version, owner, prompt_token_ids, params, request_id, prompt, priority)

    async def _run(
        self,
        version: ServedVersion,
        owner: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None,
        priority: int,
    ) -> AsyncIterator[RequestOutput]:
        def submit(target: ServedVersion) -> AsyncIterator[RequestOutput]:
            self._requests[request_id] = target
            return target.engine.generate(
                prompt_token_ids, params, request_id, prompt=prompt, priority=priority, owner=owner
            )

        version.in_flight += 1
        outcome = "error"
        produced = False
        try:
            try:
                async for out in self._measured(version, submit(version)):
                    produced = True
                    yield out
                outcome = "ok"
            except ValueError:
                outcome = "refused"  # the request's fault, not the version's
                raise
            except RuntimeError:  # RequestFailedError, EngineDeadError: the version failed this request
                if version is self.stable or produced:
                    raise
                outcome = "retried"
                self._owners[owner] = (self.stable, self._owners[owner][1])  # route_of names who answers
                async for out in self._measured(self.stable, submit(self.stable)):
                    yield out
        finally:
            version.in_flight -= 1
            self._requests.pop(request_id, None)
            self._release(owner)
            if outcome != "refused":
                version.window.finish(ok=outcome == "ok")
                version.finished += 1
                version.failed += outcome != "ok"
            if self.on_request_end is not None:
                self.on_request_end(version, outcome)

    async def _measured(
        self, version: ServedVersion, stream: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        """`stream`'s outputs, timed into `version`'s window; closing this closes (aborts) `stream`."""
        began = previous = time.monotonic()
        first = True
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for out in stream:
                now = time.monotonic()
                if self.canary is not None:  # samples only while a canary is judged: no growth otherwise
                    tokens = sum(len(c.token_ids) for c in out.outputs)
                    version.window.observe_output(now - began if first else None, now - previous, tokens)
                first, previous = False, now
                yield out

    async def abort(self, request_id: str) -> None:
        version = self._requests.get(request_id)
        for target in [version] if version is not None else self.live:
            await target.engine.abort(request_id)

    def stats(self) -> EngineStats:
        """The stable version's stats with the other live versions' counts added (what is not a count,
        such as its batching limits, is the stable version's)."""
        total = dataclasses.replace(self.stable.engine.stats())
        for version in self.live[1:]:
            other = version.engine.stats()
            for f in dataclasses.fields(EngineStats):
                mine = getattr(total, f.name)
                if isinstance(mine, int | float) and not isinstance(mine, bool):
                    setattr(total, f.name, mine + getattr(other, f.name))
        return total

    async def check_health(self, timeout: float) -> None:
        canary = self.canary
        if canary is not None:
            try:
                await canary.engine.check_health(timeout)
            except EngineDeadError as exc:
                if self.on_canary_down is not None and self.canary is canary:
                    self.on_canary_down(str(exc))
        await self.stable.engine.check_health(timeout)

    async def set_batching(self, limits: BatchingLimits) -> None:
        """The SLO controller's batching limits, for every loaded version and each new one
        (`apply_batching`): a canary is judged against the stable version under the same limits."""
        self._batching = limits
        for version in self.live:
            await self.apply_batching(version)

    async def apply_batching(self, version: ServedVersion) -> None:
        """Give `version` the limits in force, if any were set and its engine can take them."""
        if self._batching is not None and can_set_batching(version.engine):
            await version.engine.set_batching(self._batching)  # type: ignore[attr-defined]

    @property
    def can_set_batching(self) -> bool:
        return can_set_batching(self.stable.engine)

    async def restart(self) -> None:
        await self.stable.engine.restart()  # type: ignore[attr-defined]

    @property
    def can_restart(self) -> bool:
        return can_restart(self.stable.engine)

    async def start(self) -> None:
        await self.stable.engine.start()

    async def shutdown(self) -> None:
        for version in self.live:
            await version.engine.shutdown()
