"""kiln.models.upload.StagedUploader on the CPU: chunked staging gives exactly `dst.copy_(src)`, casts
included; small and device-side tensors take the plain copy. (Pinned memory and the transfer to a GPU:
tests/gpu/test_staged_upload_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from kiln.models import upload
from kiln.models.upload import StagedUploader


@pytest.mark.parametrize(
    ("src_dtype", "dst_dtype"),
    [
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),  # cast while staging
        (torch.int8, torch.int8),  # quantized weights: their bytes as stored
        (torch.float8_e4m3fn, torch.float8_e4m3fn),
    ],
)
def test_chunked_copies_equal_a_plain_copy(src_dtype, dst_dtype):
    # 1201 x 1001 elements (over SMALL_BYTES): 37 or 74 chunks of 64 KiB, the last one short.
    src = torch.randn(1201, 1001, generator=torch.Generator().manual_seed(0)).mul(3).to(src_dtype)
    uploader = StagedUploader(torch.device("cpu"), chunk_bytes=64 << 10)
    staged = torch.empty(src.shape, dtype=dst_dtype)
    uploader.copy(staged, src)
    uploader.finish()
    plain = torch.empty_like(staged).copy_(src)
    assert torch.equal(staged.reshape(-1).view(torch.uint8), plain.reshape(-1).view(torch.uint8))
    assert uploader.staged_bytes == src.numel() * staged.element_size()


def test_small_tensors_and_device_tensors_are_copied_plainly(monkeypatch):
    uploader = StagedUploader(torch.device("cpu"), chunk_bytes=1 << 10)
    small = torch.arange(100, dtype=torch.float32)
    dst = torch.empty(100)
    uploader.copy(dst, small)
    assert torch.equal(dst, small) and uploader.staged_bytes == 0  # under SMALL_BYTES
    monkeypatch.setattr(upload, "SMALL_BYTES", 0)
    uploader.copy(dst, small)
    assert uploader.staged_bytes == 400  # now staged, in chunks of 1 KiB


def test_a_chunk_smaller_than_an_element_is_refused():
    with pytest.raises(ValueError, match="chunk_bytes"):
        StagedUploader(torch.device("cpu"), chunk_bytes=8)
