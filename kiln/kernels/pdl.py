"""Programmatic dependent launch (PDL), Hopper and newer: let a kernel start before the one ahead of it ends.

In a batch-1 decode step every weight GEMV follows a small kernel (RMSNorm, attention, SiLU-and-mul)
whose few microseconds leave HBM idle, and each launch in a CUDA graph adds a gap of its own. The GEMV
is launched with PDL: its programs start while the kernel before it is still running, stream their
first weight chunk (weights are never written by a step), and only then wait (`griddepcontrol.wait`)
for that kernel to finish and its writes to land before they read the input vector or store.
The small kernels say at their very start that their dependents may launch
(`griddepcontrol.launch_dependents`); where the next kernel was not launched with PDL that is a no-op.

Rules: a PDL-launched kernel must wait before it reads anything an earlier kernel writes, and before it
writes anything (its output may reuse memory an earlier kernel still reads). KILN_PDL=0 turns PDL off
(to compare, or to bisect). It is also off for non-CUDA devices, before compute capability 9.0 and
under Triton's interpreter (TRITON_INTERPRET=1), where the instructions do not exist.
"""

from __future__ import annotations

import functools
import os

import torch

from kiln.kernels.switches import env_switch

_DISABLED = not env_switch("KILN_PDL", True) or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with and signal programmatic dependent launch."""
    if _DISABLED or device.type != "cuda":
        return False
    return _has_pdl(device.index if device.index is not None else torch.cuda.current_device())
