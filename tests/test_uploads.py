"""engine/uploads.py: host-to-device copies that leave the host free to run ahead of the GPU."""

from __future__ import annotations

import time

import pytest
import torch

from kvferry.engine.uploads import upload, upload_values

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_upload_on_the_host_is_a_plain_copy_of_the_values() -> None:
    t = torch.arange(12, dtype=torch.int32).view(3, 4)
    assert torch.equal(upload(t, torch.device("cpu")), t)
    assert torch.equal(
        upload_values([0, 7, 9], torch.int32, torch.device("cpu")), torch.tensor([0, 7, 9]).int()
    )


@pytest.mark.gpu
@cuda
def test_upload_does_not_wait_for_queued_gpu_work_and_keeps_its_values() -> None:
    """A prefill uploads the page table while the previous chunk's kernels are still queued, then
    changes the host copy for the next chunk: the upload must neither wait for the queue nor see
    the later change."""
    device = torch.device("cuda")
    table = torch.randint(0, 1 << 20, (32, 8, 513), dtype=torch.int32)
    want = table.clone()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the copy
    t0 = time.perf_counter()
    on_gpu = upload(table, device)
    ids = upload_values(list(range(2048)), torch.int64, device)
    host_seconds = time.perf_counter() - t0
    table.fill_(-1)  # the host moves on to the next chunk's layout
    assert host_seconds < 0.25, f"the upload waited {host_seconds:.2f} s for the GPU"
    assert torch.equal(on_gpu.cpu(), want)
    assert torch.equal(ids.cpu(), torch.arange(2048))

    pinned = torch.arange(4096, dtype=torch.int64).pin_memory()  # a caller's own pinned buffer
    torch.cuda._sleep(200_000_000)
    copied = upload(pinned, device)
    pinned.fill_(0)  # reused at once, as a staging buffer would be
    assert torch.equal(copied.cpu(), torch.arange(4096))
