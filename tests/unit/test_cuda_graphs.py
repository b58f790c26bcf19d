import gc

import pytest
import torch

from kiln.engine import cuda_graphs
from kiln.engine.cuda_graphs import (
    BucketedGraphs,
    DecodeLayout,
    PrefillLayout,
    TokenBuffers,
    batch_buckets,
)
from kiln.kernels.attention_metadata import AttentionMetadata


def test_batch_buckets_cover_every_size_up_to_the_max():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    buckets = batch_buckets(256)
    assert buckets[-1] == 256 and len(buckets) == 4 + 15 + 1
    for n in range(1, 257):  # every batch size has a bucket at most 16 above it
        assert 0 <= min(b for b in buckets if b >= n) - n < 16


def test_token_buckets_are_powers_of_two_from_16_and_the_max():
    from kiln.engine.cuda_graphs import token_buckets

    assert token_buckets(2) == [2]
    assert token_buckets(16) == [16]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(512) == [16, 32, 64, 128, 256, 512]


def test_a_step_runs_in_the_smallest_captured_bucket_that_holds_it():
    from kiln.engine.cuda_graphs import smallest_bucket

    buckets = [1, 2, 4, 8, 16]
    assert [smallest_bucket(buckets, set(buckets), n) for n in (1, 3, 8, 9, 16)] == [1, 4, 8, 16, 16]
    assert smallest_bucket(buckets, set(buckets), 17) is None  # larger than every bucket: eager
    assert smallest_bucket(buckets, {1, 2, 16}, 3) is None  # its bucket was not captured: eager


def test_mixed_buckets_are_fine_grained_past_128_tokens():
    from kiln.engine.piecewise_graphs import mixed_buckets

    assert mixed_buckets(16) == [16]
    assert mixed_buckets(100) == [16, 32, 64, 100]
    assert mixed_buckets(256) == [16, 32, 64, 128, 192, 256]
    assert mixed_buckets(300) == [16, 32, 64, 128, 192, 256, 300]
    assert mixed_buckets(1024)[-3:] == [896, 960, 1024]


# --- BucketedGraphs on CPU: the layouts' buffers, capture order and replay, with stand-ins for CUDA ---

CPU = torch.device("cpu")


def _meta(
    seq_lens: list[int], query_lens: list[int], tables: list[list[int]], slots: list[int]
) -> AttentionMetadata:
    block_tables = torch.tensor(tables, dtype=torch.int32)
    return AttentionMetadata.for_batch(query_lens, seq_lens, block_tables, 4, torch.tensor(slots))


def _shares_memory(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_a_decode_bucket_is_captured_as_one_token_per_row_over_the_longest_context():
    layout = DecodeLayout(max_batch_size=20, max_model_len=30, block_size=4, device=CPU)
    assert layout.buckets == [1, 2, 4, 8, 16, 20]
    assert layout.block_tables.shape == (20, 8)
    slots = torch.full((20,), -1, dtype=torch.int64)
    meta = layout.capture_metadata(slots[:4], 4)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4] and meta.query_start_loc_cpu == [0, 1, 2, 3, 4]
    assert meta.seq_lens.tolist() == [1, 1, 1, 1] and meta.seq_lens_cpu == [30] * 4
    assert meta.block_tables.shape == (4, 8)
    assert (meta.max_query_len, meta.max_seq_len, meta.block_size, meta.num_seqs) == (1, 30, 4, 4)
    # The graph reads the static buffers, so later loads reach it.
    for view, buffer in ((meta.seq_lens, layout.seq_lens), (meta.block_tables, layout.block_tables)):
        assert _shares_memory(view, buffer)
    assert meta.slot_mapping.data_ptr() == slots.data_ptr()


def test_a_decode_step_pads_its_bucket_with_dummy_decodes_of_context_1():
    layout = DecodeLayout(max_batch_size=8, max_model_len=32, block_size=4, device=CPU)
    layout.load(_meta([9, 10, 11, 12], [1] * 4, [[1, 2, 3]] * 4, [0] * 4), 4, 4)
    layout.load(_meta([5, 6, 7], [1] * 3, [[7, 8], [9, 0], [4, 5]], [0] * 3), 3, 4)
    assert layout.seq_lens[:4].tolist() == [5, 6, 7, 1]  # the 4th row, an earlier step's, is a dummy now
    assert layout.block_tables[:3, :3].tolist() == [[7, 8, 3], [9, 0, 3], [4, 5, 3]]  # past the width: stale
    assert layout.query_start_loc.tolist() == list(range(9))  # never rewritten
    assert layout.covers(_meta([5], [1], [[1]], [0]))
    assert not layout.covers(_meta([5, 3], [1, 2], [[1], [2]], [0, 1, 2]))


def test_a_short_context_decode_family_is_captured_at_its_bound_and_covers_only_steps_within_it():
    layout = DecodeLayout(max_batch_size=8, max_model_len=32, block_size=4, device=CPU, max_seq_len=12)
    assert layout.name == "decode (contexts <= 12)" and layout.max_seq_len == 12
    assert layout.block_tables.shape == (8, 8)  # as wide as the longest context: any step's table fits
    meta = layout.capture_metadata(torch.full((2,), -1, dtype=torch.int64), 2)
    assert (meta.max_seq_len, meta.seq_lens_cpu) == (12, [12, 12])  # attention picks its tile for 12
    assert layout.covers(_meta([12, 5], [1, 1], [[1, 2, 3], [4, 5, 0]], [0, 1]))
    assert not layout.covers(_meta([13, 5], [1, 1], [[1, 2, 3, 4], [5, 6, 0, 0]], [0, 1]))
    full = DecodeLayout(max_batch_size=8, max_model_len=32, block_size=4, device=CPU)
    assert full.name == "decode" and full.max_seq_len == 32
    assert full.covers(_meta([13, 5], [1, 1], [[1, 2, 3, 4], [5, 6, 0, 0]], [0, 1]))
    # A bound past the model's context is the model's context.
    assert (
        DecodeLayout(max_batch_size=8, max_model_len=32, block_size=4, device=CPU, max_seq_len=64).name
        == "decode"
    )


def test_a_prefill_bucket_is_captured_as_one_uncached_prompt_of_the_bucket_s_tokens():
    layout = PrefillLayout(max_tokens=100, max_model_len=30, block_size=4, device=CPU)
    assert layout.buckets == [16, 32, 64, 100]
    slots = torch.full((100,), -1, dtype=torch.int64)
    meta = layout.capture_metadata(slots[:32], 32)
    assert meta.query_start_loc.tolist() == [0, 32] and meta.query_start_loc_cpu == [0, 32]
    assert meta.seq_lens.tolist() == [32] and meta.seq_lens_cpu == [30]
    assert meta.block_tables.shape == (1, 8)
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs) == (32, 30, 1)
    assert meta.query_start_loc is layout.query_start_loc and meta.seq_lens is layout.seq_lens


def test_a_prefill_step_leaves_its_padding_tokens_outside_the_query_range():
    layout = PrefillLayout(max_tokens=64, max_model_len=32, block_size=4, device=CPU)
    layout.capture_metadata(torch.full((64,), -1, dtype=torch.int64), 64)
    layout.load(_meta([25], [13], [[3, 4, 5, 6, 7, 8, 9]], list(range(12, 25))), 13, 16)
    assert layout.query_start_loc.tolist() == [0, 13]  # tokens 13..15 of the bucket attend to nothing
    assert layout.seq_lens.tolist() == [25]
    assert layout.block_tables.tolist() == [[3, 4, 5, 6, 7, 8, 9, 0]]
    assert not layout.covers(_meta([5, 3], [2, 2], [[1], [2]], [0, 1, 2, 3]))


def test_token_buffers_give_the_padding_of_a_bucket_slot_minus_1():
    tokens = TokenBuffers(8, CPU)
    tokens.load(torch.arange(1, 7), torch.arange(10, 16), torch.arange(20, 26), 8)
    tokens.load(torch.tensor([7, 8]), torch.tensor([30, 31]), torch.tensor([40, 41]), 4)
    assert tokens.slot_mapping[:4].tolist() == [40, 41, -1, -1]
    assert tokens.input_ids[:4].tolist() == [7, 8, 3, 4]  # an earlier step's: valid, never read
    assert tokens.positions[:4].tolist() == [30, 31, 12, 13]


def _model(
    ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata
) -> torch.Tensor:
    """Stands in for the model: each token's "hidden state" is its id and position."""
    return torch.stack([ids, positions], dim=1)


class _Graph:
    """Stands in for a captured graph: a replay re-runs the forward on the static buffers into the
    captured output tensor, and records what the buffers held."""

    def __init__(self, graphs: BucketedGraphs, forward, output: torch.Tensor, log: list[tuple]) -> None:
        self.graphs, self.forward, self.output, self.log = graphs, forward, output, log

    def replay(self) -> None:
        size = self.output.shape[0]
        slots = self.graphs.tokens.slot_mapping[:size].tolist()
        self.log.append((size, slots, self.graphs.layout.seq_lens.tolist()))  # type: ignore[attr-defined]
        with torch.inference_mode():  # as the runner's step is; the output was made under it at capture
            self.output.copy_(self.forward())


def _capture_on_cpu(monkeypatch: pytest.MonkeyPatch, graphs: BucketedGraphs) -> list[tuple]:
    """Capture with CUDA's pool, stream and graph stood in for; returns, per capture in order, the bucket,
    the pool and stream it used and the query range and longest query the forward saw."""
    captures: list[tuple] = []
    replays: list[tuple] = []

    def capture_graph(forward, pool, stream):
        meta = forward.args[3]
        output = forward()
        captures.append((output.shape[0], pool, stream, meta.query_start_loc.tolist(), meta.max_query_len))
        return _Graph(graphs, forward, output, replays), output

    monkeypatch.setattr(cuda_graphs, "capture_graph", capture_graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda: "stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    graphs.capture()
    graphs.replays = replays  # type: ignore[attr-defined]
    return captures


def test_graphs_are_captured_largest_first_into_one_pool(monkeypatch):
    layout = PrefillLayout(max_tokens=64, max_model_len=64, block_size=4, device=CPU)
    graphs = BucketedGraphs(_model, [], layout)  # type: ignore[arg-type]
    captures = _capture_on_cpu(monkeypatch, graphs)
    assert [c[0] for c in captures] == [64, 32, 16]
    assert {(c[1], c[2]) for c in captures} == {("pool", "stream")}
    # Each prefill bucket saw its own query range at capture, max_query_len the bucket's tokens.
    assert [(c[3], c[4]) for c in captures] == [([0, 64], 64), ([0, 32], 32), ([0, 16], 16)]


def test_a_decode_step_replays_the_smallest_captured_bucket_and_returns_its_real_rows(monkeypatch):
    layout = DecodeLayout(max_batch_size=8, max_model_len=32, block_size=4, device=CPU)
    graphs = BucketedGraphs(_model, [], layout)  # type: ignore[arg-type]
    _capture_on_cpu(monkeypatch, graphs)
    meta = _meta([5, 6, 7], [1, 1, 1], [[1, 2], [3, 4], [5, 6]], [17, 22, 26])
    hidden = graphs.run(torch.tensor([9, 9, 9]), torch.tensor([4, 5, 6]), meta)
    assert hidden.tolist() == [[9, 4], [9, 5], [9, 6]]  # the real rows of bucket 4's output
    assert graphs.replays == [(4, [17, 22, 26, -1], [5, 6, 7, 1, 1, 1, 1, 1])]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="no decode graph"):  # a prefill is not a decode
        graphs.run(torch.tensor([9, 9]), torch.tensor([0, 1]), _meta([2], [2], [[1]], [4, 5]))
    graphs._graphs.pop(8)
    with pytest.raises(ValueError, match="5 tokens"):  # its bucket was not captured
        graphs.run(torch.arange(5), torch.arange(5), _meta([1] * 5, [1] * 5, [[1]] * 5, list(range(5))))
    assert len(graphs.replays) == 1  # type: ignore[attr-defined]


def test_a_prefill_step_of_two_requests_is_refused(monkeypatch):
    layout = PrefillLayout(max_tokens=32, max_model_len=32, block_size=4, device=CPU)
    graphs = BucketedGraphs(_model, [], layout)  # type: ignore[arg-type]
    _capture_on_cpu(monkeypatch, graphs)
    with pytest.raises(ValueError, match="no single-request prefill graph for a step of 2 requests"):
        graphs.run(torch.arange(4), torch.arange(4), _meta([2, 2], [2, 2], [[1], [2]], [4, 5, 8, 9]))
    hidden = graphs.run(
        torch.arange(20), torch.arange(20), _meta([20], [20], [[1, 2, 3, 4, 5]], list(range(20)))
    )
    assert hidden.tolist() == [[i, i] for i in range(20)]
    assert graphs.replays == [(32, list(range(20)) + [-1] * 12, [20])]  # type: ignore[attr-defined]


def test_captures_run_with_the_cyclic_collector_off_and_leave_it_as_it_was(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda: "stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    seen: list[bool] = []
    into: dict[int, None] = {}
    cuda_graphs.capture_largest_first(
        [1, 2, 4], lambda size, pool, stream: seen.append(gc.isenabled()), "pool", into
    )
    assert seen == [False, False, False] and list(into) == [4, 2, 1] and gc.isenabled()

    def fails(size, pool, stream):
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        cuda_graphs.capture_largest_first([1], fails, "pool", {})
    assert gc.isenabled()  # back on after a failed capture too
    gc.disable()
    try:
        cuda_graphs.capture_largest_first([1], lambda size, pool, stream: None, "pool", {})
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
