"""`Generation`: one HTTP request's run through the engine, for the chat and completions handlers.

Rules:
- `outputs()` yields `(prompt_index, RequestOutput delta)` for every prompt of the request (a
  completions request may batch several; each runs as its own engine request `<id>-<i>`). A reader
  that fell behind gets each prompt's backlog folded into one delta, so a busy server sends fewer,
  larger chunks instead of falling further behind.
- However it ends — finished, client gone (the iterator is closed or cancelled), or failed — every
  engine request that has not finished is closed and aborted, so its KV blocks return to the pool.
  Each engine stream is consumed by its own asyncio task, even for one prompt: a disconnect then
  reaches the engine as one plain task cancellation, never as the SSE response's anyio cancel
  scope, which re-cancels every await and would cut short the engine's own cleanup (its abort). Our
  cleanup awaits run shielded for the same reason.
- `start()` submits the prompts at once (the handlers call it before they return): it opens each
  prompt's engine stream, which a native driver whose loop runs submits there and then
  (kiln.clients.streams), so a burst of arrivals reaches the engine while its later handlers still run;
  an engine that submits at the first iteration gets its request from the prompt's pump, one loop
  iteration after the handler, once every handler of the burst ran. Submitted lazily, from inside the
  response (several loop iterations later), a burst reached the engine later still: ~130 ms per wave of
  256 streams on the H100 host. A stream whose pump never ran (the request ended first) is closed when
  the pumps are, which aborts what it submitted.
- `aclose()` (the response's on_close) ends it whatever happened, even when the response never read
  an output (a client gone before its stream began): pumps cancelled, engine requests aborted, ticket
  released, the request logged once.
- It owns the request's bookkeeping: the admission ticket, latency/token metrics, the log line.
- Deadlines (`request_deadline`): a request may have one, from its `timeout` field, the
  X-Request-Timeout header (the shorter wins) or the server's default, cut to the server's cap; it
  counts from the handler's start. An asyncio timer enforces it, not a check between engine steps, so
  it holds while the engine is busy or stalled: at the deadline the prompts' pumps are cancelled (each
  aborts its engine request, queued or running, freeing its blocks) and the reader gets a
  `RequestTimeoutError` after what it already had (non-streaming: a 504, the partial output dropped;
  a stream: an error event, then [DONE]), counted as outcome `timeout`. The answer does not wait for
  the engine's abort acknowledgement (a stalled step would hold it): that cleanup ends in the
  background. A request already past its deadline when it would start never reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Header

from kiln.clients.mailbox import Mailbox
from kiln.clients.messages import EngineDeadError
from kiln.engine.outputs import RequestOutput, coalesce
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import RequestValidationError
from kiln.serve.admission import Ticket
from kiln.serve.errors import APIError, InvalidRequestError, RequestTimeoutError, UnavailableError
from kiln.serve.protocol import MAX_REQUEST_TIMEOUT_SECONDS, ChatCompletionRequest, CompletionRequest
from kiln.serve.request_log import RequestRecord, log_request
from kiln.serve.responses_protocol import ResponsesRequest
from kiln.serve.settings import ServerSettings
from kiln.serve.state import ServerState
from kiln.serve.versions import version_of


def new_completion_id(prefix: str) -> str:
    """A fresh response id (`prefix`, as OpenAI's: "chatcmpl-", "cmpl-", "resp_"), also the engine
    request id. Never derived from the client's X-Request-Id: two requests sending the same header must
    not collide in the engine."""
    return f"{prefix}{uuid.uuid4().hex}"


# What an engine's refusal (`RequestValidationError.field`: "prompt" or a SamplingParams field) is
# called in each endpoint's request: chat carries the prompt as `messages`, logprobs as `top_logprobs`.
_ENDPOINT_FIELDS = {
    "chat": (
        frozenset(ChatCompletionRequest.model_fields),
        {"prompt": "messages", "logprobs": "top_logprobs"},
    ),
    "completions": (frozenset(CompletionRequest.model_fields), {}),
    "responses": (
        frozenset(ResponsesRequest.model_fields),
        {"prompt": "input", "max_tokens": "max_output_tokens", "logprobs": "top_logprobs"},
    ),
}


def request_param(endpoint: str, field: str | None, structured_param: str | None = None) -> str | None:
    """The `param` of a 400 for an engine's refusal naming `field`; None when the request has no such field.
    `structured_param`: the request field that asked for the structured output (the engine says `structured`)."""
    fields, renamed = _ENDPOINT_FIELDS[endpoint]
    if field == "structured":
        return structured_param
    param = renamed.get(field, field) if field is not None else None
    return param if param in fields else None


# The request header that sets a deadline, in seconds (as the `timeout` field). HTTP has no standard
# one; a gateway in front of Kiln passes its remaining budget here without touching the body.
TIMEOUT_HEADER = "X-Request-Timeout"
# The handlers' parameter for it: declared, so /openapi.json documents it and a bad value is a 400
# naming it (`param`: the header's name), checked as the `timeout` field is.
TimeoutHeader = Annotated[
    float | None,
    Header(
        alias=TIMEOUT_HEADER,
        gt=0,
        le=MAX_REQUEST_TIMEOUT_SECONDS,
        allow_inf_nan=False,
        description="Kiln's extension: seconds this request may take from its arrival, as the body's "
        "`timeout` field (the shorter of the two wins); past them the request is stopped in the engine "
        "and answered with 504 `request_timeout`.",
    ),
]


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be answered by (`time.monotonic()`), its length and what set it."""

    at: float
    seconds: float
    source: str  # "timeout", "X-Request-Timeout", "request_timeout_seconds" or "max_request_timeout_seconds"

    def left(self) -> float:
        """Seconds until it passes (negative once past)."""
        return self.at - time.monotonic()


def request_deadline(
    started: float, body_timeout: float | None, header_timeout: float | None, settings: ServerSettings
) -> Deadline | None:
    """The deadline of a request whose handler started at `started` (`time.monotonic()`), or None. The
    rule: the shorter of the `timeout` field and the X-Request-Timeout header, else the server's
    `request_timeout_seconds`; whichever it is, cut to `max_request_timeout_seconds`, which also applies
    alone. A client may ask for longer than the server's default, never past its cap."""
    asked = [
        (t, src) for t, src in ((body_timeout, "timeout"), (header_timeout, TIMEOUT_HEADER)) if t is not None
    ]
    picked = min(asked) if asked else None
    if picked is None and settings.request_timeout_seconds is not None:
        picked = (settings.request_timeout_seconds, "request_timeout_seconds")
    cap = settings.max_request_timeout_seconds
    if cap is not None and (picked is None or picked[0] > cap):
        picked = (cap, "max_request_timeout_seconds")
    return None if picked is None else Deadline(started + picked[0], picked[0], picked[1])


@dataclass(slots=True)
class Prompt:
    token_ids: list[int]
    text: str | None = None  # the prompt as text, when the client sent text (echo, logs)


# What each prompt's pump puts on the generation's queue: its outputs, then its end or its failure.
@dataclass(frozen=True, slots=True)
class _PromptOutput:
    prompt_index: int
    output: RequestOutput


@dataclass(frozen=True, slots=True)
class _PromptDone:
    prompt_index: int


@dataclass(frozen=True, slots=True)
class _PromptFailed:
    prompt_index: int
    error: Exception


_PumpItem = _PromptOutput | _PromptDone | _PromptFailed


class Generation:
    def __init__(
        self,
        state: ServerState,
        *,
        request_id: str,
        http_request_id: str,
        endpoint: str,
        prompts: list[Prompt],
        params: SamplingParams,
        priority: int,
        ticket: Ticket,
        stream: bool,
        structured_param: str | None = None,
        deadline: Deadline | None = None,
        log_tags: dict[str, Any] | None = None,
    ) -> None:
        """`log_tags`: what the request asked to see in its log line (`SamplingRequest.log_tags`)."""
        self.state = state
        self.request_id = request_id
        self.endpoint = endpoint
        self.prompts = prompts
        self.params = params
        self.priority = priority
        self.ticket = ticket
        self.structured_param = structured_param  # the request field a `structured` refusal names
        self.deadline = deadline
        self.arrival = time.monotonic()
        self.record = RequestRecord(
            request_id=request_id,
            http_request_id=http_request_id,
            endpoint=endpoint,
            model=state.model_name,
            stream=stream,
            n=params.n,
            prompt_tokens=sum(len(p.token_ids) for p in prompts),
            extra=log_tags or {},
        )
        self._log_text = state.settings.log_prompts
        if self._log_text:
            self.record.prompt = [p.text if p.text is not None else p.token_ids for p in prompts]
            self.record.output = [""] * (len(prompts) * params.n)
        self._last_output_time: dict[int, float] = {}
        self._cached_tokens: dict[int, int] = {}
        self._finish_reasons: list[str] = []
        self._items: Mailbox[_PumpItem] = Mailbox()
        self._pumps: list[asyncio.Future[None]] | None = None
        # Each prompt's engine stream, opened by `start` (or what opening it raised, for its pump to raise).
        self._streams: list[AsyncIterator[RequestOutput] | Exception] = []
        self._finished = False
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._engine_cleanup: asyncio.Future[None] | None = None  # the pumps' end, after a deadline
        self.version: int | None = None  # the model version serving it, with a model repository
        state.open_generations.add(self)

    @property
    def system_fingerprint(self) -> str | None:
        """`<model>/<version>` when a model repository's version serves the request, else None: the
        version it was routed to, from when it reached the engine, and the one that answered, from its
        first output (they differ only when a failed canary request was run again on the stable one)."""
        return None if self.version is None else f"{self.state.model_name}/{self.version}"

    def _note_version(self) -> None:
        version = version_of(self.state.engine, self.request_id)
        if version is not None:
            self.version = self.record.extra["model_version"] = version

    def sub_request_id(self, prompt_index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{prompt_index}"

    def start(self) -> None:
        """Submit every prompt to the engine, each pumped by its own task, and start the deadline's
        timer (idempotent). Past the deadline already, nothing is submitted."""
        if self._pumps is not None:
            return
        if self.deadline is not None:
            remaining = self.deadline.at - time.monotonic()
            if remaining <= 0:
                self._pumps = []
                self._expire()
                return
            self._timer = asyncio.get_running_loop().call_later(remaining, self._expire)
        self._streams = [self._open(i) for i in range(len(self.prompts))]
        self._pumps = [asyncio.ensure_future(self._pump(i)) for i in range(len(self.prompts))]

    def _open(self, prompt_index: int) -> AsyncIterator[RequestOutput] | Exception:
        """The prompt's engine stream, or what opening it raised (its pump raises it, as from the stream)."""
        try:
            return self.state.engine.generate(
                self.prompts[prompt_index].token_ids,
                self.params,
                self.sub_request_id(prompt_index),
                prompt=self.prompts[prompt_index].text,
                priority=self.priority,
                owner=self.request_id,  # a request's prompts share one fair share of the engine
            )
        except Exception as exc:
            return exc

    async def _close_streams(self) -> None:
        """Close every prompt's stream (a pump that ran closed its own): what one submitted whose pump never
        ran is aborted."""
        with anyio.CancelScope(shield=True):
            for stream in self._streams:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def aclose(self) -> None:
        """End the request (idempotent): its engine requests are aborted unless finished; see the rules."""
        await self._stop_pumps()
        if not self._finished:
            self._finish("timeout" if self._timed_out else "cancelled")

    def _expire(self) -> None:
        """The deadline passed: abort what still runs in the engine and tell the reader (see the rules)."""
        pumps = self._pumps or []
        if self._finished or (pumps and all(p.done() for p in pumps)):
            return  # answered, or every output is in already: the reader finishes as it would have
        assert self.deadline is not None
        self._timed_out = True
        for task in pumps:
            task.cancel()  # its `_one` aborts the engine request at once (queued or running)
        if pumps:
            self._engine_cleanup = asyncio.ensure_future(self._end_pumps(pumps))
        self.fail(
            RequestTimeoutError(
                f"the request ran past its deadline of {self.deadline.seconds:g} s (set by "
                f"{self.deadline.source}) and was stopped"
            )
        )

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        outcome = "cancelled"
        source = self._engine_streams()
        try:
            async for prompt_index, out in source:
                self._observe(prompt_index, out)
                yield prompt_index, out
            outcome = self._outcome()
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "timeout" if self._timed_out else "cancelled"
            raise
        except RequestTimeoutError:
            outcome = "timeout"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await source.aclose()
            self._finish(outcome)

    async def _one(self, prompt_index: int) -> AsyncIterator[tuple[int, RequestOutput]]:
        """One prompt's engine stream; aborted in the engine unless it finished."""
        request_id = self.sub_request_id(prompt_index)
        opened = self._streams[prompt_index]
        stream: AsyncIterator[RequestOutput] | None = None
        finished = produced = False
        try:
            if isinstance(opened, Exception):
                raise opened
            stream = opened
            self._note_version()  # routed by now
            async for out in stream:
                if not produced:
                    self._note_version()  # the version that answers (a failed canary's request is rerun)
                finished, produced = out.finished, True
                yield prompt_index, out
        except ValueError as exc:
            if produced:
                raise
            # EngineClient rule: a request the engine can never run fails before its first output, as a
            # RequestValidationError naming the field (None: no one field, or another ValueError).
            field = exc.field if isinstance(exc, RequestValidationError) else None
            raise InvalidRequestError(
                str(exc), param=request_param(self.endpoint, field, self.structured_param)
            ) from None
        except EngineDeadError as exc:  # the engine died or was stopped under this request
            raise UnavailableError(f"the engine stopped: {exc}; retry", code="engine_failed") from None
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                if not finished:
                    await self.state.engine.abort(request_id)

    async def _pump(self, prompt_index: int) -> None:
        source = self._one(prompt_index)
        try:
            async for _, output in source:
                self._items.put(_PromptOutput(prompt_index, output))
            self._items.put(_PromptDone(prompt_index))
        except Exception as exc:
            self._items.put(_PromptFailed(prompt_index, exc))
        finally:
            with anyio.CancelScope(shield=True):
                await source.aclose()

    async def _engine_streams(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """All prompts' outputs as they come (starting the pumps if the handler did not)."""
        self.start()
        try:
            remaining = len(self.prompts)
            while remaining:
                # A reader that fell behind folds each prompt's backlog into one delta (one chunk).
                backlog: dict[int, list[RequestOutput]] = {}
                failed: Exception | None = None
                for item in await self._items.take():
                    if isinstance(item, _PromptOutput):
                        backlog.setdefault(item.prompt_index, []).append(item.output)
                    elif isinstance(item, _PromptDone):
                        remaining -= 1
                    else:
                        failed = item.error
                        break
                for prompt_index, deltas in backlog.items():
                    yield prompt_index, coalesce(deltas)
                if failed is not None:
                    raise failed
        finally:
            await self._stop_pumps()

    async def _stop_pumps(self) -> None:
        if self._timed_out:
            # `_expire` cancelled the pumps once; a second cancel would cut their abort short. The
            # deadline's answer does not wait for the engine: `_engine_cleanup` does.
            return
        pumps = self._pumps or []
        for task in pumps:
            task.cancel()
        with anyio.CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError):
            await self._end_pumps(pumps)

    async def _end_pumps(self, pumps: list[asyncio.Future[None]]) -> None:
        """Wait for the (cancelled) pumps, then close the streams (one whose pump never ran is aborted)."""
        await asyncio.gather(*pumps, return_exceptions=True)
        await self._close_streams()

    def _observe(self, prompt_index: int, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        previous = self._last_output_time.get(prompt_index)
        slo = self.state.slo
        if self.record.ttft_seconds is None:
            self.record.ttft_seconds = now - self.arrival
            self.ticket.started()
            if slo is not None:
                slo.observe_ttft(self.record.ttft_seconds)
        if previous is not None:
            self.state.metrics.observe_inter_token(now - previous, new_tokens)
            if slo is not None:
                slo.observe_itl(now - previous, new_tokens)
        self._last_output_time[prompt_index] = now
        if out.finished and out.metrics is not None:
            self.state.metrics.observe_phases(self.arrival, out.metrics)
        self.record.completion_tokens += new_tokens
        self._cached_tokens[prompt_index] = out.num_cached_tokens
        for c in out.outputs:
            if c.finish_reason is not None:
                self._finish_reasons.append(c.finish_reason)
            if self._log_text and self.record.output is not None:
                self.record.output[prompt_index * self.params.n + c.index] += c.text

    def _outcome(self) -> str:
        for reason in ("abort", "length"):
            if reason in self._finish_reasons:
                return reason
        return "stop"

    def fail(self, error: APIError) -> None:
        """End the request with `error` (the engine went down, the drain ran out): its reader raises it
        after what came before, its engine requests are aborted as it closes."""
        self._items.put(_PromptFailed(-1, error))

    def _finish(self, outcome: str) -> None:
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        self.state.open_generations.discard(self)
        self.ticket.release()
        record = self.record
        record.outcome = outcome
        record.e2e_seconds = time.monotonic() - self.arrival
        record.cached_tokens = sum(self._cached_tokens.values())
        self.state.metrics.observe_finished(
            endpoint=self.endpoint,
            outcome=outcome,
            prompt_tokens=record.prompt_tokens,
            generated_tokens=record.completion_tokens,
            ttft=record.ttft_seconds,
            e2e=record.e2e_seconds,
        )
        log_request(record, include_prompt=self._log_text)
