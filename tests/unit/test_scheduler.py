"""Scheduler: token budget, chunked prefill, prefix hits, preemption choices, stops — exact block ids."""

from __future__ import annotations

import pytest

from kiln.engine.request import Request, RequestStatus
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler, SchedulerConfig
from kiln.kvcache.manager import KVCacheManager

EOS = 99


def make_scheduler(num_blocks=10, block_size=4, budget=16, max_seqs=8, max_len=64, prefix=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), kv)


def make_request(rid, prompt, t, max_tokens=8, priority=0, **params):
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        params=SamplingParams(max_tokens=max_tokens, **params),
        eos_token_ids=(EOS,),
        max_output_tokens=max_tokens,
        arrival_time=t,
        priority=priority,
    )


def run_step(sched, token=7):
    out = sched.schedule()
    sampled = {item.request.request_id: token for item in out.scheduled if item.sample}
    sched.update(out, sampled)
    return out


def summary(out):
    return [(i.request.request_id, i.start, i.num_new_tokens, i.block_ids, i.sample) for i in out.scheduled]


def test_budget_chunks_prefill_and_decodes_first():
    sched = make_scheduler(budget=16)
    for i, rid in enumerate("abc"):
        sched.add_request(make_request(rid, range(100 * i, 100 * i + 10), t=i))
    out = run_step(sched)
    # a takes its 10 prompt tokens (3 blocks); b gets a 6-token chunk from what is left of the budget.
    assert summary(out) == [("a", 0, 10, (0, 1, 2), True), ("b", 0, 6, (3, 4), False)]
    assert out.num_batched_tokens == 16
    out = run_step(sched)
    # Running requests first: a decodes 1, b finishes its prompt (4), c gets the remaining 11 budget... capped
    # at its 10 tokens.
    assert summary(out) == [
        ("a", 10, 1, (0, 1, 2), True),
        ("b", 6, 4, (3, 4, 5), True),
        ("c", 0, 10, (6, 7, 8), True),
    ]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_seqs=2, num_blocks=20)
    for i, rid in enumerate("abc"):
        sched.add_request(make_request(rid, [1, 2, 3], t=i))
    out = run_step(sched)
    assert [i.request.request_id for i in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_prefix_hit_skips_cached_blocks_but_never_the_last_token():
    sched = make_scheduler(num_blocks=10, budget=64)
    prompt = list(range(1, 9))  # exactly two full blocks
    sched.add_request(make_request("a", prompt, t=0))
    run_step(sched)
    sched.add_request(make_request("b", prompt, t=1))
    out = run_step(sched)
    b = next(i for i in out.scheduled if i.request.request_id == "b")
    # The second block would cover the last prompt token, so only the first is reused.
    assert (b.start, b.num_new_tokens, b.block_ids[0]) == (4, 4, 0)
    assert b.request.num_cached_tokens == 4


def test_preemption_frees_newest_and_its_tail_block_is_reused_first():
    sched = make_scheduler(num_blocks=10, block_size=4, budget=64, max_len=40)
    sched.add_request(make_request("a", range(0, 16), t=0, max_tokens=20))
    sched.add_request(make_request("b", range(100, 116), t=1, max_tokens=20))
    out = run_step(sched)  # prompts: a -> 0..3, b -> 4..7; each samples token 17 (needs a 5th block next)
    assert summary(out) == [("a", 0, 16, (0, 1, 2, 3), True), ("b", 0, 16, (4, 5, 6, 7), True)]
    out = run_step(sched)  # token 17 of each: a gets block 8, b gets block 9; pool now full
    assert [i.block_ids[-1] for i in out.scheduled] == [8, 9]
    for _ in range(3):
        run_step(sched)  # tokens 18-20 fit in the fifth blocks
    out = run_step(sched)  # a's token 21 needs a sixth block: b (newest) is preempted
    assert out.preempted_ids == ("b",)
    # b's blocks went to the free queue tail-first, so its last block (9) is the first one handed out.
    assert summary(out) == [("a", 20, 1, (0, 1, 2, 3, 8, 9), True)]
    b = sched.requests["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sched.num_preemptions == 1
    assert len(b.all_token_ids) == 16 + 5  # its 5 generated tokens are kept and will be recomputed


def test_preempted_request_is_recomputed_and_resumes():
    sched = make_scheduler(num_blocks=8, block_size=4, budget=64, max_len=32)
    sched.add_request(make_request("a", range(0, 12), t=0, max_tokens=12))
    sched.add_request(make_request("b", range(50, 62), t=1, max_tokens=12))
    preempted = set()
    for _ in range(60):
        if not sched.has_unfinished_requests():
            break
        preempted.update(run_step(sched).preempted_ids)
    assert preempted == {"b"}
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks() == 8


def test_priority_orders_admission_and_picks_the_victim():
    sched = make_scheduler(num_blocks=10, budget=64)
    sched.add_request(make_request("low", [1], t=0, priority=5))
    sched.add_request(make_request("high", [2], t=1, priority=0))
    out = run_step(sched)
    assert [i.request.request_id for i in out.scheduled] == ["high", "low"]
    assert [r.request_id for r in sched.running] == ["high", "low"]  # "low" is preempted first


def test_sibling_waits_for_leader_prompt_then_hits_its_blocks():
    sched = make_scheduler(num_blocks=10, budget=4)
    leader = make_request("x#0", range(10), t=0)
    sibling = make_request("x#1", range(10), t=0)
    sibling.wait_for = leader
    sched.add_request(leader)
    sched.add_request(sibling)
    out = run_step(sched)
    assert [i.request.request_id for i in out.scheduled] == ["x#0"]  # the budget allows only a chunk
    run_step(sched)
    out = run_step(sched)  # leader computes its last 2 prompt tokens; sibling still waits
    assert [i.request.request_id for i in out.scheduled] == ["x#0"]
    out = run_step(sched)
    sib = next(i for i in out.scheduled if i.request.request_id == "x#1")
    assert sib.start == 8 and sib.block_ids[:2] == (0, 1)  # shares the leader's two full prompt blocks


@pytest.mark.parametrize(
    ("params", "tokens", "reason", "count"),
    [
        ({}, [5, 5, EOS], RequestStatus.FINISHED_STOPPED, 3),
        ({"ignore_eos": True, "max_tokens": 4}, [EOS] * 4, RequestStatus.FINISHED_LENGTH, 4),
        ({"min_tokens": 2}, [EOS, EOS, EOS], RequestStatus.FINISHED_STOPPED, 2),
        ({"stop_token_ids": [6]}, [5, 6], RequestStatus.FINISHED_STOPPED, 2),
        ({"max_tokens": 3}, [1, 2, 3], RequestStatus.FINISHED_LENGTH, 3),
    ],
)
def test_stop_conditions(params, tokens, reason, count):
    sched = make_scheduler()
    max_tokens = params.pop("max_tokens", 8)
    request = make_request("r", [1, 2], t=0, max_tokens=max_tokens, **params)
    sched.add_request(request)
    for token in tokens:
        if request.status.finished:
            break
        run_step(sched, token)
    assert request.status == reason
    assert request.num_output_tokens == count
    assert sched.kv_cache.num_free_blocks() == 10


def test_context_limit_finishes_with_length():
    sched = make_scheduler(max_len=6)
    request = make_request("r", [1, 2, 3, 4], t=0, max_tokens=100)
    sched.add_request(request)
    for _ in range(5):
        run_step(sched)
    assert request.status == RequestStatus.FINISHED_LENGTH and request.num_tokens == 6


def test_abort_waiting_and_running_returns_every_block():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("a", range(8), t=0))
    sched.add_request(make_request("b", range(20, 28), t=1))
    run_step(sched)  # a running, b waiting (budget)
    sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks() == 10
    assert set(sched.schedule().finished_ids) == {"a", "b"}


def test_a_request_waiting_for_room_is_counted_once_in_prefix_stats():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    sched.add_request(make_request("a", range(12), t=0, max_tokens=4))  # 3 of the 4 blocks
    sched.add_request(make_request("b", range(100, 112), t=1, max_tokens=4))  # needs 3: must wait
    for _ in range(3):
        out = run_step(sched)
        assert [i.request.request_id for i in out.scheduled] == ["a"]
    assert sched.kv_cache.stats().prefix_queries == 12  # a's lookup only, not b's three attempts
    while sched.has_unfinished_requests():
        run_step(sched)
    assert sched.kv_cache.stats().prefix_queries == 12 + 12


# --- overlapped steps: the next step is scheduled before this one's tokens reach the host ------------


def test_a_decode_is_scheduled_again_before_its_token_arrives():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2, 3], t=0))
    first = sched.schedule()
    second = sched.schedule()  # step 1 still in flight: its token is pending
    assert summary(first) == [("a", 0, 3, (0,), True)]
    assert summary(second) == [("a", 3, 1, (0,), True)]
    request = sched.requests["a"]
    assert request.num_pending_tokens == 2 and request.num_computed_tokens == 4
    assert sched.update(first, {"a": 7}) == [request]
    assert request.output_token_ids == [7] and request.num_pending_tokens == 1
    sched.update(second, {"a": 8})
    assert request.all_token_ids == [1, 2, 3, 7, 8] and request.num_pending_tokens == 0


def test_a_request_whose_pending_token_is_its_last_is_not_scheduled_again():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2, 3], t=0, max_tokens=1))
    sched.add_request(make_request("b", [4, 5, 6], t=1, max_tokens=5))
    first = sched.schedule()
    assert [i.request.request_id for i in sched.schedule().scheduled] == ["b"]
    sched.update(first, {"a": 7, "b": 7})
    assert "a" not in sched.requests and sched.kv_cache.block_ids("a") == ()
    assert sched.requests["b"].num_pending_tokens == 1


def test_a_stop_seen_late_drops_the_extra_token_and_frees_the_blocks():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2, 3], t=0))
    first = sched.schedule()
    second = sched.schedule()  # schedules "a" again: its EOS is not known yet
    (request,) = sched.update(first, {"a": EOS})
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert sched.update(second, {"a": 7}) == []  # the extra step's token is dropped
    assert request.output_token_ids == [EOS]
    assert sched.kv_cache.num_free_blocks() == 10 and not sched.has_unfinished_requests()


def test_a_request_preempted_with_a_token_in_flight_waits_for_it_before_recompute():
    sched = make_scheduler(num_blocks=2, budget=16)
    sched.add_request(make_request("a", [1, 2, 3, 4], t=0))
    sched.add_request(make_request("b", [5, 6, 7], t=1))
    first = sched.schedule()  # a: 1 block, b: 1 block; the pool is full
    second = sched.schedule()  # a needs a second block for its 5th token: b is preempted
    assert [i.request.request_id for i in second.scheduled] == ["a"]
    assert second.preempted_ids == ("b",)
    b = sched.requests["b"]
    assert b.status == RequestStatus.WAITING and b.num_pending_tokens == 1
    # Not readmitted while its sampled token is unknown: a prefill needs every id on the host.
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.schedule().scheduled == ()
    sched.update(first, {"a": 8, "b": 9})
    assert b.all_token_ids == [5, 6, 7, 9] and b.num_pending_tokens == 0
    (item,) = sched.schedule().scheduled
    assert (item.request.request_id, item.start, item.num_new_tokens, item.sample) == ("b", 0, 4, True)


def test_arrivals_are_admitted_together_every_admission_interval_steps():
    kv = KVCacheManager(40, 4)
    sched = Scheduler(SchedulerConfig(8, 64, 64, admission_interval=3), kv)
    sched.add_request(make_request("a", [1, 2, 3], t=0, max_tokens=20))
    assert [i.request.request_id for i in run_step(sched).scheduled] == ["a"]  # idle: admitted at once
    sched.add_request(make_request("b", [4, 5], t=1))
    assert [i.request.request_id for i in run_step(sched).scheduled] == ["a"]
    sched.add_request(make_request("c", [6, 7], t=2))
    assert [i.request.request_id for i in run_step(sched).scheduled] == ["a"]
    # The third step since "a" was admitted takes both arrivals in one step.
    assert [i.request.request_id for i in run_step(sched).scheduled] == ["a", "b", "c"]
    sched.add_request(make_request("d", [8, 9], t=3))
    assert [[i.request.request_id for i in run_step(sched).scheduled] for _ in range(3)] == [
        ["a", "b", "c"],
        ["a", "b", "c"],
        ["a", "b", "c", "d"],
    ]


def test_step_totals_count_non_empty_steps_their_sequences_and_tokens():
    sched = make_scheduler(budget=16)
    run_step(sched)  # nothing to run: not a step
    sched.add_request(make_request("a", range(10), 0.0))
    sched.add_request(make_request("b", range(20, 30), 1.0))
    run_step(sched)  # a's 10 prompt tokens, then 6 of b's
    run_step(sched)  # a decodes, b's last 4 prompt tokens
    assert (sched.num_steps, sched.num_step_seqs, sched.num_step_tokens) == (2, 4, 21)


# -- fair share between owners ----------------------------------------------------------------------------
def owned(rid, owner, t, prompt=(1, 2), max_tokens=50):
    request = make_request(rid, prompt, t, max_tokens=max_tokens, ignore_eos=True)
    request.owner = owner
    return request


def test_a_starved_owner_takes_a_slot_from_the_owner_running_the_most_at_once():
    sched = make_scheduler(num_blocks=40, max_seqs=4, budget=64)
    for i in range(6):  # one client's request of 6 sequences fills every slot
        sched.add_request(owned(f"big{i}", "big", t=i))
    run_step(sched)
    assert [r.request_id for r in sched.running] == ["big0", "big1", "big2", "big3"]
    sched.add_request(owned("small", "small", t=10))
    out = run_step(sched)
    # The newest of big's sequences gives way; small is admitted in this very step, before big4/big5 that
    # arrived first, and before big3 goes back in.
    assert out.preempted_ids == ("big3",)
    assert [i.request.request_id for i in out.scheduled] == ["big0", "big1", "big2", "small"]
    assert [r.request_id for r in sched.waiting] == ["big3", "big4", "big5"]


def test_every_owner_keeps_one_sequence_and_one_sequence_owners_are_plain_fcfs():
    sched = make_scheduler(num_blocks=40, max_seqs=2, budget=64)
    sched.add_request(owned("a", "a", t=0))
    sched.add_request(owned("b", "b", t=1))
    sched.add_request(owned("c", "c", t=2))
    run_step(sched)
    out = run_step(sched)
    # Each owner runs one sequence: nobody is preempted for c, which waits its turn (FCFS).
    assert out.preempted_ids == () and [r.request_id for r in sched.running] == ["a", "b"]


def test_sequences_of_an_owner_with_fewer_running_are_admitted_first():
    sched = make_scheduler(num_blocks=40, max_seqs=4, budget=64)
    for i in range(3):
        sched.add_request(owned(f"x{i}", "x", t=i))
    run_step(sched)  # x runs 3 of 4 slots
    sched.add_request(owned("x3", "x", t=3))
    sched.add_request(owned("y0", "y", t=4))
    out = run_step(sched)
    # One slot is free: y (running nothing) gets it although x3 arrived first.
    assert [i.request.request_id for i in out.scheduled][-1] == "y0"
    assert out.preempted_ids == ()


def test_token_times_are_the_first_and_latest_token_arrivals():
    sched = make_scheduler(budget=16)
    request = make_request("a", [1, 2, 3], t=0, max_tokens=3)
    sched.add_request(request)
    m = request.metrics
    run_step(sched)
    assert m.first_scheduled_time is not None and m.first_token_time is not None
    assert m.first_scheduled_time <= m.first_token_time == m.last_token_time
    first = m.first_token_time
    run_step(sched)
    run_step(sched)
    assert request.status.finished and m.first_token_time == first
    assert first < m.last_token_time <= m.finished_time
