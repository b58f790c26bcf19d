"""Copying host tensors into device parameters through pinned staging buffers.

Rules:
- A tensor read from a safetensors file is pageable memory (a view of the file's mapping). Copied to a
  GPU directly, the driver stages it through a small buffer of its own in the calling thread, faulting
  the file's pages in as it goes, one tensor after another with nothing overlapped (about 4x slower
  for a 7B directory: docs/results/2026-12-05-h100). Here each tensor goes chunk
  by chunk into one of two pinned buffers (torch's CPU copy, on its intra-op threads, casting when the
  parameter's dtype differs) and from there to the device asynchronously on the current stream, so the
  host's copy of one chunk overlaps the transfer of the one before. A buffer is refilled only once the
  transfer out of it has completed (its event).
- Small tensors (norms, biases) and tensors already on the device take a plain `copy_`.
- `finish` waits for the last transfers; the buffers must not be dropped before it. Nothing here changes
  the bytes: the result equals `dst.copy_(src)`.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 << 20  # per staging buffer: large transfers, little pinned memory
SMALL_BYTES = 1 << 20  # below this a plain copy costs less than the hand-off


class StagedUploader:
    """`copy(dst, src)` as `dst.copy_(src)` for a parameter `dst`, staged for host sources (see the module's
    rules). `chunk_bytes`: each buffer's size (default CHUNK_BYTES); `pinned`: page-locked staging, the
    default on a CUDA device (a CPU destination, which tests use, stages through ordinary memory)."""

    def __init__(
        self, device: torch.device, chunk_bytes: int | None = None, pinned: bool | None = None
    ) -> None:
        chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if chunk_bytes < 16:
            raise ValueError(f"chunk_bytes must be at least 16, not {chunk_bytes}")
        self.device = device
        self.chunk_bytes = chunk_bytes
        pinned = device.type == "cuda" if pinned is None else pinned
        self._buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.staged_bytes = 0  # copied through the buffers (the rest went by plain copy_)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        nbytes = src.numel() * dst.element_size()
        if src.device.type != "cpu" or nbytes < SMALL_BYTES or not dst.is_contiguous():
            dst.copy_(src)
            return
        flat_dst, flat_src = dst.view(-1), src.reshape(-1)
        per_chunk = self.chunk_bytes // dst.element_size()
        for start in range(0, flat_dst.numel(), per_chunk):
            count = min(per_chunk, flat_dst.numel() - start)
            staging = self._take()[: count * dst.element_size()].view(dst.dtype)
            staging.copy_(flat_src[start : start + count])
            flat_dst[start : start + count].copy_(staging, non_blocking=True)
            self._mark()
        self.staged_bytes += nbytes

    def finish(self) -> None:
        """Wait until every staged transfer has landed."""
        for event in self._events:
            if event is not None:
                event.synchronize()

    def _take(self) -> torch.Tensor:
        """The next staging buffer, once the transfer out of it has completed."""
        self._turn ^= 1
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
        return self._buffers[self._turn]

    def _mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[self._turn] = event
