"""Engine doubles, only where the real engine cannot be made to behave so on demand.

Both wrap the real tiny engine (same tokenizer, model info and stats) and change one thing:
- `FailingEngine`: every request fails inside the engine (the 500 path, before and mid-stream).
- `GatedEngine`: requests wait at a gate before reaching the engine, so they stay "waiting" as long
  as a test needs (queue limits, keep-alive pings, drain).
- `RecordingEngine`: records what each request hands the engine (params, priority, ids).
- `RefusingEngine`: `generate()` itself raises ValueError, as a backend that cannot honour a field does.
- `TextEngine`: every delta's text is replaced by a given string (characters the tiny model cannot be
  steered to produce, such as U+2028).
- `ScriptEngine`: each token's text is the next piece of a script (a reasoning model's tags).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from kiln.engine.info import EngineStats, ModelInfo
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import RequestValidationError


class _Wrapper:
    def __init__(self, engine: Any) -> None:
        self.inner = engine

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self.inner.model_info

    def stats(self) -> EngineStats:
        return self.inner.stats()

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def start(self) -> None:
        await self.inner.start()

    async def check_health(self, timeout: float) -> None:
        await self.inner.check_health(timeout)

    async def shutdown(self) -> None:
        pass  # the wrapped engine is shared by the session


class FailingEngine(_Wrapper):
    """Fails after `fail_after` outputs of each request (0: before the first)."""

    def __init__(self, engine: Any, fail_after: int = 0) -> None:
        super().__init__(engine)
        self.fail_after = fail_after

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        count = 0
        async for out in self.inner.generate(prompt_token_ids, params, request_id, **kw):
            if count == self.fail_after:
                raise RuntimeError("simulated engine failure (secret internal detail)")
            count += 1
            yield out
        if count == self.fail_after:
            raise RuntimeError("simulated engine failure (secret internal detail)")


class GatedEngine(_Wrapper):
    """Holds every request before the engine until `open()`; counts requests that reached the gate."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        # A threading.Event: the test thread opens it while the server's loop (another thread) waits.
        self._gate = threading.Event()
        self.arrived = 0

    def open(self) -> None:
        self._gate.set()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        self.arrived += 1
        while not self._gate.is_set():
            await asyncio.sleep(0.01)
        async for out in self.inner.generate(prompt_token_ids, params, request_id, **kw):
            yield out


class RecordingEngine(_Wrapper):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.calls: list[dict[str, Any]] = []

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        self.calls.append(
            {"prompt_token_ids": prompt_token_ids, "params": params, "request_id": request_id, **kw}
        )
        async for out in self.inner.generate(prompt_token_ids, params, request_id, **kw):
            yield out


class RefusingEngine(_Wrapper):
    """Refuses every request as a backend does: a RequestValidationError naming `field` (or none)."""

    def __init__(self, engine: Any, message: str, field: str | None = None) -> None:
        super().__init__(engine)
        self.message = message
        self.field = field

    def generate(self, *args: Any, **kw: Any) -> AsyncIterator[RequestOutput]:
        raise RequestValidationError(self.message, self.field)


class TextEngine(_Wrapper):
    """The real engine's outputs with each completion delta's text replaced by `text` once per token (a
    slow reader gets several tokens in one delta)."""

    def __init__(self, engine: Any, text: str) -> None:
        super().__init__(engine)
        self.text = text

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        async for out in self.inner.generate(prompt_token_ids, params, request_id, **kw):
            for completion in out.outputs:
                completion.text = self.text * len(completion.token_ids)
            yield out


class ScriptEngine(_Wrapper):
    """The real engine's outputs rewritten to the tokens of `script` (ids, text, and the sampled token's
    logprob entry), token k of each completion the script's k-th: an output the tiny model cannot be
    steered to write (a reasoning model's tags). Ask for at most `len(ids)` tokens. `whole`: the output
    comes as one delta, as a reader that fell behind gets it."""

    def __init__(self, engine: Any, script: str, whole: bool = False) -> None:
        super().__init__(engine)
        self.whole = whole
        tokenizer = engine.tokenizer
        self.ids = tokenizer.encode(script, add_special_tokens=False)
        assert tokenizer.decode(self.ids) == script, "the script must round-trip through the tokenizer"
        # Each token's text as the output's decode grows by it (a piece of a character stays whole).
        texts = [tokenizer.decode(self.ids[:k]) for k in range(len(self.ids) + 1)]
        self.pieces = [texts[k + 1][len(texts[k]) :] for k in range(len(self.ids))]

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        written: dict[int, int] = {}  # tokens so far, by completion
        merged: list[Any] = []  # with `whole`: the logprobs of the deltas held back
        async for out in self.inner.generate(prompt_token_ids, params, request_id, **kw):
            for completion in out.outputs:
                start = written.get(completion.index, 0)
                end = written[completion.index] = start + len(completion.token_ids)
                if completion.logprobs:
                    for entry, old, new in zip(
                        completion.logprobs, completion.token_ids, self.ids[start:end], strict=True
                    ):
                        entry[new] = entry.pop(old)
                completion.token_ids = self.ids[start:end]
                completion.text = "".join(self.pieces[start:end])
            if not self.whole:
                yield out
            elif out.finished:  # one delta of everything so far (one completion: n = 1)
                [last] = out.outputs
                last.token_ids, last.text = self.ids[:end], "".join(self.pieces[:end])
                last.logprobs = [*merged, *(last.logprobs or [])] if last.logprobs is not None else None
                yield out
            elif out.outputs[0].logprobs:
                merged += out.outputs[0].logprobs
