"""The direct-transport protocol of the services (ExportKV, page runs, CommitKV) on CPU, through the
`shm` transport: a CPU decode node's pool lives in a /dev/shm file that a writer maps and fills. The
same RPCs and checks carry cuda_ipc and nccl on GPUs (tests/test_serving_gpu.py).

Covered: transport selection with shm; the pool file's life (export, sweep of dead processes' files,
unlink at stop); pages written through a mapping verified by CommitKV (sum64), corrupt ones refused
with DATA_LOSS and freed; a reservation taking its pages only the way it was reserved for; transports
the node does not serve refused before anything is reserved; auto falling back to grpc when the pool
cannot be mapped while a named transport fails."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from builders import TinyModel
from cluster import ClusterSpec, InProcessCluster

from kvferry.decode_service.client import DecodeClient
from kvferry.engine.errors import FailedPreconditionError, UnavailableError
from kvferry.engine.kv_handoff import KVLayout
from kvferry.kvtransfer import ModelSpec, build_manifest, pages_to_bytes
from kvferry.kvtransfer.device_util import decode_runs, first_pages_of_runs, page_checksum
from kvferry.kvtransfer.manifest import early_manifest
from kvferry.kvtransfer.selection import NodeInfo, choose_transport
from kvferry.kvtransfer.shm import MappedShmPool, SharedPool, ShmExport, sweep_stale_files
from kvferry.prefill_service.early_reservation import EarlyReservation
from kvferry.prefill_service.handoff_request import HandoffRequest
from kvferry.prefill_service.links import DecodeLinks, LinkOptions
from kvferry.serving.deadline import Deadline
from kvferry.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

PAGE_SIZE = 4


@pytest.fixture(scope="module")
def cluster(tiny_model: Callable[[str], TinyModel]) -> Iterator[InProcessCluster]:
    tiny = tiny_model("llama")
    engine = dict(
        model=str(tiny.path), device="cpu", dtype="float32", page_size=PAGE_SIZE, prefill_chunk=64,
        max_model_len=512, kv_cache_bytes=1 << 20, torch_threads=1,
    )  # fmt: skip
    c = InProcessCluster(ClusterSpec(engine=engine, decode=dict(lease_seconds=5.0))).start()
    yield c
    c.stop()


@pytest.fixture
def stub(cluster: InProcessCluster) -> Iterator[decode_pb2_grpc.DecodeServiceStub]:
    channel = grpc.insecure_channel(cluster.address("decode"))
    yield decode_pb2_grpc.DecodeServiceStub(channel)
    channel.close()
    cluster.assert_no_leaks()


def _pages(cluster: InProcessCluster, head_len: int) -> tuple[ModelSpec, KVLayout, torch.Tensor]:
    engine = cluster.decode.worker.engine
    spec = ModelSpec.of_engine(engine)
    layout = KVLayout(torch.full((engine.num_layers, engine.num_kv_heads), head_len), spec.page_size)
    return spec, layout, torch.randn(layout.num_pages, 2, spec.page_size, spec.head_dim)


def _reserve(stub: Any, manifest: Any, transport: str, prompt_len: int) -> Any:
    return stub.ReserveKV(
        decode_pb2.ReserveKVRequest(
            request_id="test",
            manifest=manifest,
            sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True),
            prompt_token_ids=[1 + i % 250 for i in range(prompt_len)],
            first_token_id=5,
            transport=transport,
        ),
        timeout=10,
    )


# ---- selection ------------------------------------------------------------------------------------
def test_auto_picks_shm_between_cpu_processes_of_one_host() -> None:
    cpu = NodeInfo("h1", "cpu", "", ("grpc", "shm"))
    assert choose_transport(cpu, cpu).name == "shm"
    assert choose_transport(cpu, NodeInfo("h2", "cpu", "", ("grpc", "shm"))).name == "grpc"  # other host
    assert choose_transport(cpu, NodeInfo("h1", "cpu", "", ("grpc",))).name == "grpc"  # decode: grpc only
    gpu = NodeInfo("h1", "cuda", "GPU-0", ("grpc", "cuda_ipc", "nccl"))
    assert choose_transport(gpu, gpu).name == "cuda_ipc"
    with pytest.raises(FailedPreconditionError) as e:
        choose_transport(gpu, cpu, "shm")
    assert e.value.field == "transport"


# ---- the pool file --------------------------------------------------------------------------------
def test_export_names_a_mappable_pool_file_holding_the_pool(cluster: InProcessCluster, stub: Any) -> None:
    export = stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=10)
    assert export.device_type == "cpu" and export.device_uuid == ""
    assert list(export.transports) == ["grpc", "shm"]
    shm = ShmExport.from_bytes(export.pool_export)
    assert shm.node_id == export.node_id and os.path.exists(shm.path)
    mapped = MappedShmPool(shm)
    pool = cluster.decode.worker.engine.pool.kv
    assert mapped.kv is not None and mapped.kv.shape == pool.shape
    assert mapped.kv.data_ptr() != pool.data_ptr()  # a second mapping of the same file...
    before = pool[7].clone()
    mapped.kv[7, 0, 0, 0] += 1.0  # ...whose writes the pool sees
    assert pool[7, 0, 0, 0] == before[0, 0, 0] + 1.0
    pool[7] = before


def test_files_of_dead_processes_are_swept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f"kvferry-kv-{int(dead.stdout)}-abc123"
    alive = tmp_path / f"kvferry-kv-{os.getpid()}-def456"
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    assert sweep_stale_files(tmp_path) == 1
    assert not stale.exists() and alive.exists()


@pytest.mark.parametrize("values", ["zeros", "random"])
def test_a_shared_pool_holds_the_pool_values(tmp_path: Path, values: str) -> None:
    """Moving a pool into its file keeps every value (a fresh, all-zero pool skips the copy)."""
    kv = torch.zeros(6, 2, 4, 8) if values == "zeros" else torch.randn(6, 2, 4, 8)
    shared = SharedPool(kv, "node" + values, directory=tmp_path)
    try:
        assert torch.equal(shared.kv, kv)
        assert torch.equal(MappedShmPool(shared.export).kv, kv)  # what a writer maps
    finally:
        shared.close()


def test_the_pool_file_is_removed_when_the_decode_node_stops(tiny_model: Callable[[str], TinyModel]) -> None:
    tiny = tiny_model("llama")
    engine = dict(
        model=str(tiny.path), device="cpu", dtype="float32", page_size=PAGE_SIZE, kv_cache_bytes=1 << 18
    )
    c = InProcessCluster(ClusterSpec(engine=engine)).start()
    try:
        path = ShmExport.from_bytes(c.decode.direct.export().pool_export).path
        assert os.path.exists(path)
    finally:
        c.stop()
    assert not os.path.exists(path)


# ---- write, commit, verify -----------------------------------------------------------------------
def test_pages_written_through_the_mapping_decode_after_commit(cluster: InProcessCluster, stub: Any) -> None:
    spec, layout, pages = _pages(cluster, 12)  # whole pages: decoding writes its tokens into new ones
    manifest = build_manifest(spec, layout, pages)
    assert manifest.checksum_algorithm == "sum64"
    reservation = _reserve(stub, manifest, "shm", 12)
    ids = decode_runs(list(reservation.page_runs))
    assert ids.numel() == reservation.num_pages == layout.num_pages
    assert reservation.node_id == stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=10).node_id
    mapped = MappedShmPool(
        ShmExport.from_bytes(stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=10).pool_export)
    )
    mapped.write(pages, ids)
    reply = stub.CommitKV(decode_pb2.CommitKVRequest(reservation_id=reservation.reservation_id), timeout=10)
    assert reply.bytes_received == manifest.byte_count
    assert torch.equal(cluster.decode.worker.engine.pool.kv[ids], pages)
    tokens = [
        t
        for r in stub.Decode(decode_pb2.DecodeRequest(reservation_id=reservation.reservation_id))
        for t in r.token_ids
    ]
    assert len(tokens) == 3  # the first token came from "prefill"; three more to max_new_tokens=4


def test_a_corrupt_page_is_data_loss_and_freed(cluster: InProcessCluster, stub: Any) -> None:
    spec, layout, pages = _pages(cluster, 21)
    reservation = _reserve(stub, build_manifest(spec, layout, pages), "shm", 21)
    export = ShmExport.from_bytes(stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=10).pool_export)
    corrupt = pages.clone()
    corrupt[3, 1, 2, 5] += 0.5
    MappedShmPool(export).write(corrupt, decode_runs(list(reservation.page_runs)))
    with pytest.raises(grpc.RpcError) as err:
        stub.CommitKV(decode_pb2.CommitKVRequest(reservation_id=reservation.reservation_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "sum64" in err.value.details()
    with pytest.raises(grpc.RpcError) as gone:
        stub.CommitKV(decode_pb2.CommitKVRequest(reservation_id=reservation.reservation_id), timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND  # freed with its pages (the fixture checks)


def test_the_checksum_may_come_with_commit_instead_of_the_manifest(
    cluster: InProcessCluster, stub: Any
) -> None:
    """What the prefill node does: ReserveKV with a manifest whose checksum is left out, the sum64
    computed while the pages are written, sent with CommitKV. A wrong value is DATA_LOSS, freed."""
    spec, layout, pages = _pages(cluster, 12)
    export = ShmExport.from_bytes(stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=10).pool_export)
    deferred = build_manifest(spec, layout, pages, with_checksum=False)
    assert deferred.checksum == 0 and deferred.checksum_algorithm == "sum64"
    wrong = _reserve(stub, deferred, "shm", 12)
    MappedShmPool(export).write(pages, decode_runs(list(wrong.page_runs)))
    with pytest.raises(grpc.RpcError) as err:  # a checksum of other pages: the manifest's 0 is not used
        stub.CommitKV(
            decode_pb2.CommitKVRequest(
                reservation_id=wrong.reservation_id, checksum=page_checksum(pages[1:])
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    right = _reserve(stub, deferred, "shm", 12)
    MappedShmPool(export).write(pages, decode_runs(list(right.page_runs)))
    commit = decode_pb2.CommitKVRequest(reservation_id=right.reservation_id, checksum=page_checksum(pages))
    assert stub.CommitKV(commit, timeout=10).bytes_received == deferred.byte_count
    stub.Abort(decode_pb2.AbortRequest(reservation_id=right.reservation_id), timeout=10)


def test_a_reservation_takes_pages_only_the_way_it_was_reserved_for(
    cluster: InProcessCluster, stub: Any
) -> None:
    spec, layout, pages = _pages(cluster, 9)
    direct = _reserve(stub, build_manifest(spec, layout, pages), "shm", 9)
    push = [decode_pb2.PushKVRequest(reservation_id=direct.reservation_id, data=bytes(pages_to_bytes(pages)))]
    with pytest.raises(grpc.RpcError) as err:
        stub.PushKV(iter(push), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CommitKV" in err.value.details()
    stub.Abort(decode_pb2.AbortRequest(reservation_id=direct.reservation_id), timeout=10)
    streamed = _reserve(stub, build_manifest(spec, layout, pages_to_bytes(pages)), "grpc", 9)
    assert list(streamed.page_runs) == []  # nothing to write directly
    with pytest.raises(grpc.RpcError) as err:
        stub.CommitKV(decode_pb2.CommitKVRequest(reservation_id=streamed.reservation_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "PushKV" in err.value.details()
    stub.Abort(decode_pb2.AbortRequest(reservation_id=streamed.reservation_id), timeout=10)


@pytest.mark.parametrize("transport", ["cuda_ipc", "nccl"])
def test_transports_not_served_are_refused_before_reserving(
    cluster: InProcessCluster, stub: Any, transport: str
) -> None:
    spec, layout, pages = _pages(cluster, 9)
    with pytest.raises(grpc.RpcError) as err:
        _reserve(stub, build_manifest(spec, layout, pages), transport, 9)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(err.value.trailing_metadata())["kvferry-field"] == "transport"
    assert cluster.pool_state()["decode"] == (0, 0)


def test_checksum_must_match_the_transport(cluster: InProcessCluster, stub: Any) -> None:
    spec, layout, pages = _pages(cluster, 9)
    with pytest.raises(grpc.RpcError) as err:
        _reserve(stub, build_manifest(spec, layout, pages_to_bytes(pages)), "shm", 9)  # crc32 for shm
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["kvferry-field"] == "manifest.checksum_algorithm"


@pytest.mark.parametrize(
    "transport, code", [("cuda_ipc", "FAILED_PRECONDITION"), ("rdma", "INVALID_ARGUMENT")]
)
def test_a_transport_the_nodes_cannot_use_is_refused_and_nothing_leaks(
    cluster: InProcessCluster, transport: str, code: str
) -> None:
    request = prefill_pb2.PrefillRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=[5, 6, 7, 8, 9]),
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True),
        decode_address=cluster.address("decode"),
        transport=transport,
    )
    with grpc.insecure_channel(cluster.address("prefill")) as channel, pytest.raises(grpc.RpcError) as err:
        prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(request, timeout=30)
    assert err.value.code() == getattr(grpc.StatusCode, code) and transport in err.value.details()
    assert dict(err.value.trailing_metadata())["kvferry-field"] == "transport"
    cluster.assert_no_leaks()


# ---- links ----------------------------------------------------------------------------------------
def _links(stub: Any) -> DecodeLinks:
    """Links whose every decode client calls `stub`."""
    return DecodeLinks(
        LinkOptions("cpu", ("grpc", "shm"), "auto"), lambda address: DecodeClient(address, stub)
    )


class _DecodeAnswering:
    """Answers ExportKV as a decode node whose pool file is not there (another /dev/shm)."""

    def __init__(self, export: decode_pb2.ExportKVResponse) -> None:
        self.export = export
        self.calls = 0

    async def ExportKV(self, request: Any, timeout: float) -> decode_pb2.ExportKVResponse:  # noqa: N802
        self.calls += 1
        return self.export


def test_auto_falls_back_to_grpc_when_the_pool_cannot_be_mapped_and_a_named_one_fails(
    cluster: InProcessCluster,
) -> None:
    real = cluster.decode.direct.export()
    shm = ShmExport.from_bytes(real.pool_export)
    missing = ShmExport(shm.node_id, shm.host_id, shm.path + "-missing", shm.shape, shm.dtype)
    export = decode_pb2.ExportKVResponse()
    export.CopyFrom(real)
    export.pool_export = missing.to_bytes()
    decode = _DecodeAnswering(export)

    async def scenario() -> tuple[str, str]:
        link = _links(decode).link("decode:1")
        first = await link.transport("")
        again = await link.transport("auto")
        with pytest.raises(UnavailableError):
            await link.transport("shm")
        return first.name, again.name

    assert asyncio.run(scenario()) == ("grpc", "grpc")
    assert decode.calls == 1  # asked once, remembered


def test_links_follow_a_restarted_decode_node(cluster: InProcessCluster) -> None:
    real = cluster.decode.direct.export()

    async def scenario() -> None:
        decode = _DecodeAnswering(real)
        link = _links(decode).link("decode:1")
        transport = await link.transport("")
        assert transport.name == "shm"
        assert link.serves(real.node_id) and not link.serves("another-process")
        link.forget()
        assert not link.serves(real.node_id)
        assert (await link.transport("")).name == "shm" and decode.calls == 2

    asyncio.run(scenario())


# ---- early reservations ---------------------------------------------------------------------------
def _reserve_early(stub: Any, spec: ModelSpec, max_pages: int, transport: str, prompt_len: int) -> Any:
    return stub.ReserveKV(
        decode_pb2.ReserveKVRequest(
            request_id="early",
            manifest=early_manifest(spec, max_pages),
            sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True),
            prompt_token_ids=[1 + i % 250 for i in range(prompt_len)],
            transport=transport,
            early=True,
        ),
        timeout=10,
    )


def test_an_early_reservation_is_laid_out_by_its_commit(cluster: InProcessCluster, stub: Any) -> None:
    """What the prefill node does when the last chunk starts: reserve the budget's bound, write the kept
    pages into the first pages of the runs, commit with their manifest and the first token."""
    spec, layout, pages = _pages(cluster, 12)
    early = _reserve_early(stub, spec, layout.num_pages + 10, "shm", 40)
    assert early.num_pages == layout.num_pages + 10
    runs = first_pages_of_runs(list(early.page_runs), layout.num_pages)
    export = ShmExport.from_bytes(stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=10).pool_export)
    MappedShmPool(export).write(pages, None, runs)
    manifest = build_manifest(spec, layout, pages, with_checksum=False)
    commit = decode_pb2.CommitKVRequest(
        reservation_id=early.reservation_id,
        checksum=page_checksum(pages),
        manifest=manifest,
        first_token_id=5,
    )
    assert stub.CommitKV(commit, timeout=10).bytes_received == manifest.byte_count
    assert torch.equal(cluster.decode.worker.engine.pool.kv[decode_runs(runs)], pages)
    tokens = [
        t
        for r in stub.Decode(decode_pb2.DecodeRequest(reservation_id=early.reservation_id))
        for t in r.token_ids
    ]
    assert len(tokens) == 3


def test_an_early_commit_that_does_not_fit_is_refused_and_freed(cluster: InProcessCluster, stub: Any) -> None:
    spec, layout, pages = _pages(cluster, 12)
    manifest = build_manifest(spec, layout, pages, with_checksum=False)
    small = _reserve_early(stub, spec, layout.num_pages - 1, "shm", 40)
    commit = decode_pb2.CommitKVRequest(
        reservation_id=small.reservation_id,
        checksum=page_checksum(pages),
        manifest=manifest,
        first_token_id=5,
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.CommitKV(commit, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["kvferry-field"] == "manifest.num_pages"
    bare = _reserve_early(stub, spec, layout.num_pages, "shm", 40)
    with pytest.raises(grpc.RpcError) as err:  # no manifest: the node cannot lay the pages out
        stub.CommitKV(decode_pb2.CommitKVRequest(reservation_id=bare.reservation_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for reservation in (small, bare):  # both freed: the fixture checks the pool, this the table
        with pytest.raises(grpc.RpcError) as gone:
            stub.CommitKV(decode_pb2.CommitKVRequest(reservation_id=reservation.reservation_id), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_early_reservation_needs_a_direct_transport(cluster: InProcessCluster, stub: Any) -> None:
    spec = ModelSpec.of_engine(cluster.decode.worker.engine)
    with pytest.raises(grpc.RpcError) as err:
        _reserve_early(stub, spec, 10, "grpc", 12)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["kvferry-field"] == "early"
    assert cluster.pool_state()["decode"] == (0, 0)


def test_prefill_reserves_early_for_prompts_longer_than_a_chunk(cluster: InProcessCluster) -> None:
    """Through the prefill service: a prompt of several chunks ships into an early reservation, a
    one-chunk prompt the usual way; both give the tokens of an uncompressed regular handoff."""
    channel = grpc.insecure_channel(cluster.address("prefill"))
    prefill = prefill_pb2_grpc.PrefillServiceStub(channel)
    decode = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(cluster.address("decode")))
    registry = cluster.hosts["prefill"].metrics
    counts: list[float] = []
    try:
        for length, compression in ((150, None), (150, 0.5), (40, 0.5)):
            request = prefill_pb2.PrefillRequest(
                request_id=f"p{length}-{compression}",
                prompt_token_ids=common_pb2.TokenIds(ids=[1 + i % 250 for i in range(length)]),
                sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True),
                decode_address=cluster.address("decode"),
                transport="shm",
            )
            if compression is not None:
                request.compression.method = "compactor"
                request.compression.retention = compression
            reply = prefill.Prefill(request, timeout=60)
            assert reply.stats.transport == "shm"
            tokens = [
                t
                for r in decode.Decode(
                    decode_pb2.DecodeRequest(reservation_id=reply.kv_handle.reservation_id)
                )
                for t in r.token_ids
            ]
            assert len(tokens) == 3
            cluster.assert_no_leaks()
            counts.append(registry.get_sample_value("kvferry_kv_early_reservations_total"))
    finally:
        channel.close()
    assert counts == [1, 2, 2]  # 150 tokens: 3 chunks of 64, reserved early; 40: one chunk, as usual


@pytest.mark.parametrize("when", ["reserved", "in_flight"])
def test_an_unused_early_reservation_is_freed(cluster: InProcessCluster, when: str) -> None:
    """A prefill that fails, is cancelled or ends at its first token never ships into its early
    reservation: its holder frees the decode pages at once, whether ReserveKV was answered (the handoff,
    once it took it) or still running (discard cancels it)."""
    pipeline = cluster.prefill
    spec = ModelSpec.of_engine(cluster.decode.worker.engine)
    sampling = common_pb2.SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)

    async def scenario() -> int:
        request = HandoffRequest(
            "unused", cluster.address("decode"), [1 + i % 250 for i in range(40)], sampling, spec, "shm",
            Deadline(10.0),
        )  # fmt: skip
        early = pipeline.handoff.early(request, 30)
        early.start()
        if when == "reserved":
            taken = await early.take()
            assert taken is not None and taken.num_pages == 30
            await taken.abort()  # what its holder does when the prefill failed after it came back
        else:
            await asyncio.sleep(0)  # ReserveKV sent, not answered
        await early.discard()
        await early.discard()  # idempotent
        return len(cluster.decode.reservations)

    left = cluster.run(scenario())
    if when == "reserved":
        assert left == 0  # Abort answered: freed now, not by its lease (5 s here)
    state = cluster.wait_idle(timeout=2.0)  # well inside the lease
    assert state == {"prefill": (0, 0), "decode": (0, 0)} and len(cluster.decode.reservations) == 0
    cluster.assert_no_leaks()


def test_a_direct_write_past_its_window_is_refused_and_writes_nothing(
    cluster: InProcessCluster, stub: Any
) -> None:
    """A write that would start after half the lease (counted from ReserveKV's send) may land in pages
    the decode node already freed and handed to another request: DirectWriteTransport refuses it."""
    from kvferry.kvtransfer.direct_transport import DirectWriteTransport
    from kvferry.kvtransfer.errors import LeaseLapsedError
    from kvferry.kvtransfer.transport import Shipment, write_deadline

    spec, layout, pages = _pages(cluster, 12)
    manifest = build_manifest(spec, layout, pages)
    sent_at = time.monotonic()
    reservation = _reserve(stub, manifest, "shm", 12)
    ids = decode_runs(list(reservation.page_runs))
    before = cluster.decode.worker.engine.pool.kv[ids].clone()
    mapped = MappedShmPool(
        ShmExport.from_bytes(stub.ExportKV(decode_pb2.ExportKVRequest(), timeout=10).pool_export)
    )
    transport = DirectWriteTransport("shm", mapped)
    late = write_deadline(sent_at - reservation.lease_seconds, reservation)  # as if reserved a lease ago
    assert late < time.monotonic() < write_deadline(sent_at, reservation)

    async def send(write_by: float) -> Any:
        channel = grpc.aio.insecure_channel(cluster.address("decode"))
        try:
            decode = DecodeClient(cluster.address("decode"), decode_pb2_grpc.DecodeServiceStub(channel))
            return await transport.send(decode, Shipment(reservation, pages, timeout=10, write_by=write_by))
        finally:
            await channel.close()

    with pytest.raises(LeaseLapsedError, match="lease"):
        cluster.run(send(late))
    assert torch.equal(cluster.decode.worker.engine.pool.kv[ids], before), "a page was written"
    result = cluster.run(send(write_deadline(sent_at, reservation)))  # in time: written and committed
    assert result.bytes_received == manifest.byte_count
    assert torch.equal(cluster.decode.worker.engine.pool.kv[ids], pages)
    request = decode_pb2.DecodeRequest(reservation_id=reservation.reservation_id)
    assert len([t for r in stub.Decode(request) for t in r.token_ids]) == 3  # and the pages are freed


def test_a_prefill_that_outlasts_its_early_reservation_reserves_again(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The early reservation is made when the last chunk starts; if the rest of the prefill takes longer
    than half its lease (an overloaded host), the handoff aborts it and ships into a fresh one: the
    request is served with the same tokens, and nothing leaks."""
    original = EarlyReservation.take

    async def aged_take(self: EarlyReservation) -> Any:
        taken = await original(self)
        if taken is not None:
            taken.sent_at -= taken.reply.lease_seconds  # as if sent a lease ago
        return taken

    def serve(request_id: str) -> tuple[list[int], Any]:
        channel = grpc.insecure_channel(cluster.address("prefill"))
        try:
            request = prefill_pb2.PrefillRequest(
                request_id=request_id,
                prompt_token_ids=common_pb2.TokenIds(ids=[1 + i % 250 for i in range(150)]),  # 3 chunks
                sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True),
                decode_address=cluster.address("decode"),
                transport="shm",
            )
            reply = prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(request, timeout=60)
        finally:
            channel.close()
        decode = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(cluster.address("decode")))
        rid = reply.kv_handle.reservation_id
        tokens = [t for r in decode.Decode(decode_pb2.DecodeRequest(reservation_id=rid)) for t in r.token_ids]
        return [reply.first_token_id, *tokens], reply.stats

    want, _ = serve("in-time")
    monkeypatch.setattr(EarlyReservation, "take", aged_take)
    with caplog.at_level(logging.WARNING, logger="kvferry.prefill_service.handoff"):
        got, stats = serve("lapsed")
    assert "lapsed: early reservation lapsed" in caplog.text
    assert got == want and stats.transport == "shm"
    state = cluster.wait_idle(timeout=2.0)  # the lapsed reservation was aborted, not left to its lease
    assert state == {"prefill": (0, 0), "decode": (0, 0)} and len(cluster.decode.reservations) == 0
    cluster.assert_no_leaks()


def test_nccl_starts_no_send_into_a_lapsed_reservation() -> None:
    """NCCL's receive happens inside CommitKV: past the window, the decode node may have dropped the
    reservation, and a send would have no receiver. Neither the send nor CommitKV starts."""
    from kvferry.kvtransfer.direct_transport import NcclTransport
    from kvferry.kvtransfer.errors import LeaseLapsedError
    from kvferry.kvtransfer.transport import Shipment

    calls: list[str] = []

    class Pair:
        pair_id = "p"

        def send_pages(self, payload: torch.Tensor, timeout: float | None) -> None:
            calls.append("send")

    class Decode:
        async def commit(self, request: Any, timeout: float | None) -> Any:
            calls.append("commit")
            return decode_pb2.CommitKVResponse(bytes_received=64)

    reservation = decode_pb2.ReserveKVResponse(reservation_id="r", lease_seconds=2.0)
    transport = NcclTransport(Pair(), asyncio.Lock())  # type: ignore[arg-type]
    pages = torch.zeros(4, 4)  # 64 bytes
    with pytest.raises(LeaseLapsedError):
        asyncio.run(transport.send(Decode(), Shipment(reservation, pages, write_by=time.monotonic() - 0.1)))  # type: ignore[arg-type]
    assert calls == []
    result = asyncio.run(
        transport.send(Decode(), Shipment(reservation, pages, write_by=time.monotonic() + 10))
    )  # type: ignore[arg-type]
    assert sorted(calls) == ["commit", "send"] and result.bytes_received == 64
