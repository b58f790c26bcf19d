"""In-flight batching scheduler: decides, each step, which requests compute how many tokens.

The token-budget rule: each step hands out at most `max_num_batched_tokens` tokens. Running requests
come first (decodes and unfinished prefill chunks, in priority order), then waiting requests are
admitted first-come-first-served within priority, each taking a prefill chunk of what budget is left
(chunked prefill). Prefix-cache hits count as computed, except for a request that scores its prompt
(`Request.scores_prompt`): each of its prompt tokens needs logits. When the KV pool runs dry the
lowest-priority, newest running request is preempted: its blocks are freed and it waits to be recomputed. Pure
bookkeeping, no torch: `SchedulerOutput` is the only product, tested with exact block ids.

`schedule()` counts the scheduled tokens as computed at once and each sampling request as owing one
pending token, so the next step can be scheduled before this one's tokens reach the host (overlapped
steps); `update()` later hands over the sampled ids. A request whose sampled tokens are still pending
is not scheduled past its max_tokens or the context, and is not (re)admitted from the waiting queue:
a prefill needs every token id on the host.

Fair share: requests of one owner (a client request's prompts and n samples) are admitted after those of
owners with fewer running sequences, within a priority; and a waiting owner with nothing running takes a
slot from the owner with the most running sequences (preempting its newest, never its last one), so a
request of hundreds of sequences delays another client's short one by a step, not by its whole length.
With one sequence per owner (the common case) the order is plain first-come-first-served.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kiln.engine.request import Request, RequestStatus
from kiln.kvcache.manager import KVCacheManager


# Not frozen: one is made for every running request every step, and a frozen dataclass's __init__ costs
# three times as much (each field set through object.__setattr__). Nothing changes one once made.
@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    start: int  # first position computed this step (num_computed_tokens before this step)
    num_new_tokens: int
    block_ids: tuple[int, ...]  # the request's whole block table
    sample: bool  # this chunk reaches the request's last token, so a new token is sampled

    @property
    def token_ids(self) -> list[int]:
        """The input ids known on the host; shorter than num_new_tokens when the last one is pending."""
        return self.request.all_token_ids[self.start : self.start + self.num_new_tokens]


@dataclass(slots=True, frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted_ids: tuple[str, ...]  # preempted during this schedule() call
    finished_ids: tuple[str, ...]  # left the scheduler since the previous step (runner drops their state)
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int  # running requests at once
    max_num_batched_tokens: int  # token budget per step
    max_model_len: int  # prompt + output tokens
    # While requests run, waiting ones are admitted every this many steps (1: every step), together.
    # A step that prefills runs eagerly while a pure-decode step replays a CUDA graph, so under a steady
    # stream of arrivals, admitting them in batches keeps most steps graphed; each arrival waits at most
    # this many steps longer for its first token. An idle engine admits at once.
    admission_interval: int = 1


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # sorted by Request.sort_key: the last one is preempted first
        self.requests: dict[str, Request] = {}
        self._finished_since_step: list[str] = []
        self.num_preemptions = 0
        # Totals over the non-empty steps scheduled since start: the mean batch a load really ran at.
        self.num_steps = 0
        self.num_step_seqs = 0
        self.num_step_tokens = 0
        self._steps_since_admission = 0
        self._fairness_preemptions = 0

    # -- requests in and out -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=Request.sort_key)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (or abort) requests wherever they are; their KV blocks return to the pool now."""
        done = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            queue = self.running if request.status == RequestStatus.RUNNING else self.waiting
            queue.remove(request)
            request.status = status
            request.metrics.finished_time = time.monotonic()
            self.kv_cache.free(request_id)
            self._finished_since_step.append(request_id)
            done.append(request)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- one step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = self._make_room_for_starved_owners()

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_pending_tokens and self._at_limit(request):
                index += 1  # its pending token is its last: it finishes when that token arrives
                continue
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            while (
                self.kv_cache.allocate_slots(
                    request.request_id,
                    request.all_token_ids,
                    request.num_computed_tokens,
                    num_new,
                    num_unknown_tokens=request.num_pending_tokens,
                )
                is None
            ):
                victim = self.running[-1]  # lowest priority, newest: never one scheduled earlier this step
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1

        # Admit waiting requests only when nothing had to be preempted for memory (the pool is too tight),
        # and, while others run, once every admission_interval steps.
        self._steps_since_admission += 1
        due = not self.running or self._steps_since_admission >= self.config.admission_interval
        if self.waiting and len(preempted) == self._fairness_preemptions and due:
            for request in self._admission_order():
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                if request.num_pending_tokens:
                    continue  # preempted with a token in flight: its ids are needed to recompute
                if request.wait_for is not None and not self._ready_after(request.wait_for):
                    continue
                if request.scores_prompt:  # computed whole: a cached block has no logits
                    hit_blocks, num_hit = [], 0
                else:
                    hit_blocks, num_hit = self.kv_cache.get_computed_blocks(request.all_token_ids)
                num_new = min(request.num_tokens - num_hit, budget)
                new_blocks = self.kv_cache.allocate_slots(
                    request.request_id, request.all_token_ids, 0, num_new, hit_blocks
                )
                if new_blocks is None:
                    break  # first come, first served: nobody overtakes a request that does not fit
                self.waiting.remove(request)
                request.status = RequestStatus.RUNNING
                request.num_computed_tokens = num_hit
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = num_hit
                    request.metrics.num_cached_prompt_tokens = num_hit
                if request.metrics.first_scheduled_time is None:
                    request.metrics.first_scheduled_time = time.monotonic()
                bisect.insort(self.running, request, key=Request.sort_key)
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                self._steps_since_admission = 0

        for item in scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
            if item.sample:
                item.request.num_pending_tokens += 1
        finished, self._finished_since_step = tuple(self._finished_since_step), []
        num_batched_tokens = self.config.max_num_batched_tokens - budget
        if scheduled:
            self.num_steps += 1
            self.num_step_seqs += len(scheduled)
            self.num_step_tokens += num_batched_tokens
        return SchedulerOutput(
            scheduled=tuple(scheduled),
            preempted_ids=tuple(preempted),
            finished_ids=finished,
            num_batched_tokens=num_batched_tokens,
        )

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append each sampling request's token from the step `output` describes.

        Finishes requests that hit a stop token, EOS, max_tokens or the context limit, and returns
        every request that received a token (finished or not), in scheduling order. A request that
        finished or was aborted since that step was scheduled gets nothing: its token is dropped (with
        overlapped steps it may have been scheduled once more before its stop was known). One that was
        preempted meanwhile still gets its token: it is valid, and its recompute needs it. Each request
        that got one has its metrics' first and last token times set (when its token came back).
        """
        advanced = []
        now = time.monotonic()
        for item in output.scheduled:
            request = item.request
            if not item.sample or request.status.finished or request.request_id not in self.requests:
                continue
            request.num_pending_tokens -= 1
            request.append_output_token(sampled[request.request_id])
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            advanced.append(request)
            status = self._stop_status(request)
            if status is not None:
                self.finish_requests([request.request_id], status)
        return advanced

    # -- fair share ----------------------------------------------------------------------------------
    def _admission_order(self) -> list[Request]:
        """Waiting requests by priority, then their owner's running sequences (fewest first), then
        arrival. Sorted only when an owner has several sequences: otherwise it is the waiting order."""
        running = Counter(r.owner_key for r in self.running)
        if not self._fairness_preemptions and (not running or max(running.values()) < 2):
            return list(self.waiting)
        return sorted(self.waiting, key=lambda r: (r.priority, running[r.owner_key], *r.sort_key()[1:]))

    def _make_room_for_starved_owners(self) -> list[str]:
        """While every slot is taken, preempt for each ready waiting request whose owner runs nothing
        the newest sequence of the owner running the most (at least two, at the same or a lower
        priority); returns the ids preempted."""
        self._fairness_preemptions = 0
        if len(self.running) < self.config.max_num_seqs or not self.waiting:
            return []
        running = Counter(r.owner_key for r in self.running)
        preempted: list[str] = []
        for request in list(self.waiting):
            if len(self.running) < self.config.max_num_seqs:
                break  # a slot is free: admission takes it, in fair order
            if running[request.owner_key] or request.num_pending_tokens:
                continue
            if request.wait_for is not None and not self._ready_after(request.wait_for):
                continue
            owner, count = running.most_common(1)[0]
            if count < 2:
                break
            victim = next(r for r in reversed(self.running) if r.owner_key == owner)
            if victim.priority < request.priority:
                continue  # never for a request of lower priority
            self._preempt(victim)
            preempted.append(victim.request_id)
            running[owner] -= 1
            running[request.owner_key] += 1  # this owner is served: its other requests wait their turn
        self._fairness_preemptions = len(preempted)
        return preempted

    # -- helpers -------------------------------------------------------------------------------------
    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        block_ids = self.kv_cache.block_ids(request.request_id)
        # Positional: the per-request record of every step (keywords cost twice as much to pass).
        return ScheduledRequest(
            request, start, num_new, block_ids, start + num_new == request.num_tokens_with_pending
        )

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and send it back to wait; it recomputes prompt + outputs so far."""
        self.running.remove(request)
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=Request.sort_key)

    def _ready_after(self, leader: Request) -> bool:
        return leader.status.finished or leader.request_id not in self.requests or leader.prompt_computed

    def _at_limit(self, request: Request) -> bool:
        """Whether the request may not grow any further: max_tokens or the context is reached."""
        return (
            request.num_output_tokens + request.num_pending_tokens >= request.max_output_tokens
            or request.num_tokens_with_pending >= self.config.max_model_len
        )

    def _stop_status(self, request: Request) -> RequestStatus | None:
        token = request.output_token_ids[-1]
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
