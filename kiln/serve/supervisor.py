"""`supervise`: the front end's watch over its engine, so a dead or stuck engine is never invisible.

Rules:
- Every `engine_check_interval_seconds` the engine is asked to answer (`EngineClient.check_health`, at
  most `engine_check_timeout_seconds`). An engine that died or did not answer is *down*: `/ready` says
  503 at once, new requests get 503, and every request in flight ends with a 503 error (on a stream: an
  error event, then `[DONE]`), never a hang.
- An engine that can be replaced (`restart`, as `ProcessEngine` can) is restarted after a backoff of
  1, 2, 4 ... seconds (at most 30), at most `max_engine_restarts` times over the server's life; each
  restart counts in `kiln_engine_restarts_total`. Past that (or with nothing to restart), `/health` fails
  too and the server exits with an error, so the orchestrator replaces it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kiln.clients.messages import EngineDeadError
from kiln.clients.protocol import EngineClient
from kiln.serve.errors import UnavailableError
from kiln.serve.state import ServerState

logger = logging.getLogger("kiln.serve")

MAX_BACKOFF_SECONDS = 30.0


def can_restart(engine: EngineClient) -> bool:
    explicit = getattr(engine, "can_restart", None)
    return bool(explicit) if explicit is not None else hasattr(engine, "restart")


async def supervise(state: ServerState, on_fatal: Callable[[BaseException], None]) -> None:
    """Watch `state.engine` until cancelled; `on_fatal(error)` once the engine is down for good."""
    settings, admission = state.settings, state.admission
    restarts = 0
    while True:
        await asyncio.sleep(settings.engine_check_interval_seconds)
        try:
            await state.engine.check_health(settings.engine_check_timeout_seconds)
            continue
        except EngineDeadError as exc:
            error: BaseException = exc
        reason = str(error)
        logger.error("the engine is down: %s", reason)
        admission.down = reason
        state.fail_open(UnavailableError(f"the engine stopped: {reason}; retry", code="engine_failed"))
        while can_restart(state.engine) and restarts < settings.max_engine_restarts:
            restarts += 1
            backoff = min(2.0 ** (restarts - 1), MAX_BACKOFF_SECONDS)
            logger.warning(
                "restarting the engine in %g s (%d of %d)", backoff, restarts, settings.max_engine_restarts
            )
            await asyncio.sleep(backoff)
            state.metrics.engine_restarts.inc()
            try:
                await state.engine.restart()  # type: ignore[attr-defined]
            except Exception as exc:  # the new engine failed to start: try again, while restarts are left
                logger.exception("the engine failed to restart")
                error = exc
                continue
            admission.down = None
            logger.info("the engine is back after restart %d", restarts)
            break
        else:
            admission.failed = f"the engine is down and was not restarted: {error}"
            on_fatal(error)
            return
