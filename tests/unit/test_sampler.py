"""Sampler: greedy, each filter against hand-computed distributions, seeding, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from kiln.engine.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_min_p,
    apply_top_k_top_p,
    make_generator,
)
from kiln.engine.sampling_params import SamplingParams

V = 8


def row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    eos: list[int] | None = None,
    **params,
) -> SamplingRow:
    return SamplingRow(
        params=SamplingParams(**params),
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
        generator=generator,
        eos_token_ids=eos or [],
    )


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    batch = SamplingBatch.build(rows, logits.shape[1], "cpu")
    return Sampler()(logits.clone(), batch)


def probs_of(masked_logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(masked_logits, dim=-1)


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    out = sample(logits, [row(temperature=0.0) for _ in range(5)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.topk_token_ids is None and out.ranks is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_greedy_takes_the_argmax_of_16_bit_logits_as_float32_would(dtype):
    torch.manual_seed(3)
    logits = torch.randn(6, 300).to(dtype)
    logits[0, [7, 100, 299]] = logits[0].max() + 1  # a tie: the first index wins
    logits[1, [40, 250]] = torch.tensor([8.0, 8.0625], dtype=dtype)  # one bfloat16 step apart
    logits[2, :] = 0.0  # all tied
    batch = SamplingBatch.build([row(temperature=0.0) for _ in range(6)], 300, "cpu")
    assert batch.plain_greedy
    out = Sampler()(logits.clone(), batch)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.tolist() == logits.float().argmax(-1).tolist()
    assert out.token_ids[:3].tolist() == [7, 250, 0]
    # The widened path (a logprob asked) samples the same tokens from the same 16-bit logits.
    widened = sample(logits, [row(temperature=0.0, logprobs=1) for _ in range(6)])
    assert widened.token_ids.tolist() == out.token_ids.tolist()


def test_plain_greedy_only_when_nothing_edits_or_reads_the_logits():
    def flag(*rows):
        return SamplingBatch.build(list(rows), V, "cpu").plain_greedy

    assert flag(row(temperature=0.0), row(temperature=0.0, top_k=3, top_p=0.5))  # greedy ignores filters
    assert not flag(row(temperature=0.0), row(temperature=0.7))
    assert not flag(row(temperature=0.0, logprobs=0))
    assert not flag(row(temperature=0.0, logit_bias={3: 5.0}))
    assert not flag(row(temperature=0.0, min_tokens=2, eos=[1]))
    assert not flag(row(temperature=0.0, output=[1], presence_penalty=0.5))
    assert not flag(row(temperature=0.0, repetition_penalty=1.2))
    batch = SamplingBatch.build([row(temperature=0.0)], V, "cpu")
    batch.token_mask = torch.zeros((1, 1), dtype=torch.int32)
    assert not batch.plain_greedy


def test_greedy_rows_ignore_filters_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    rows = [row(temperature=0.0, top_k=3, top_p=0.5), row(temperature=1.0), row(temperature=0.0), row()]
    out = sample(logits, rows)
    assert out.token_ids[[0, 2]].tolist() == logits[[0, 2]].argmax(-1).tolist()


def test_top_k_1_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(6, 300)
    out = sample(logits, [row(temperature=1.5, top_k=1) for _ in range(6)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_distribution_by_hand():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    masked = apply_top_k_top_p(p.log(), torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(probs_of(masked), torch.tensor([[4 / 7, 3 / 7, 0, 0], [0.1, 0.2, 0.3, 0.4]]))


def test_top_p_distribution_by_hand():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    masked = apply_top_k_top_p(p.log(), torch.zeros(3, dtype=torch.int64), torch.tensor([0.6, 0.75, 0.4]))
    expected = torch.tensor([[4 / 7, 3 / 7, 0, 0], [0, 2 / 9, 3 / 9, 4 / 9], [1.0, 0, 0, 0]])
    assert torch.allclose(probs_of(masked), expected)


def test_top_p_applies_after_top_k():
    # top-k 3 renormalizes [0.4, 0.3, 0.2] to [4/9, 3/9, 2/9]; top-p 0.7 then keeps the first two (mass 7/9).
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    masked = apply_top_k_top_p(p.log(), torch.tensor([3]), torch.tensor([0.7]))
    assert torch.allclose(probs_of(masked), torch.tensor([[4 / 7, 3 / 7, 0, 0]]))


def test_min_p_distribution_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    masked = apply_min_p(p.log(), torch.tensor([0.5, 0.0]))
    assert torch.allclose(probs_of(masked), torch.tensor([[5 / 8, 3 / 8, 0, 0], [0.5, 0.3, 0.15, 0.05]]))


def test_filters_restrict_what_is_sampled():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(200, 1)
    torch.manual_seed(0)
    assert set(sample(logits, [row(top_k=2)] * 200).token_ids.tolist()) == {0, 1}
    assert set(sample(logits, [row(top_p=0.6)] * 200).token_ids.tolist()) == {0, 1}
    assert set(sample(logits, [row(min_p=0.6)] * 200).token_ids.tolist()) == {0, 1}


def test_sampling_frequencies_match_softmax():
    # Chi-square goodness of fit with 6 - 1 degrees of freedom; 20.5 is the 0.999 quantile.
    torch.manual_seed(1234)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    for temperature in (1.0, 0.7):
        n = 4000
        out = sample(base.repeat(n, 1), [row(temperature=temperature)] * n)
        counts = torch.bincount(out.token_ids, minlength=6).double()
        expected = torch.softmax(base / temperature, -1).double() * n
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 20.5, (temperature, counts, expected)


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    torch.manual_seed(0)
    target = torch.randn(1, 1000)
    others = torch.randn(3, 1000)

    def run(order: list[str]) -> int:
        logits, rows = [], []
        for name in order:
            if name == "seeded":
                logits.append(target[0])
                rows.append(row(generator=make_generator(42, "cpu"), temperature=1.0))
            else:
                logits.append(others[int(name)])
                rows.append(row(temperature=1.0, top_k=50, generator=make_generator(int(name) + 7, "cpu")))
        return sample(torch.stack(logits), rows).token_ids[order.index("seeded")].item()

    results = {run(o) for o in (["seeded"], ["0", "seeded", "1"], ["2", "1", "0", "seeded"])}
    assert len(results) == 1
    # ...and among unseeded neighbours drawing from the global RNG.
    mixed = sample(
        torch.cat([others, target]),
        [row(), row(), row(), row(generator=make_generator(42, "cpu"))],
    )
    assert mixed.token_ids[3].item() in results


def test_a_seeded_generator_advances_between_steps():
    torch.manual_seed(0)
    logits = torch.zeros(1, 1000)  # uniform: successive draws from one stream differ
    gen = make_generator(3, "cpu")
    draws = [sample(logits, [row(generator=gen)]).token_ids.item() for _ in range(4)]
    again = make_generator(3, "cpu")
    assert draws == [sample(logits, [row(generator=again)]).token_ids.item() for _ in range(4)]
    assert len(set(draws)) > 1


def test_make_generator_none_without_seed():
    assert make_generator(None, "cpu") is None
    assert isinstance(make_generator(0, "cpu"), torch.Generator)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(2, 30) * 3
    prompt, output = [[1, 2, 3, 3], [7]], [[4, 1], [8, 9, 9]]
    penalties = [1.3, 0.8]
    rows = [
        row(prompt=prompt[i], output=output[i], temperature=0.0, repetition_penalty=penalties[i], logprobs=0)
        for i in range(2)
    ]
    out = sample(logits, rows)
    for i in range(2):
        ids = torch.tensor([prompt[i] + output[i]])
        ref = RepetitionPenaltyLogitsProcessor(penalties[i])(ids, logits[i : i + 1].clone())
        assert torch.allclose(out.logprobs[i], torch.log_softmax(ref, -1)[0, out.token_ids[i]])
        assert out.token_ids[i].item() == ref.argmax().item()


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.zeros(1, V)
    output = [1, 1, 1, 2, 5]
    prompt = [3, 3, 3]  # prompt tokens do not count for presence/frequency
    out = sample(
        logits,
        [
            row(
                prompt=prompt,
                output=output,
                temperature=0.0,
                presence_penalty=0.5,
                frequency_penalty=0.25,
                logprobs=V,
            )
        ],
    )
    expected = torch.zeros(V)
    for token in set(output):
        expected[token] -= 0.5 + 0.25 * output.count(token)
    lp = dict(zip(out.topk_token_ids[0].tolist(), out.topk_logprobs[0].tolist(), strict=True))
    ref = torch.log_softmax(expected, -1)
    for token in range(V):
        assert lp[token] == pytest.approx(ref[token].item(), abs=1e-6)


def test_logprobs_ranks_and_topk():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    rows = [row(temperature=0.0, logprobs=2), row(temperature=1.0, top_k=1, logprobs=0)]
    out = sample(logits, rows)
    ref = torch.log_softmax(logits, -1)
    assert out.token_ids.tolist() == [1, 2]
    assert torch.allclose(out.logprobs, ref[[0, 1], [1, 2]])
    assert out.ranks.tolist() == [1, 1]
    assert out.topk_token_ids.tolist() == [[1, 2], [2, 3]]
    assert torch.allclose(out.topk_logprobs, ref.topk(2, -1).values)


def test_rank_of_a_sampled_unlikely_token_and_logprobs_before_temperature():
    # logit_bias forces token 0, the least likely of the raw logits; logprobs include the bias, not temperature.
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    out = sample(logits, [row(temperature=0.5, logit_bias={0: 100.0}, logprobs=1)])
    biased = torch.tensor([[100.0, 3.0, 2.0, 1.0]])
    assert out.token_ids.tolist() == [0]
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(biased, -1)[0, 0].item())
    out = sample(logits, [row(temperature=0.0, logit_bias={1: -100.0, 2: -100.0}, logprobs=1)])
    assert out.token_ids.tolist() == [3]
    assert out.ranks.tolist() == [1]


def test_rank_counts_more_likely_tokens():
    # A sampled token that is not the argmax has rank 1 + the number of tokens more likely than it.
    torch.manual_seed(5)
    logits = torch.tensor([[1.0, 1.1, 0.9, 1.05]]).repeat(50, 1)
    out = sample(logits, [row(logprobs=0)] * 50)
    order = {tok: r + 1 for r, tok in enumerate(logits[0].argsort(descending=True).tolist())}
    assert out.ranks.tolist() == [order[t] for t in out.token_ids.tolist()]
    assert len(set(out.ranks.tolist())) > 1


def test_logit_bias_sparse_per_row():
    logits = torch.zeros(3, V)
    rows = [
        row(temperature=0.0, logit_bias={5: 10.0}),
        row(temperature=0.0, logit_bias={2: 1.0}),
        row(temperature=0.0),
    ]
    assert sample(logits, rows).token_ids.tolist() == [5, 2, 0]


def test_allowed_token_ids_restrict_only_their_rows():
    torch.manual_seed(3)
    logits = torch.randn(4, 50)
    rows = [
        row(temperature=0.0, allowed_token_ids=[3, 9, 17], logprobs=2),
        row(temperature=5.0, allowed_token_ids=[40, 41]),
        row(temperature=0.0),
        row(temperature=0.0, allowed_token_ids=[3], logit_bias={4: 100.0}),  # a bias cannot reopen a token
    ]
    batch = SamplingBatch.build(rows, 50, "cpu")
    assert not batch.plain_greedy and batch.unrestricted.tolist() == [False, False, True, False]
    picks = [Sampler()(logits.clone(), batch).token_ids.tolist() for _ in range(20)]
    best = [3, 9, 17][logits[0, [3, 9, 17]].argmax()]
    assert all(p[0] == best and p[1] in (40, 41) and p[2] == logits[2].argmax() and p[3] == 3 for p in picks)
    assert {p[1] for p in picks} == {40, 41}  # hot enough to draw both
    out = Sampler()(logits.clone(), batch)
    # Logprobs are over the allowed tokens: they sum to one there.
    kept = torch.log_softmax(logits[0, [3, 9, 17]], -1)
    assert out.logprobs[0].item() == pytest.approx(kept.max().item(), abs=1e-5)
    assert set(out.topk_token_ids[0].tolist()) <= {3, 9, 17}


def test_logit_bias_out_of_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingBatch.build([row(logit_bias={V: 1.0})], V, "cpu")


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.full((1, V), -5.0)
    logits[0, 7] = 10.0  # EOS is overwhelmingly likely
    logits[0, 6] = 9.0  # then a stop token id
    eos = [7]

    def pick(output: list[int], **params) -> int:
        return sample(logits, [row(output=output, eos=eos, temperature=0.0, **params)]).token_ids.item()

    assert pick([], min_tokens=2, stop_token_ids=[6]) not in (6, 7)
    assert pick([1], min_tokens=2, stop_token_ids=[6]) not in (6, 7)
    assert pick([1, 2], min_tokens=2, stop_token_ids=[6]) == 7
    # ignore_eos: EOS is not a stop, so it is not suppressed; the stop token id still is.
    assert pick([], min_tokens=2, stop_token_ids=[6], ignore_eos=True) == 7
    assert pick([], min_tokens=0) == 7


def test_batch_build_skips_unneeded_stages():
    batch = SamplingBatch.build([row(temperature=0.0, top_k=5), row(temperature=0.0)], V, "cpu")
    assert batch.all_greedy and not batch.do_top_k and not batch.do_penalties
    assert (
        batch.output_token_ids is None and batch.prompt_token_ids is None and batch.max_num_logprobs is None
    )
    batch = SamplingBatch.build(
        [row(output=[1, 2, 3], frequency_penalty=1.0), row(logprobs=3), row(logprobs=1)], V, "cpu"
    )
    assert batch.do_penalties and not batch.do_repetition_penalty and batch.max_num_logprobs == 3
    assert batch.output_token_ids.tolist() == [[1, 2, 3], [V, V, V], [V, V, V]]


def test_sampled_tokens_are_never_masked_ones():
    torch.manual_seed(9)
    logits = torch.randn(64, 500)
    rows = [row(temperature=2.0, top_k=5, top_p=0.9, min_p=0.05) for _ in range(64)]
    out = sample(logits, rows)
    top5 = logits.topk(5, -1).indices
    assert all(out.token_ids[i].item() in top5[i].tolist() for i in range(64))
