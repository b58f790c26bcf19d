"""Timing and result records shared by the benchmarks.

Rules: device work is timed with CUDA events through `triton.testing.do_bench` (median, L2 flushed
between repetitions); whole generations with a host clock after `torch.cuda.synchronize()`. Every
measurement is one `Result` row; a run's rows plus the device description make one JSON file.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(slots=True)
class Result:
    suite: str  # "kernels" | "hf" | "kiln"
    name: str  # what ran, e.g. "decode_attention/triton"
    shape: str  # the model shape or problem size
    metric: str  # "us", "ms_per_token", "output_tok_per_s", ...
    value: float
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sms"] = props.multi_processor_count
    return info


def bench_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median microseconds of fn() on the GPU (CUDA events; the L2 cache is flushed before each call)."""
    from triton.testing import do_bench

    return 1000.0 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median microseconds of fn() replayed from a CUDA graph: the GPU time without host launch cost."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1000.0 * do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def write_results(path: Path, results: list[Result], extra: dict[str, Any] | None = None) -> None:
    """Write (or extend, if the file exists) a results JSON: {"device": ..., "results": [...]}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"device": device_info(), "results": []}
    if path.exists():
        data = json.loads(path.read_text())
    data["results"].extend(asdict(r) for r in results)
    if extra:
        data.setdefault("extra", {}).update(extra)
    path.write_text(json.dumps(data, indent=1) + "\n")
