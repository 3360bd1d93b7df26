"""The CPU-checkable parts of the device transports: transport selection, chunk plans, page runs and
cuda_ipc write plans, word views, the on-device checksum (run here on CPU), what travels over gRPC (pool
export, NCCL offer), and NCCL failure handling that needs no GPU (a decode node's rendezvous store dying
with its process, bounded calls, the environment that keeps torch from killing the process).
The transfers themselves are in tests/test_transfer_gpu.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from kvferry.engine.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from kvferry.kvtransfer.cuda_ipc import PoolExport, plan_write
from kvferry.kvtransfer.device_util import (
    PeerUnreachableError,
    as_words,
    check_runs,
    decode_runs,
    encode_runs,
    page_checksum,
    page_runs,
    pool_checksum,
    run_bounded,
)
from kvferry.kvtransfer.nccl import NcclOffer, NcclPeers, _prepare_env, check_store, chunk_plan, connect_store
from kvferry.kvtransfer.selection import NodeInfo, choose_transport

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


# ---- page runs on the host (reservation replies, cuda_ipc write plans) ---------------------------
def test_encode_check_decode_runs_round_trip():
    ids = torch.tensor([5, 6, 7, 2, 3, 9, 8])
    runs = encode_runs(ids)
    assert runs == [5, 3, 2, 2, 9, 1, 8, 1]
    assert decode_runs(runs).tolist() == ids.tolist()
    assert check_runs(runs, 10) == ([5, 2, 9, 8], [3, 2, 1, 1], 7)
    assert encode_runs(torch.arange(262_144)) == [0, 262_144]  # a fresh pool: one run
    assert encode_runs(torch.tensor([], dtype=torch.int64)) == [] and check_runs([], 4) == ([], [], 0)
    assert encode_runs(torch.tensor([3, 4], dtype=torch.int32)) == [3, 2]
    for bad in ([1, 2, 3], [8, 3], [-1, 2], [2, 0]):  # odd, past the end, negative, empty run
        with pytest.raises(ValueError):
            check_runs(bad, 10)


@pytest.mark.parametrize(
    "page_ids, runs, want_runs, scatter",
    [
        (None, [4, 3], ([4], [3]), False),  # the reservation's runs: no ids at all
        (torch.tensor([9, 9, 9]), [4, 3], ([4], [3]), False),  # runs win over ids
        (torch.tensor([4, 5, 6, 0, 1]), None, ([4, 0], [3, 2]), False),  # CPU ids cut on the host
        (torch.tensor([7, 1, 5, 3]), None, None, True),  # more runs than max_direct_runs (2): scatter
        (None, [7, 1, 1, 1, 5, 1], None, True),
    ],
)
def test_ipc_write_plan(page_ids, runs, want_runs, scatter):
    plan = plan_write(10, page_ids, runs, max_direct_runs=2)
    assert plan.device_ids is None
    n = len(decode_runs(runs)) if runs is not None else page_ids.numel()
    assert plan.num_pages == n
    if scatter:
        want = decode_runs(runs) if runs is not None else page_ids
        assert plan.scatter_ids.tolist() == want.tolist() and plan.firsts == []
    else:
        assert plan.scatter_ids is None and (plan.firsts, plan.lengths) == want_runs


def test_ipc_write_plan_refuses_pages_outside_the_pool():
    for ids in (torch.tensor([3, 10]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="outside the pool"):
            plan_write(10, ids, None)
    with pytest.raises(ValueError, match="outside the pool"):
        plan_write(10, None, [8, 3])
    with pytest.raises(ValueError, match="page_ids or runs"):
        plan_write(10, None, None)
    assert plan_write(10, torch.empty(0, dtype=torch.int64), None).num_pages == 0


# ---- NCCL failure handling: the rendezvous store and bounded calls, on real processes ----------
def test_run_bounded():
    assert run_bounded(lambda: 42, 5.0, "t") == (True, 42, None)
    finished, _, error = run_bounded(lambda: 1 / 0, 5.0, "t")
    assert finished and isinstance(error, ZeroDivisionError)
    never = threading.Event()
    started = time.monotonic()
    assert run_bounded(never.wait, 0.2, "stuck") == (False, None, None)  # left behind, caller goes on
    assert time.monotonic() - started < 2.0
    never.set()


def test_nccl_env_never_lets_torch_kill_the_process(monkeypatch: pytest.MonkeyPatch):
    for name in ("TORCH_NCCL_ENABLE_MONITORING", "TORCH_NCCL_DUMP_ON_TIMEOUT", "NCCL_NVLS_ENABLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # 1 = tear the process down
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")  # would make work.wait() block without deadline
    _prepare_env()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert os.environ["TORCH_NCCL_ENABLE_MONITORING"] == "0"  # no heartbeat monitor (SIGABRT, store polls)
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
    monkeypatch.setenv("TORCH_NCCL_ENABLE_MONITORING", "1")
    _prepare_env()
    assert os.environ["TORCH_NCCL_ENABLE_MONITORING"] == "1"  # an explicit choice is kept


HUB = """
import sys, time
from kvferry.kvtransfer.nccl import NcclHub
hub = NcclHub(0, port=int(sys.argv[1]), timeout=5.0)  # the decode node's store; no GPU needed for it
print(hub.port, flush=True)
time.sleep(120)
"""


def _start_hub(port: int = 0) -> tuple[subprocess.Popen, int]:
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-P", "-c", HUB, str(port)], stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line.strip() == str(port).encode(), line
    return proc, port


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: the store goes with the process, as on a crash
    proc.wait(timeout=10)


def test_dead_decode_store_is_peer_unreachable():
    """The failure seen on the device: the decode process hosting the TCPStore dies; store calls then
    fail with DistNetworkError ("Connection was likely closed"). They must become PeerUnreachableError
    (UNAVAILABLE), fast for a live connection and within the store timeout for a new one."""
    proc, port = _start_hub()
    try:
        store = connect_store("127.0.0.1", port, timeout=5.0)
        check_store(store, "test")  # alive: no error
    finally:
        _kill(proc)
    started = time.monotonic()
    with pytest.raises(PeerUnreachableError, match="stopped answering") as e:
        check_store(store, "test")
    assert time.monotonic() - started < 2.0
    assert isinstance(e.value, UnavailableError) and e.value.drained
    assert "\n" not in str(e.value)  # the first line of the c10d error, not its C++ stack
    started = time.monotonic()
    with pytest.raises(PeerUnreachableError, match="unreachable"):
        connect_store("127.0.0.1", port, timeout=1.0)
    assert time.monotonic() - started < 5.0


def test_prefill_side_drops_a_dead_store_and_reconnects_to_a_restarted_node():
    proc, port = _start_hub()
    offer = NcclOffer("p1", "127.0.0.1", port, 1 << 20, "d1", "GPU-x", "h")
    peers = NcclPeers(0, timeout=5.0)  # the prefill side's cache of store clients (no GPU used here)
    try:
        first = peers._store(offer)
        assert peers._store(offer) is first  # reused while it answers
    finally:
        _kill(proc)
    proc, _ = _start_hub(port)  # the decode node restarted on the same address
    try:
        second = peers._store(offer)
        assert second is not first
        check_store(second, "test")
    finally:
        _kill(proc)
    with pytest.raises(PeerUnreachableError):
        NcclPeers(0, timeout=1.0)._store(offer)  # nobody there at all
