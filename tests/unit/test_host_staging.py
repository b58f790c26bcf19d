"""kiln.engine.host_transfer.HostStaging: a step's integer lists to the device in one copy, split back."""

from __future__ import annotations

import torch

from kiln.engine.host_transfer import HostStaging


def test_lists_arrive_as_int64_in_their_own_tensors() -> None:
    parts = [[5, 0, 49151], [], [-1, 7], [2**40, 3]]  # slot -1 (padding) and ids beyond int32 both survive
    out = HostStaging(torch.device("cpu")).to_device(parts)
    assert [t.dtype for t in out] == [torch.int64] * 4
    assert [t.tolist() for t in out] == parts


def test_every_list_empty() -> None:
    out = HostStaging(torch.device("cpu")).to_device([[], []])
    assert [t.shape for t in out] == [torch.Size([0]), torch.Size([0])]


def test_the_tensors_outlive_the_staging_buffer() -> None:
    import gc

    out = HostStaging(torch.device("cpu")).to_device([list(range(1000)), [3]])
    gc.collect()
    _ = [list(range(1000, 2000)) for _ in range(50)]  # reuse freed memory
    assert out[0].tolist() == list(range(1000)) and out[1].tolist() == [3]


def test_every_list_starts_16_bytes_aligned_whatever_the_lengths_before_it() -> None:
    # Triton keys a kernel variant on a pointer's 16-byte alignment: a step of an odd number of tokens
    # must hand its kernels the positions at the same alignment as an even one.
    for lengths in ([3, 3, 3, 1, 5], [1, 0, 2, 7], [4, 4, 4]):
        parts = [list(range(10 * i, 10 * i + n)) for i, n in enumerate(lengths)]
        out = HostStaging(torch.device("cpu")).to_device(parts)
        assert [t.tolist() for t in out] == parts
        base = out[0].data_ptr()
        assert [(t.data_ptr() - base) % 16 for t in out] == [0] * len(parts)
