"""Weights staged through pinned buffers to the GPU (kiln.models.upload) land exactly as a plain copy would."""

from __future__ import annotations

import pytest
import torch

from kiln.models import upload
from kiln.models.loader import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_staged_load_equals_a_plain_one(tiny_gqa_dir, monkeypatch, dtype):
    plain, _ = load_model(tiny_gqa_dir, dtype=dtype, device="cuda", staged=False)
    # Every tensor staged, each in several 4 KiB chunks through the two buffers in turn (the checkpoint
    # is float32: each chunk is cast on the host).
    monkeypatch.setattr(upload, "SMALL_BYTES", 0)
    monkeypatch.setattr(upload, "CHUNK_BYTES", 4096)
    staged_bytes = []
    finish = upload.StagedUploader.finish

    def counted(self):
        finish(self)
        staged_bytes.append(self.staged_bytes)

    monkeypatch.setattr(upload.StagedUploader, "finish", counted)
    staged, _ = load_model(tiny_gqa_dir, dtype=dtype, device="cuda")
    expected = dict(plain.named_parameters())
    assert staged_bytes == [sum(p.numel() * p.element_size() for p in expected.values())]
    for name, param in staged.named_parameters():
        assert param.device.type == "cuda" and param.dtype == expected[name].dtype
        assert torch.equal(param, expected[name]), name


def test_large_tensors_through_pinned_buffers():
    uploader = upload.StagedUploader(torch.device("cuda"), chunk_bytes=1 << 20)
    assert all(buffer.is_pinned() for buffer in uploader._buffers)
    src = torch.randn(3_000_017, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    dst = torch.empty(src.shape, dtype=torch.bfloat16, device="cuda")
    uploader.copy(dst, src)
    uploader.finish()
    assert torch.equal(dst.cpu(), src)
