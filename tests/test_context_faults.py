"""kill -9 of either node in the middle of a request on a cached context, on real processes
(LocalCluster) with the tiny random llama: the survivor frees everything it held for the request (its
pages, its reservation, its pin on the context and its claim to be receiving it) while its cache keeps
the contexts no request uses, read through the services' own Info; a restarted node is served again
with the right tokens."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from builders import TinyModel
from cluster import process_cluster

from kvferry.clients import AsyncClient, Client, KvferryRpcError
from kvferry.clients.local_cluster import LocalCluster
from kvferry.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

pytestmark = pytest.mark.slow
LEASE_SECONDS = 3.0
VOCAB = 300
COMPACTOR = {"method": "compactor", "retention": 0.5}


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(
    tiny_model: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    with process_cluster(
        tiny_model("llama").path, tmp_path_factory.mktemp("context_fault_logs"), LEASE_SECONDS
    ) as c:
        yield c


def prefill_info(cluster: LocalCluster) -> prefill_pb2.PrefillInfoResponse:
    stub = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(cluster.address("prefill")))
    return stub.Info(prefill_pb2.PrefillInfoRequest(), timeout=5)


def decode_info(cluster: LocalCluster) -> decode_pb2.DecodeInfoResponse:
    stub = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(cluster.address("decode")))
    return stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5)


def holds_nothing_for_requests(info: prefill_pb2.PrefillInfoResponse | decode_pb2.DecodeInfoResponse) -> bool:
    """No page but the cache's, nothing reserved, no context in use or arriving."""
    pool, cache = info.pool, info.context_cache
    idle = pool.used_pages == pool.cached_pages and pool.reserved_pages == 0
    return idle and cache.pinned_entries == 0 and cache.computing == 0


def wait_freed(read: Callable[[], object], timeout: float) -> float:
    start = time.monotonic()
    while True:
        info = read()
        if holds_nothing_for_requests(info) and getattr(info, "reservations", 0) == 0:  # type: ignore[arg-type]
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"still held {timeout} s after the kill: {info}"
        time.sleep(0.02)


def restart(cluster: LocalCluster, node: str) -> None:
    cluster.start_node(node)
    cluster.wait_ready(timeout=120, nodes=[node])


def ask(client: Client, context: list[int], question: list[int], n: int = 6) -> object:
    """Retried while the cluster reconnects after a restart."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.generate(
                question, context=context, cache_context=True, compression=COMPACTOR, max_new_tokens=n,
                temperature=0, ignore_eos=True,
            )  # fmt: skip
        except KvferryRpcError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def _stream_then_kill(
    cluster: LocalCluster, node: str, context: list[int], question: list[int]
) -> None:
    """A long answer on a cached context; `node` is killed once its first tokens arrived."""
    async with AsyncClient(cluster.coordinator_address, timeout=60) as c:
        stream = c.stream(
            question, context=context, cache_context=True, compression=COMPACTOR, max_new_tokens=300,
            temperature=0, ignore_eos=True,
        )  # fmt: skip
        with pytest.raises(KvferryRpcError) as err:
            async for _ in stream:
                if cluster.processes[node].poll() is None:
                    cluster.kill(node)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_decode_killed_mid_cached_request_leaves_the_prefill_node_clean(cluster: LocalCluster) -> None:
    context, question = tokens(150, seed=1), tokens(6, seed=2)
    with Client(cluster.coordinator_address, timeout=60) as client:
        first = ask(client, context, question)
        assert first.stats.decode.context_cache == "miss"  # type: ignore[attr-defined]
        asyncio.run(_stream_then_kill(cluster, "decode", context, tokens(8, seed=3)))
        freed = wait_freed(lambda: prefill_info(cluster), timeout=5)
        assert prefill_info(cluster).context_cache.device_entries == 1  # the context stays cached there
        restart(cluster, "decode")
        again = ask(client, context, question)
    assert again.token_ids == first.token_ids  # type: ignore[attr-defined]
    assert again.stats.prefill.context_cache == "hit"  # type: ignore[attr-defined]
    assert again.stats.decode.context_cache == "miss"  # type: ignore[attr-defined]  # a new decode process
    wait_freed(lambda: decode_info(cluster), timeout=5)
    print(f"\ndecode kill mid cached request: prefill side clean {freed:.3f} s later")


def test_prefill_killed_mid_context_transfer_frees_the_decode_side(cluster: LocalCluster) -> None:
    """The prefill node ships over grpc in 16-byte chunks (seconds per context) and is killed while the
    decode node receives a context it did not hold: its pages, reservation and claim go, and the
    context is received whole on the next request."""
    normal = list(cluster.prefill_args)
    cluster.kill("prefill")
    cluster.prefill_args = [*normal, "--transport", "grpc", "--chunk-bytes", "16"]
    context, question = tokens(200, seed=10), tokens(5, seed=11)
    try:
        restart(cluster, "prefill")
        cached_before = decode_info(cluster).context_cache.device_entries

        async def request_and_kill() -> float:
            async with AsyncClient(cluster.coordinator_address, timeout=60) as c:
                task = asyncio.ensure_future(
                    c.generate(question, context=context, cache_context=True, compression=COMPACTOR,
                               max_new_tokens=4, ignore_eos=True)
                )  # fmt: skip
                deadline = time.monotonic() + 30
                while decode_info(cluster).context_cache.computing == 0:  # the context is arriving
                    assert time.monotonic() < deadline and not task.done(), (
                        "the context never started to arrive"
                    )
                    await asyncio.sleep(0.01)
                cluster.kill("prefill")
                killed = time.monotonic()
                with pytest.raises(KvferryRpcError):
                    await task
                return killed

        killed = asyncio.run(request_and_kill())
        freed = (
            wait_freed(lambda: decode_info(cluster), timeout=LEASE_SECONDS + 2) + time.monotonic() - killed
        )
        assert decode_info(cluster).context_cache.device_entries == cached_before  # nothing half-received
    finally:
        cluster.kill("prefill")
        cluster.prefill_args = normal
        restart(cluster, "prefill")
    with Client(cluster.coordinator_address, timeout=60) as client:
        served = ask(client, context, question)
        assert served.stats.decode.context_cache == "miss"  # type: ignore[attr-defined]
        hit = ask(client, context, tokens(7, seed=12))
        assert hit.stats.decode.context_cache == "hit"  # type: ignore[attr-defined]
    wait_freed(lambda: decode_info(cluster), timeout=5)
    wait_freed(lambda: prefill_info(cluster), timeout=5)
    print(f"\nprefill kill mid context transfer: decode side clean {freed:.3f} s after the kill")
