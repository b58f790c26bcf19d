"""Piecewise graphs' plumbing on CPU: static buffers, padding to a bucket, attention between pieces.

CUDA graphs cannot be captured here, so each "graph" is stood in for by re-running its piece on the
same static buffers, which is what a replay does; the engine's tokens must not change. The captured
version runs on the GPU in tests/gpu/test_engine_gpu.py.
"""

from __future__ import annotations

import torch

from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.piecewise_graphs import PiecewiseGraphs
from kiln.engine.sampling_params import SamplingParams


class _Replay:
    """Stands in for a captured piece: replay runs it again on the static buffers."""

    def __init__(self, graphs: PiecewiseGraphs, index: int, size: int, held: torch.Tensor | None) -> None:
        self.graphs, self.index, self.size, self.held = graphs, index, size, held

    def replay(self) -> None:
        output = self.graphs._piece(self.index, self.size)
        if self.held is not None:  # a graph's output tensor is rewritten in place at each replay
            self.held.copy_(output)


@torch.inference_mode()
def _emulate_capture(graphs: PiecewiseGraphs) -> None:
    last = graphs.model.num_pieces - 1
    for size in graphs.buckets:
        outputs = [graphs._piece(index, size) for index in range(last + 1)]
        replays = [_Replay(graphs, i, size, outputs[i] if i == last else None) for i in range(last + 1)]
        graphs._graphs[size] = (replays, outputs[last])  # type: ignore[assignment]


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=10)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    waiting = list(enumerate(prompts))
    while waiting or engine.has_unfinished_requests():
        if waiting:  # one arrival per step: every step mixes a prefill into the decodes
            i, prompt = waiting.pop(0)
            engine.add_request(str(i), params=params, prompt_token_ids=prompt)
        for out in engine.step():
            tokens[out.request_id].extend(out.outputs[0].token_ids)
    return [tokens[str(i)] for i in range(len(prompts))]


def test_pieces_with_attention_between_them_give_the_forward_s_tokens(tiny_gqa_dir):
    prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
    options = EngineConfig(device="cpu", block_size=4, max_num_batched_tokens=40)
    expected = _run(LLMEngine.from_path(tiny_gqa_dir, options), prompts)

    engine = LLMEngine.from_path(tiny_gqa_dir, options)
    runner = engine.runner
    graphs = PiecewiseGraphs(runner.model, runner.kv_caches, max_tokens=40, device=torch.device("cpu"))
    assert graphs.buckets == [16, 32, 40]
    _emulate_capture(graphs)
    used: list[int] = []
    real_run = graphs.run
    graphs.run = lambda ids, *a: used.append(ids.shape[0]) or real_run(ids, *a)  # type: ignore[method-assign]
    runner.piecewise_graphs = graphs
    assert _run(engine, prompts) == expected
    # Mixed steps of several sizes went through the pieces, padded to 16, 32 or 40 tokens.
    assert len(used) > 10 and len({graphs.bucket_for(n) for n in used}) >= 2
