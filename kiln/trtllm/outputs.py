"""Translating tensorrt_llm 1.2 streaming results into Kiln's output deltas and engine stats.

Every library RequestOutput carries per-step diffs (`outputs[i].text_diff`, `token_ids_diff`,
`logprobs_diff`; tensorrt_llm/executor/result.py CompletionOutput). `OutputTranslator` turns them into
Kiln `RequestOutput` deltas, matching stop strings on the text (held back while they could still match,
never retracted). Pure Python: tested against fake objects shaped like the library's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kiln.engine.info import EngineStats
from kiln.engine.outputs import CompletionOutput, FinishReason, Logprob, RequestMetrics, RequestOutput
from kiln.engine.stop import StopChecker

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "abort",
    "timeout": "abort",
}


def translate_logprobs(entries: Iterable[Any], token_ids: list[int], top_k: int) -> list[dict[int, Logprob]]:
    """Library per-token {token_id: Logprob(logprob, rank)} dicts -> Kiln's: the sampled token + top_k by rank.

    A missing rank is the entry's position by descending logprob. Float entries (the library's
    "simple" logprobs, never requested by Kiln) are a contract violation and raise TypeError.
    """
    out: list[dict[int, Logprob]] = []
    for entry, sampled in zip(entries, token_ids, strict=True):
        if not isinstance(entry, dict):
            raise TypeError(f"expected per-token logprob dicts from tensorrt_llm, got {type(entry).__name__}")
        ordered = sorted(entry.items(), key=lambda item: -item[1].logprob)
        ranked = {tid: (lp.logprob, lp.rank or pos) for pos, (tid, lp) in enumerate(ordered, start=1)}
        keep = {tid: v for tid, v in ranked.items() if v[1] <= top_k or tid == sampled}
        out.append({tid: Logprob(logprob=float(lp), rank=int(rank)) for tid, (lp, rank) in keep.items()})
    return out


@dataclass(slots=True)
class _Sequence:
    """Text-side state of one completion: what the library produced and how much of it was sent."""

    stop_checker: StopChecker | None
    text: str = ""
    sent_chars: int = 0


class OutputTranslator:
    """Turns one request's stream of library RequestOutputs into Kiln RequestOutput deltas.

    Rules (the native engine's): text handed out is never retracted, so a possible stop-string prefix is
    held back until it resolves; a stop string is cut from the text (kept with include_stop_str_in_output)
    and wins over a length finish in the same step; a completion is reported finished once. The request is
    finished when the library says so or when every completion has finished (stop strings finish
    completions the library knows nothing about: the caller then aborts the library request).
    """

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        *,
        logprobs: int | None,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        eos_token_ids: Iterable[int] = (),
        user_stop_token_ids: Iterable[int] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.logprobs = logprobs
        self._stop = list(stop)
        self._include_stop = include_stop_str_in_output
        # EOS ids Kiln added as stop ids report stop_reason None, like an EOS stop.
        self._eos_only = set(eos_token_ids) - set(user_stop_token_ids)
        self._sequences: dict[int, _Sequence] = {}
        self._finished: set[int] = set()
        self.metrics = RequestMetrics(arrival_time=time.monotonic())

    def _completion(self, c: Any, *, force_finish: bool) -> CompletionOutput | None:
        seq = self._sequences.get(c.index)
        if seq is None:
            checker = StopChecker(self._stop, self._include_stop) if self._stop else None
            seq = self._sequences[c.index] = _Sequence(checker)
        token_ids = list(c.token_ids_diff)
        new_text = c.text_diff
        seq.text += new_text
        finish = _FINISH_REASONS.get(c.finish_reason) if c.finish_reason else None
        if finish is None and force_finish:
            finish = "abort"
        stop_reason = c.stop_reason if finish == "stop" else None
        if isinstance(stop_reason, int) and stop_reason in self._eos_only:
            stop_reason = None
        release_to = len(seq.text) if finish else None
        if seq.stop_checker is not None:
            result = seq.stop_checker.check(seq.text, len(new_text))
            if result.stopped:
                finish, stop_reason, release_to = "stop", result.stop, result.cut
            elif release_to is None:
                release_to = result.safe_len
        if release_to is None:
            release_to = len(seq.text)
        text = seq.text[seq.sent_chars : max(release_to, seq.sent_chars)]
        seq.sent_chars = max(release_to, seq.sent_chars)
        if not token_ids and not text and finish is None:
            return None
        logprobs = None
        if self.logprobs is not None:
            logprobs = translate_logprobs(c.logprobs_diff, token_ids, self.logprobs)
        return CompletionOutput(
            index=c.index,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            cumulative_logprob=c.cumulative_logprob,
            finish_reason=finish,
            stop_reason=stop_reason,
        )

    def step(self, out: Any) -> RequestOutput | None:
        """The delta of one library output; None when it holds nothing new (not even a finish)."""
        library_done = bool(out.finished)
        completions = []
        for c in out.outputs:
            if c.index in self._finished:
                continue
            completion = self._completion(c, force_finish=library_done)
            if completion is None:
                continue
            if completion.finished:
                self._finished.add(c.index)
            completions.append(completion)
        finished = library_done or len(self._finished) >= len(out.outputs)
        if not completions and not finished:
            return None
        now = time.monotonic()
        if any(c.token_ids for c in completions):
            if self.metrics.first_token_time is None:
                self.metrics.first_token_time = now
            self.metrics.last_token_time = now
        if finished:
            self.metrics.finished_time = now
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=self.metrics,
            num_cached_tokens=int(getattr(out, "cached_tokens", 0) or 0),
        )


def engine_stats_from_trtllm(stat: dict[str, Any] | str) -> EngineStats:
    """One library iteration-stats record (dict, or its JSON) -> EngineStats.

    Prefix-cache counters are cumulative block counts in the library; Kiln counts tokens, so blocks are
    multiplied by tokensPerBlock.
    """
    if isinstance(stat, str):
        stat = json.loads(stat)
    kv = stat.get("kvCacheStats") or {}
    ifb = stat.get("inflightBatchingStats") or {}
    per_block = int(kv.get("tokensPerBlock", 0) or 0)
    reused = int(kv.get("reusedBlocks", 0) or 0)
    missed = int(kv.get("missedBlocks", 0) or 0)
    return EngineStats(
        num_running=int(stat.get("numActiveRequests", 0) or 0),
        num_waiting=int(stat.get("numQueuedRequests", 0) or 0) + int(ifb.get("numPausedRequests", 0) or 0),
        kv_blocks_total=int(kv.get("maxNumBlocks", 0) or 0),
        kv_blocks_used=int(kv.get("usedNumBlocks", 0) or 0),
        prefix_cache_queries=(reused + missed) * per_block,
        prefix_cache_hits=reused * per_block,
    )
