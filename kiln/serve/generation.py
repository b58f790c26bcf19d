"""`Generation`: one HTTP request's run through the engine, for the chat and completions handlers.

Rules:
- `outputs()` yields `(prompt_index, RequestOutput delta)` for every prompt of the request (a
  completions request may batch several; each runs as its own engine request `<id>-<i>`).
- However it ends — finished, client gone (the iterator is closed or cancelled), or failed — every
  engine request that has not finished is closed and aborted, so its KV blocks return to the pool.
  Each engine stream is consumed by its own asyncio task, even for one prompt: a disconnect then
  reaches the engine as one plain task cancellation, never as sse-starlette's anyio cancel scope,
  which re-cancels every await and would cut short the engine's own cleanup (its abort). Our
  cleanup awaits run shielded for the same reason.
- `start()` submits the prompts at once (the handlers call it before they return): the engine then
  gets a request one loop iteration after its handler ran. Submitted lazily, from inside the response
  (sse-starlette's tasks, several iterations later), a burst of arrivals reached the engine only once
  every handler of the burst had run: ~130 ms per wave of 256 streams on the H100 host.
- `aclose()` (the response's on_close) ends it whatever happened, even when the response never read
  an output (a client gone before its stream began): pumps cancelled, engine requests aborted, ticket
  released, the request logged once.
- It owns the request's bookkeeping: the admission ticket, latency/token metrics, the log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from kiln.clients.messages import EngineDeadError
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import RequestValidationError
from kiln.serve.admission import Ticket
from kiln.serve.errors import APIError, InvalidRequestError, UnavailableError
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest
from kiln.serve.request_log import RequestRecord, log_request
from kiln.serve.state import ServerState


def new_completion_id(prefix: str) -> str:
    """A fresh response id, also the engine request id. Never derived from the client's X-Request-Id:
    two requests sending the same header must not collide in the engine."""
    return f"{prefix}-{uuid.uuid4().hex}"


# What an engine's refusal (`RequestValidationError.field`: "prompt" or a SamplingParams field) is
# called in each endpoint's request: chat carries the prompt as `messages`, logprobs as `top_logprobs`.
_ENDPOINT_FIELDS = {
    "chat": (
        frozenset(ChatCompletionRequest.model_fields),
        {"prompt": "messages", "logprobs": "top_logprobs"},
    ),
    "completions": (frozenset(CompletionRequest.model_fields), {}),
}


def request_param(endpoint: str, field: str | None, structured_param: str | None = None) -> str | None:
    """The `param` of a 400 for an engine's refusal naming `field`; None when the request has no such field.
    `structured_param`: the request field that asked for the structured output (the engine says `structured`)."""
    fields, renamed = _ENDPOINT_FIELDS[endpoint]
    if field == "structured":
        return structured_param
    param = renamed.get(field, field) if field is not None else None
    return param if param in fields else None


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
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.endpoint = endpoint
        self.prompts = prompts
        self.params = params
        self.priority = priority
        self.ticket = ticket
        self.structured_param = structured_param  # the request field a `structured` refusal names
        self.arrival = time.monotonic()
        self.record = RequestRecord(
            request_id=request_id,
            http_request_id=http_request_id,
            endpoint=endpoint,
            model=state.model_name,
            stream=stream,
            n=params.n,
            prompt_tokens=sum(len(p.token_ids) for p in prompts),
        )
        self._log_text = state.settings.log_prompts
        if self._log_text:
            self.record.prompt = [p.text if p.text is not None else p.token_ids for p in prompts]
            self.record.output = [""] * (len(prompts) * params.n)
        self._last_output_time: dict[int, float] = {}
        self._cached_tokens: dict[int, int] = {}
        self._finish_reasons: list[str] = []
        self._items: asyncio.Queue[_PumpItem] = asyncio.Queue()
        self._pumps: list[asyncio.Future[None]] | None = None
        self._finished = False
        state.open_generations.add(self)

    def sub_request_id(self, prompt_index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{prompt_index}"

    def start(self) -> None:
        """Submit every prompt to the engine, each pumped by its own task (idempotent)."""
        if self._pumps is None:
            self._pumps = [asyncio.ensure_future(self._pump(i)) for i in range(len(self.prompts))]

    async def aclose(self) -> None:
        """End the request (idempotent): its engine requests are aborted unless finished; see the rules."""
        await self._stop_pumps()
        if not self._finished:
            self._finish("cancelled")

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        outcome = "cancelled"
        source = self._engine_streams()
        try:
            async for prompt_index, out in source:
                self._observe(prompt_index, out)
                yield prompt_index, out
            outcome = self._outcome()
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
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
        prompt = self.prompts[prompt_index]
        request_id = self.sub_request_id(prompt_index)
        stream: AsyncIterator[RequestOutput] | None = None
        finished = produced = False
        try:
            stream = self.state.engine.generate(
                prompt.token_ids,
                self.params,
                request_id,
                prompt=prompt.text,
                priority=self.priority,
                owner=self.request_id,  # a request's prompts share one fair share of the engine
            )
            async for out in stream:
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
                self._items.put_nowait(_PromptOutput(prompt_index, output))
            self._items.put_nowait(_PromptDone(prompt_index))
        except Exception as exc:
            self._items.put_nowait(_PromptFailed(prompt_index, exc))
        finally:
            with anyio.CancelScope(shield=True):
                await source.aclose()

    async def _engine_streams(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """All prompts' outputs as they come (starting the pumps if the handler did not)."""
        self.start()
        try:
            remaining = len(self.prompts)
            while remaining:
                item = await self._items.get()
                if isinstance(item, _PromptOutput):
                    yield item.prompt_index, item.output
                elif isinstance(item, _PromptDone):
                    remaining -= 1
                else:
                    raise item.error
        finally:
            await self._stop_pumps()

    async def _stop_pumps(self) -> None:
        pumps = self._pumps or []
        for task in pumps:
            task.cancel()
        with anyio.CancelScope(shield=True), contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pumps, return_exceptions=True)

    def _observe(self, prompt_index: int, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        previous = self._last_output_time.get(prompt_index)
        if self.record.ttft_seconds is None:
            self.record.ttft_seconds = now - self.arrival
            self.ticket.started()
        if previous is not None:
            self.state.metrics.observe_inter_token(now - previous, new_tokens)
        self._last_output_time[prompt_index] = now
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
        self._items.put_nowait(_PromptFailed(-1, error))

    def _finish(self, outcome: str) -> None:
        self._finished = True
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
