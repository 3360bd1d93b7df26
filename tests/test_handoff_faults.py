"""A failure at each step of the KV handoff leaves no page behind on either node (docs/kv-handoff.md).

Through the whole path (client -> coordinator -> prefill -> transport -> decode) on the tiny random
llama, over `shm` (a direct transport: ExportKV, mapped pool, CommitKV) and `grpc` (PushKV), with a
prompt of one prefill chunk (ReserveKV after prefill) and one of three (the early reservation, for
shm). A test hook makes one step fail, or holds it while the client cancels or its deadline passes;
then both pools are empty and no reservation is left, well inside the lease (30 s here: what frees
the pages is the owner of each side, not the lease), and the next request is served. The decode node's
death runs on real processes (LocalCluster), as in test_faults.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from builders import TinyModel
from cluster import ClusterSpec, InProcessCluster

from kvferry.clients import Client, KvferryRpcError
from kvferry.decode_service.client import DecodeClient
from kvferry.decode_service.kv_receiver import IncomingRequest, KVReceiver
from kvferry.engine.errors import UnavailableError
from kvferry.kvtransfer.device_util import PeerUnreachableError
from kvferry.kvtransfer.errors import TransferIntegrityError
from kvferry.kvtransfer.shm import MappedShmPool
from kvferry.prefill_service.decode_reservation import DecodeReservation
from kvferry.prefill_service.links import LocalEnd
from kvferry.prefill_service.prefill_engine import PrefillEngine
from kvferry.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

PAGE_SIZE = 4
CHUNK = 64
LEASE_SECONDS = 30.0  # far beyond every wait here: a leak the owners miss would show
FREED_WITHIN = 5.0
LENGTHS = {"one_chunk": 40, "early": 150}  # 150 tokens: three chunks, reserved early over shm


@pytest.fixture(scope="module", params=["shm", "grpc"])
def cluster(
    request: pytest.FixtureRequest, tiny_model: Callable[[str], TinyModel]
) -> Iterator[InProcessCluster]:
    engine = dict(
        model=str(tiny_model("llama").path), device="cpu", dtype="float32", page_size=PAGE_SIZE,
        prefill_chunk=CHUNK, max_model_len=512, kv_cache_bytes=2 << 20, torch_threads=1,
    )  # fmt: skip
    spec = ClusterSpec(
        engine=engine,
        decode=dict(lease_seconds=LEASE_SECONDS, max_chunk_bytes=64 << 10),
        prefill=dict(transport=request.param, chunk_bytes=1 << 10),  # several PushKV chunks per request
    )
    c = InProcessCluster(spec).start()
    yield c
    c.stop()


def _tokens(n: int, seed: int) -> list[int]:
    return [1 + (seed * 31 + 7 * i) % 250 for i in range(n)]


def _unary(tokens: list[int], max_new_tokens: int = 6) -> coordinator_pb2.GenerateUnaryRequest:
    return coordinator_pb2.GenerateUnaryRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=tokens),
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def _assert_freed_and_serving(cluster: InProcessCluster) -> None:
    """Both pools empty and no reservation left, within FREED_WITHIN seconds; then a request is served."""
    state = cluster.wait_idle(timeout=FREED_WITHIN)
    assert state == {"prefill": (0, 0), "decode": (0, 0)}, f"pages still held (used, reserved): {state}"
    assert len(cluster.decode.reservations) == 0, "a decode reservation outlived its request"
    cluster.assert_no_leaks()
    with Client(cluster.coordinator_address, timeout=60) as client:
        assert (
            len(client.generate(_tokens(30, 99), max_new_tokens=3, temperature=0, ignore_eos=True).token_ids)
            == 3
        )
    cluster.assert_no_leaks()


class Gate:
    """Holds an async method at its start until the test releases it, and says whether the call was
    cancelled while held (the client went away or its deadline passed)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.cancelled = threading.Event()
        self.release = threading.Event()

    def around(self, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def held(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            try:
                await asyncio.to_thread(self.release.wait, 60.0)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return await method(*args, **kwargs)

        return held


def _raising(error: BaseException, fired: threading.Event) -> Callable[..., Any]:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        fired.set()
        raise error

    return fail


# ---- a step fails ---------------------------------------------------------------------------------
def _inject(
    step: str, transport: str, cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> threading.Event:
    """Make `step` fail on every request until the test ends; the event is set when it did."""
    fired = threading.Event()
    if step == "reserve":  # the decode node refuses ReserveKV (the early one, then the one after prefill)
        monkeypatch.setattr(
            KVReceiver, "reserve", _raising(UnavailableError("injected: no ReserveKV"), fired)
        )
    elif step == "open" and transport == "shm":  # the pool cannot be mapped
        cluster.prefill.handoff.links.link(cluster.address("decode")).forget()
        monkeypatch.setattr(LocalEnd, "open", _raising(UnavailableError("injected: no mapping"), fired))
    elif step == "open":  # the PushKV stream cannot be opened
        monkeypatch.setattr(DecodeClient, "push", _raising(UnavailableError("injected: no stream"), fired))
    elif step == "send" and transport == "shm":  # the write into the mapped pool fails

        def write(*args: Any, **kwargs: Any) -> float:
            fired.set()
            raise PeerUnreachableError("injected: the mapped pool went away")

        monkeypatch.setattr(MappedShmPool, "write", write)
    elif step == "send":  # the byte stream breaks after its first chunk
        accept = IncomingRequest.accept

        def accept_one(self: IncomingRequest, offset: int, data: bytes) -> None:
            if offset > 0:
                fired.set()
                raise TransferIntegrityError("injected: the stream broke")
            accept(self, offset, data)

        monkeypatch.setattr(IncomingRequest, "accept", accept_one)
    else:
        assert step == "commit", step  # the pages arrived and were verified; the commit fails
        monkeypatch.setattr(
            KVReceiver, "_commit", _raising(TransferIntegrityError("injected: no commit"), fired)
        )
    return fired


EXPECTED = {
    "reserve": grpc.StatusCode.UNAVAILABLE,
    "open": grpc.StatusCode.UNAVAILABLE,
    "send": {"shm": grpc.StatusCode.UNAVAILABLE, "grpc": grpc.StatusCode.DATA_LOSS},
    "commit": grpc.StatusCode.DATA_LOSS,
}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("step", EXPECTED)
def test_a_failed_step_frees_both_nodes(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch, step: str, length: str
) -> None:
    transport = cluster.spec.prefill["transport"]
    fired = _inject(step, transport, cluster, monkeypatch)
    with Client(cluster.coordinator_address, timeout=60) as client, pytest.raises(KvferryRpcError) as err:
        client.generate(_tokens(LENGTHS[length], 1), max_new_tokens=6, temperature=0, ignore_eos=True)
    expected = EXPECTED[step]
    assert err.value.code == (expected[transport] if isinstance(expected, dict) else expected), err.value
    assert fired.is_set()
    monkeypatch.undo()
    _assert_freed_and_serving(cluster)


# ---- the caller goes away during the commit -------------------------------------------------------
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_caller_gone_during_the_commit_frees_both_nodes(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch, how: str, length: str
) -> None:
    """The decode node holds the commit (the reservation is made and the pages are on their way)
    until the client's cancel, or its deadline, has reached it through coordinator and prefill."""
    gate = Gate()
    monkeypatch.setattr(KVReceiver, "_commit", gate.around(KVReceiver._commit))
    registry = cluster.hosts["prefill"].metrics
    early = registry.get_sample_value("kvferry_kv_early_reservations_total")
    with grpc.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        timeout = 3.0 if how == "deadline" else 60.0
        call = stub.GenerateUnary.future(_unary(_tokens(LENGTHS[length], 2)), timeout=timeout)
        try:
            assert gate.entered.wait(30), "the request never reached the commit"
            if how == "cancel":
                assert call.cancel()
            else:
                with pytest.raises(grpc.RpcError) as err:
                    call.result(timeout=60)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert gate.cancelled.wait(10), "the decode node's commit was not cancelled"
        finally:
            gate.release.set()
    assert registry.get_sample_value("kvferry_kv_early_reservations_total") == early  # nothing committed
    monkeypatch.undo()
    _assert_freed_and_serving(cluster)


def test_a_request_ended_by_its_first_token_frees_its_early_reservation(
    cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early reservation is made when the last chunk starts; a first token that ends the request
    leaves it unused. Here the prefill ends only once the decode node answered it, so the prefill node
    must abort it (an unanswered one is cancelled instead, which frees it on the decode node)."""
    if cluster.spec.prefill["transport"] != "shm":
        pytest.skip("early reservations are for direct transports")
    answered = threading.Event()
    reserve, prefill = DecodeReservation.reserve, PrefillEngine.prefill

    async def reserve_and_tell(cls: type, *args: Any) -> DecodeReservation:
        reservation = await reserve(*args)
        answered.set()
        return reservation

    async def prefill_after_the_answer(self: PrefillEngine, *args: Any) -> Any:
        outcome = await prefill(self, *args)
        assert await asyncio.to_thread(answered.wait, 30)
        return outcome

    monkeypatch.setattr(DecodeReservation, "reserve", classmethod(reserve_and_tell))
    monkeypatch.setattr(PrefillEngine, "prefill", prefill_after_the_answer)
    with Client(cluster.coordinator_address, timeout=60) as client:
        reply = client.generate(_tokens(LENGTHS["early"], 3), max_new_tokens=1, temperature=0)
    assert len(reply.token_ids) == 1 and reply.finish_reason == "length"
    assert answered.is_set()
    monkeypatch.undo()
    _assert_freed_and_serving(cluster)


# ---- the decode node dies during the handoff ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_decode_death_during_the_handoff_frees_the_prefill_node(
    tiny_model: Callable[[str], TinyModel], tmp_path: Path, transport: str
) -> None:
    """Real processes: the decode pool is promised to other reservations, so the request's ReserveKV
    waits for room (the early one too, over shm); the decode node is killed -9 while it waits. The
    client gets UNAVAILABLE, the prefill node holds nothing, and once the decode node is back the next
    request is served and both pools are empty again."""
    from test_faults import pools, wait_empty

    from kvferry.clients.local_cluster import LocalCluster

    engine = ["--model", str(tiny_model("llama").path), "--device", "cpu", "--dtype", "float32",
              "--page-size", str(PAGE_SIZE), "--prefill-chunk", str(CHUNK), "--max-model-len", "512",
              "--torch-threads", "1", "--log-level", "INFO"]  # fmt: skip
    c = LocalCluster(
        engine_args=engine,
        decode_args=["--kv-cache-bytes", str(1 << 20), "--lease-seconds", str(LEASE_SECONDS)],
        prefill_args=["--kv-cache-bytes", str(2 << 20), "--transport", transport],
        log_dir=tmp_path,
    )
    c.start()
    try:
        c.wait_ready(timeout=180)
        _promise_the_decode_pool(c)
        with Client(c.coordinator_address, timeout=60) as client:
            outcome: dict[str, Any] = {}

            def ask() -> None:
                try:
                    client.generate(_tokens(LENGTHS["early"], 4), max_new_tokens=6, ignore_eos=True)
                except KvferryRpcError as e:
                    outcome["error"] = e

            asker = threading.Thread(target=ask)
            asker.start()
            log = tmp_path / "prefill.log"
            deadline = time.monotonic() + 60
            while "waiting for pages" not in log.read_text():  # the prefill node's ReserveKV waits
                assert time.monotonic() < deadline and asker.is_alive(), "the request never waited for room"
                time.sleep(0.05)
            c.kill("decode")
            asker.join(60)
            assert outcome["error"].code == grpc.StatusCode.UNAVAILABLE, outcome
        c.start_node("decode")
        c.wait_ready(timeout=120, nodes=["decode"])
        assert pools(c)["prefill"] == (0, 0)
        with Client(c.coordinator_address, timeout=60) as client:
            assert len(client.generate(_tokens(50, 5), max_new_tokens=3, ignore_eos=True).token_ids) == 3
        _, state, reservations = wait_empty(c, FREED_WITHIN)
        assert state == {"prefill": (0, 0), "decode": (0, 0)} and reservations == 0, (state, reservations)
    finally:
        c.stop()


def _promise_the_decode_pool(cluster: Any) -> None:
    """Reserve (and never fill) grpc reservations until the decode node answers RESOURCE_EXHAUSTED."""
    from test_faults import grpc_reserve_request

    from kvferry.v1 import decode_pb2_grpc

    with grpc.insecure_channel(cluster.address("decode")) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        request = grpc_reserve_request(stub, "holder", 400, max_new_tokens=100)
        with pytest.raises(grpc.RpcError) as full:
            for _ in range(100):
                stub.ReserveKV(request, timeout=10)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
