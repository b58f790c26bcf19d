"""Host <-> device copies of a step's small tensors that never make the host wait for the GPU."""

from __future__ import annotations

import array

import torch


class HostStaging:
    """Moves a step's integer inputs to the device in ONE copy.

    On CUDA the lists go through pinned memory with non_blocking=True, so the host does not wait for
    the GPU to drain (a copy from pageable memory would). The pinned buffer comes from torch's caching
    host allocator, which does not hand it out again until the copy has run: with overlapped steps the
    host fills the next step's inputs while the previous copy may still be queued.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def to_device(self, parts: list[list[int]]) -> list[torch.Tensor]:
        sizes = [len(part) for part in parts]
        # The lists become int64 through array.array, which reads a list in C: torch.tensor(list) costs
        # ~5x as much, and a long-context step's block tables are tens of thousands of ints.
        packed = array.array("q")
        for part in parts:
            packed.fromlist(part)
        if not packed:
            return [torch.empty(0, dtype=torch.int64, device=self.device) for _ in parts]
        flat = torch.frombuffer(packed, dtype=torch.int64)  # keeps `packed` alive while it is used
        if self.device.type != "cuda":
            return list(flat.to(self.device).split(sizes))
        return list(flat.pin_memory().to(self.device, non_blocking=True).split(sizes))


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued (non-blocking, into pinned memory) on CUDA."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
