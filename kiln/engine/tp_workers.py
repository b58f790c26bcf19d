"""Tensor parallelism's processes: the engine's process is rank 0 and drives ranks 1..N-1, its workers.

Rules:
- Rank 0 owns the scheduler, the KV bookkeeping and the sampler; a worker only runs forward passes of its
  shard (kiln.models.parallel). Block tables and slot mappings are rank 0's, so every rank's KV cache
  (its own heads) has the same blocks.
- A worker is a fresh Python process (`subprocess`, not `multiprocessing`: the engine's own process may be
  `ProcessEngine`'s daemonic child, which may not have children). It talks to rank 0 over one socket, a
  `multiprocessing` Connection, and to every rank over the process group: gloo on the CPU, NCCL on CUDA
  with one device per rank (`cuda:<rank>`; `NCCL_NVLS_ENABLE=0` unless the user set it).
- Each step rank 0 sends the step's host inputs (`HostStep`) down every socket before it runs the step;
  each worker builds the same tensors and runs the same forward, and the collectives inside keep the
  ranks in step. KV sizing (`SizeKV`: the smallest pool any rank fits) and CUDA-graph capture are sent
  the same way, so their collectives meet too. A worker waits on its socket while the engine is idle (no
  timeout) and exits when the socket closes: rank 0 gone, nobody to serve.
- A worker that dies: rank 0's next send or collective fails at once (gloo reports the closed
  connection), and `check` names the rank in an `EngineDeadError`; the engine is dead from then on. A
  worker alive but stuck fails the collectives after `COLLECTIVE_TIMEOUT`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kiln.config import DTYPES, EngineConfig
from kiln.engine.memory_profile import num_kv_blocks_from_memory
from kiln.engine.model_runner import HostStep, ModelRunner
from kiln.engine_dir import EngineManifest, is_engine_dir
from kiln.errors import EngineDeadError, InvalidEngineError
from kiln.kernels.kernel_cache import prepare_engine_kernels
from kiln.kvcache.tensors import allocate_kv_cache
from kiln.models.loader import load_model, read_model_config
from kiln.models.parallel import TensorParallelGroup, check_tensor_parallel

# Long enough for a first CUDA step that compiles its kernels; a dead peer is noticed at once anyway.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)
_WORKER_CODE = "import sys; from kiln.engine.tp_workers import worker_main; worker_main(int(sys.argv[1]))"


@dataclass(slots=True)
class WorkerSpec:
    """What a worker builds: its rank's shard of the engine at `path`, and where the group meets."""

    path: str
    config: EngineConfig
    dtype: str
    device_type: str
    rank: int
    world: int
    store_port: int
    vocab_size: int


@dataclass(slots=True)
class SizeKV:
    """Size the KV pool (`num_kv_blocks_from_memory`'s arguments); the ranks agree on the smallest."""

    block_size: int
    max_tokens: int
    max_num_seqs: int
    cap: int


@dataclass(slots=True)
class AllocateKV:
    num_blocks: int
    block_size: int


@dataclass(slots=True)
class CaptureGraphs:
    """`ModelRunner.capture_graphs`'s arguments: every rank captures the same graphs, in the same order."""

    max_batch_size: int
    max_model_len: int
    max_prefill_tokens: int
    max_mixed_tokens: int


@dataclass(slots=True)
class StopWorker:
    pass


def tensor_parallel_size(config: EngineConfig, manifest: EngineManifest | None) -> int:
    """The knob, else what `kiln build --tp-size` recorded in the engine directory, else 1."""
    if config.tensor_parallel_size is not None:
        return config.tensor_parallel_size
    recorded = None if manifest is None else manifest.extra.get("tensor_parallel_size")
    return int(recorded or 1)


def start_workers(
    path: str | Path, config: EngineConfig, world: int, dtype: str, device: torch.device
) -> TensorParallelWorkers:
    """Check that the model at `path` shards over `world` ranks (ValueError, InvalidEngineError: why not),
    then start its workers (`TensorParallelWorkers.start`); rank 0 loads its own shard after."""
    model_config, quant = read_model_config(Path(path))
    if quant is not None:
        raise InvalidEngineError(
            f"{path}: tensor parallelism does not run quantized engines yet ({quant.scheme}); serve it with "
            "--tensor-parallel-size 1, or build it unquantized"
        )
    check_tensor_parallel(model_config, world)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(
            f"tensor_parallel_size {world} needs {world} GPUs; {torch.cuda.device_count()} visible"
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"tensor parallelism runs on cuda or cpu, not {device.type}")
    options = dataclasses.replace(config, tensor_parallel_size=world)
    return TensorParallelWorkers.start(str(path), options, dtype, device, model_config.vocab_size)


def rank_device(device_type: str, rank: int) -> torch.device:
    """One device per rank: `cuda:<rank>` on CUDA; the CPU is shared."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def make_group(
    store: Any, rank: int, world: int, device: torch.device, vocab_size: int
) -> TensorParallelGroup:
    """This rank's process group object (gloo on the CPU, NCCL on CUDA); blocks until every rank joined.
    A group object, not torch.distributed's global default group: several engines may live in one process."""
    if device.type == "cuda":
        # NCCL reads its environment in every rank's process, rank 0's included: NVLink SHARP multicast
        # stays off unless the user asked for it (the one process-wide change tensor parallelism makes).
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        group = dist.ProcessGroupNCCL(store, rank, world, options)
    else:
        group = dist.ProcessGroupGloo(store, rank, world, COLLECTIVE_TIMEOUT)
    return TensorParallelGroup(rank=rank, world=world, group=group, vocab_size=vocab_size)


class TensorParallelWorkers:
    """Rank 0's handle on its workers (`start`); `group` is rank 0's place in the process group."""

    def __init__(
        self, world: int, processes: list[subprocess.Popen], conns: list[Connection], store: Any
    ) -> None:
        self._processes = processes  # rank r's process at index r - 1, filled by `start`
        self._conns = conns
        self._store = store
        self.world = world
        self.group: TensorParallelGroup | None = None
        self.device = torch.device("cpu")

    @classmethod
    def start(
        cls, path: str, config: EngineConfig, dtype: str, device: torch.device, vocab_size: int
    ) -> TensorParallelWorkers:
        """Start ranks 1..N-1 (N = config.tensor_parallel_size) and join the group with them; each loads its
        shard meanwhile. Raises EngineDeadError naming a rank that exits before the group is formed."""
        world = config.tensor_parallel_size
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        env = dict(os.environ)
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink SHARP multicast: off unless asked for
        processes, conns = [], []
        workers = cls(world, processes, conns, store)
        workers.device = device
        if device.type == "cuda":  # the current device is per thread: the group is formed on another one
            torch.cuda.set_device(device)
        try:
            for rank in range(1, world):
                ours, theirs = socket.socketpair()
                fd = theirs.fileno()
                processes.append(
                    subprocess.Popen([sys.executable, "-c", _WORKER_CODE, str(fd)], pass_fds=(fd,), env=env)
                )
                theirs.close()
                conns.append(Connection(ours.detach()))
                spec = WorkerSpec(str(path), config, dtype, device.type, rank, world, store.port, vocab_size)
                conns[-1].send(spec)
            workers.group = workers._watch(lambda: make_group(store, 0, world, device, vocab_size))
        except BaseException:
            workers.close()
            raise
        return workers

    def _watch(self, work: Callable[[], Any]) -> Any:
        """Run `work` (which waits on the workers) on a thread, watching that none of them exits meanwhile."""
        result: list[Any] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                result.append(work())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name="kiln-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.05)
            self.check()
        if errors:
            raise errors[0]
        return result[0]

    def wait_ready(self) -> None:
        """Wait until every worker loaded its shard; raises what a worker failed with, naming its rank."""
        for rank, conn in enumerate(self._conns, start=1):
            while not conn.poll(0.05):
                self.check()
            try:
                status, error = conn.recv()
            except (EOFError, OSError):
                self.check(wait=5.0)
                raise EngineDeadError(f"tensor-parallel rank {rank} closed its connection") from None
            if status != "ready":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {error}")

    def send(self, message: HostStep | SizeKV | AllocateKV | CaptureGraphs | StopWorker) -> None:
        """The same message to every worker."""
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send(message)
            except OSError:
                self.check(wait=5.0)
                raise EngineDeadError(f"tensor-parallel rank {rank} is unreachable") from None

    def size_kv_pool(self, local: Callable[[], int], message: SizeKV) -> int:
        """The KV blocks every rank fits: each rank sizes its own pool, the smallest wins."""
        assert self.group is not None
        self.send(message)
        blocks = torch.tensor([local()], dtype=torch.int64, device=self.device)
        return _min_over_ranks(self.group, blocks)

    def check(self, wait: float = 0.0) -> None:
        """Raise EngineDeadError naming a worker that exited (waiting up to `wait` seconds for one to)."""
        deadline = time.monotonic() + wait
        while True:
            for rank, process in enumerate(self._processes, start=1):
                code = process.poll()
                if code is not None:
                    raise EngineDeadError(
                        f"tensor-parallel rank {rank} of {self.world} exited (exit code {code}); "
                        "the engine cannot go on without it"
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (they end their loop), killing any still running after `timeout` seconds."""
        for conn in self._conns:
            try:
                conn.send(StopWorker())
                conn.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._conns.clear()
        self.group = None


def _min_over_ranks(group: TensorParallelGroup, value: torch.Tensor) -> int:
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.MIN
    group.group.allreduce([value], options).wait()
    return int(value.item())


def worker_main(fd: int) -> None:
    """A worker's life: read its `WorkerSpec`, join the group, load its shard, say ready, then run what
    rank 0 sends until `StopWorker` or the socket closes. Any failure ends the process (rank 0 notices)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; rank 0 decides
    conn = Connection(fd)
    spec: WorkerSpec = conn.recv()
    try:
        device = rank_device(spec.device_type, spec.rank)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // spec.world))
        store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world, is_master=False)
        group = make_group(store, spec.rank, spec.world, device, spec.vocab_size)
        if is_engine_dir(Path(spec.path)):
            prepare_engine_kernels(Path(spec.path), device)
        model, _ = load_model(spec.path, dtype=DTYPES[spec.dtype], device=device, tp=group)
    except BaseException as exc:
        conn.send(("failed", "".join(traceback.format_exception_only(exc)).strip()))
        raise
    conn.send(("ready", None))
    _serve(conn, spec, model, device)


@torch.inference_mode()
def _serve(conn: Connection, spec: WorkerSpec, model: Any, device: torch.device) -> None:
    runner: ModelRunner | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, HostStep):
            assert runner is not None
            runner.forward_host(message)
        elif isinstance(message, SizeKV):
            blocks = num_kv_blocks_from_memory(
                model, spec.config, message.block_size, message.max_tokens, message.max_num_seqs, message.cap
            )
            _min_over_ranks(model.tp, torch.tensor([blocks], dtype=torch.int64, device=device))
        elif isinstance(message, AllocateKV):
            kv = allocate_kv_cache(
                model.config, message.num_blocks, message.block_size, model.kv_cache_dtype, device
            )
            runner = ModelRunner(model, kv, message.block_size, device, spec.vocab_size)
        elif isinstance(message, CaptureGraphs):
            assert runner is not None
            runner.capture_graphs(
                message.max_batch_size,
                message.max_model_len,
                message.max_prefill_tokens,
                message.max_mixed_tokens,
            )
        elif isinstance(message, StopWorker):
            return
