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
        """The lists as int64 tensors on the device, views of one copied buffer, each starting on a
        16-byte boundary: Triton specialises a kernel on whether a pointer is 16-byte aligned, so a list
        that started mid-pair when the list before it had an odd length would make a kernel variant of
        its own in those steps only (built mid-run, with every stream waiting)."""
        # The lists become int64 through array.array, which reads a list in C: torch.tensor(list) costs
        # ~5x as much, and a long-context step's block tables are tens of thousands of ints.
        packed = array.array("q")
        starts = []
        for part in parts:
            starts.append(len(packed))
            packed.fromlist(part)
            if len(part) % 2:
                packed.append(0)  # the next list starts 16 bytes on
        if not packed:
            return [torch.empty(0, dtype=torch.int64, device=self.device) for _ in parts]
        flat = torch.frombuffer(packed, dtype=torch.int64)  # keeps `packed` alive while it is used
        if self.device.type != "cuda":
            flat = flat.to(self.device)
        else:
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        return [flat[start : start + len(part)] for start, part in zip(starts, parts, strict=True)]


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued (non-blocking, into pinned memory) on CUDA."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
