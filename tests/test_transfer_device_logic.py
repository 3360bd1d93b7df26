"""The CPU-checkable parts of the device transports: transport selection, chunk plans, page runs, word
views, the on-device checksum (run here on CPU), and what travels over gRPC (pool export, NCCL offer).
The transfers themselves are in tests/test_transfer_gpu.py."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidArgumentError
from kvtransfer.cuda_ipc import PoolExport
from kvtransfer.device_util import as_words, page_checksum, page_runs, pool_checksum
from kvtransfer.nccl import NcclOffer, chunk_plan
from kvtransfer.selection import NodeInfo, choose_transport
from serving.errors import FailedPreconditionError

ALL = ("grpc", "cuda_ipc", "nccl")


def node(host: str = "h1", dev: str = "cuda", uuid: str = "GPU-0", transports=ALL) -> NodeInfo:
    return NodeInfo(host, dev, uuid if dev == "cuda" else "", transports if dev == "cuda" else ("grpc",))


def no_access(a: str, b: str) -> bool:
    return False


def full_access(a: str, b: str) -> bool:
    return True


def invisible(a: str, b: str) -> None:
    return None


@pytest.mark.parametrize(
    "local, peer, access, want",
    [
        (node(), node(), no_access, "cuda_ipc"),  # one GPU, two processes
        (node(uuid="GPU-1"), node(), full_access, "cuda_ipc"),  # two GPUs with peer access
        (node(uuid="GPU-1"), node(), no_access, "nccl"),  # two GPUs, no peer access
        (node(uuid="GPU-1"), node(), invisible, "nccl"),  # decode GPU hidden from us
        (node(host="h2", uuid="GPU-1"), node(), full_access, "nccl"),  # another host
        (node(dev="cpu"), node(), full_access, "grpc"),
        (node(), node(dev="cpu"), full_access, "grpc"),
        (node(host="h2"), node(transports=("grpc",)), full_access, "grpc"),  # decode serves grpc only
        (node(host="h2"), node(), full_access, "grpc"),  # another host, same uuid (impossible): no nccl
    ],
)
def test_auto_selection(local, peer, access, want):
    choice = choose_transport(local, peer, "auto", peer_access=access)
    assert choice.name == want, choice.reason


def test_requested_transport_is_honoured_or_refused():
    one_gpu = (node(), node())
    assert choose_transport(*one_gpu, "grpc").name == "grpc"
    assert choose_transport(*one_gpu, "").name == "cuda_ipc"  # empty = auto
    with pytest.raises(FailedPreconditionError, match="NCCL cannot pair two ranks on one GPU"):
        choose_transport(*one_gpu, "nccl")
    with pytest.raises(FailedPreconditionError, match="different hosts"):
        choose_transport(node(host="h2", uuid="GPU-1"), node(), "cuda_ipc", peer_access=full_access)
    assert choose_transport(node(host="h2", uuid="GPU-1"), node(), "nccl").name == "nccl"
    with pytest.raises(InvalidArgumentError) as e:
        choose_transport(*one_gpu, "rdma")
    assert e.value.field == "transport"


@pytest.mark.parametrize(
    "num_pages, page_bytes, chunk_bytes, want",
    [
        (0, 8192, 1 << 20, []),
        (1, 8192, 1 << 20, [(0, 1)]),
        (300, 8192, 1 << 20, [(0, 128), (128, 256), (256, 300)]),
        (5, 8192, 100, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),  # never less than a page
    ],
)
def test_chunk_plan(num_pages, page_bytes, chunk_bytes, want):
    plan = chunk_plan(num_pages, page_bytes, chunk_bytes)
    assert plan == want
    assert sum(e - s for s, e in plan) == num_pages


def test_page_runs():
    assert page_runs(torch.tensor([], dtype=torch.int64)) == []
    assert page_runs(torch.tensor([7])) == [(0, 7, 1)]
    assert page_runs(torch.arange(10, 20)) == [(0, 10, 10)]
    assert page_runs(torch.tensor([5, 6, 7, 2, 3, 9, 8])) == [(0, 5, 3), (3, 2, 2), (5, 9, 1), (6, 8, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_as_words_is_a_bit_exact_view(dtype):
    pages = torch.randn(6, 2, 16, 8).to(dtype)
    words = as_words(pages)
    assert words.dtype == torch.int64 and words.shape[0] == 6
    assert words.data_ptr() == pages.data_ptr()  # a view, no copy
    assert as_words(pages[:0]).shape[0] == 0
    odd = torch.zeros(3, 2, 1, 3, dtype=torch.float16)  # 12-byte pages: int32 words
    assert as_words(odd).dtype == torch.int32
    with pytest.raises(ValueError):
        as_words(pages.transpose(2, 3))


def test_checksum_sees_order_and_content_and_matches_the_pool_gather():
    pages = torch.randint(-(1 << 15), 1 << 15, (40, 2, 4, 8), dtype=torch.int16).view(torch.bfloat16)
    base = page_checksum(pages)
    assert page_checksum(pages, chunk_pages=7) == base  # chunking does not change it
    swapped = pages[[1, 0, *range(2, 40)]]
    assert page_checksum(swapped) != base
    altered = pages.clone()
    altered.view(torch.int16)[13, 1, 2, 3] += 1
    assert page_checksum(altered) != base
    pool = torch.zeros(100, 2, 4, 8, dtype=torch.bfloat16)
    ids = torch.randperm(100)[:40]
    pool[ids] = pages
    assert pool_checksum(pool, ids, chunk_pages=9) == base
    assert 0 <= base < 1 << 64
    assert page_checksum(pages[:0]) == 0


def test_pool_export_round_trips_through_bytes():
    export = PoolExport(
        node_id="n1",
        host_id="boot/ipc:[1]",
        device_uuid="GPU-abc",
        handle=bytes(range(66)),
        storage_bytes=1 << 30,
        storage_offset_bytes=512,
        ref_counter_handle=b"/torch_123_456_0",
        ref_counter_offset=3,
        event_handle=None,
        event_sync_required=False,
        tensor_offset=0,
        shape=(1024, 2, 16, 128),
        stride=(4096, 2048, 128, 1),
        dtype="bfloat16",
    )
    assert PoolExport.from_bytes(export.to_bytes()) == export
    with_event = PoolExport(
        **{**export.__dict__, "event_handle": b"\x00\xff" * 32, "event_sync_required": True}
    )
    assert PoolExport.from_bytes(with_event.to_bytes()) == with_event
    assert export.num_pages == 1024


def test_nccl_offer_is_plain_data():
    offer = NcclOffer("p", "10.0.0.2", 29500, 1 << 28, "d", "GPU-x", "boot/ipc")
    assert NcclOffer(**offer.to_dict()) == offer
