"""What the native drivers pass between their callers and the step loop, and between processes.

Down (callers -> step loop): `AddRequest`, `AbortRequest`, `SetBatching`, `Shutdown` (together: `Command`). Up (step loop ->
callers): one `StepReport` per turn of the loop and a `Goodbye` when it stops; `ProcessEngine`'s child first
says `Ready` or `StartupFailed`. Every message is picklable, since `ProcessEngine` sends them through pipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from kiln.engine.info import BatchingLimits, EngineStats, ModelInfo
from kiln.engine.sampling_params import SamplingParams

# Re-exported here, where the drivers raise it; defined below the engine, which raises it too.
from kiln.errors import EngineDeadError as EngineDeadError

OutputT = TypeVar("OutputT")


class RequestFailedError(RuntimeError):
    """This request failed in its own part of an engine step and was aborted; the others went on."""


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    owner: str | None = None  # requests of one owner share a fair share of the engine


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Abort one request; `ack` comes back in a `StepReport.acks` once its KV blocks are free."""

    request_id: str
    ack: int


@dataclass(frozen=True, slots=True)
class SetBatching:
    """Change the scheduler's batching limits (None: unchanged) from the next step on; `ack` comes back in
    a `StepReport.acks` once they are in force (that report's stats show them)."""

    limits: BatchingLimits
    ack: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Abort every request and stop the loop; it answers with `Goodbye`."""


Command = AddRequest | AbortRequest | SetBatching | Shutdown


@dataclass(frozen=True, slots=True)
class RequestError:
    """A request the engine gave up on: refused when added, or in flight when a step failed."""

    request_id: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class StepReport(Generic[OutputT]):
    """One turn of the step loop: its outputs (`RequestOutput`s on a thread, wire tuples through a pipe),
    the engine's stats after it, the abort acks of the commands it took, and the requests it gave up on."""

    outputs: list[OutputT]
    stats: EngineStats
    acks: list[int]
    errors: list[RequestError]


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The loop stopped (every request aborted); the last word of the engine."""

    stats: EngineStats


@dataclass(frozen=True, slots=True)
class Ready:
    """A child process built its engine: what the parent needs to validate requests and answer callers."""

    model_info: ModelInfo
    vocab_size: int
    max_model_len: int
    stats: EngineStats
    tokenizer_path: str


@dataclass(frozen=True, slots=True)
class StartupFailed:
    """A child process could not build its engine."""

    error: BaseException
