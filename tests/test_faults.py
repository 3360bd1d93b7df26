"""Faults on real processes (LocalCluster: coordinator, prefill and decode as `python -m` children) on
the tiny random llama: kill -9 of decode mid-stream and of prefill mid-transfer, coordinator and node
restarts, cancellation, a bounded load test with 64 concurrent clients, and fuzzed requests. Every
test ends with both KV pools empty, read through the services' own Info."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from builders import TinyModel
from cluster import process_cluster

from kvferry.clients import AsyncClient, Client, KvferryRpcError
from kvferry.clients.local_cluster import LocalCluster
from kvferry.serving.healthcheck import is_serving
from kvferry.v1 import decode_pb2, decode_pb2_grpc

pytestmark = pytest.mark.slow
LEASE_SECONDS = 2.0
VOCAB = 300


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(
    tiny_model: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    with process_cluster(tiny_model("llama").path, tmp_path_factory.mktemp("fault_logs"), LEASE_SECONDS) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    """A client on a healthy cluster (nodes a previous test killed are restarted first); the test must
    leave both pools empty."""
    dead = [n for n, p in cluster.processes.items() if p.poll() is not None]
    for node in dead:
        cluster.start_node(node)
    if dead:
        cluster.wait_ready(timeout=120, nodes=dead)
    with Client(cluster.coordinator_address, timeout=60) as c:
        yield c
        assert_no_leaks(cluster)


def decode_stub(cluster: LocalCluster) -> decode_pb2_grpc.DecodeServiceStub:
    return decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(cluster.address("decode")))


def pools(cluster: LocalCluster) -> dict[str, tuple[int, int]]:
    """(used, reserved) pages of each engine service, from Info through the coordinator."""
    with Client(cluster.coordinator_address, timeout=10) as c:
        info = c.info()
    out = {}
    for kind, nodes in (("prefill", info.prefill_nodes), ("decode", info.decode_nodes)):
        (node,) = nodes
        assert node.reachable, node.error
        out[kind] = (node.pool.used_pages, node.pool.reserved_pages)
    return out


def wait_empty(cluster: LocalCluster, timeout: float) -> tuple[float, dict[str, tuple[int, int]], int]:
    """Seconds until both pools hold nothing and decode has no reservation (or the timeout)."""
    start = time.monotonic()
    stub = decode_stub(cluster)
    while True:
        state = pools(cluster)
        reservations = stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5).reservations
        elapsed = time.monotonic() - start
        if (all(v == (0, 0) for v in state.values()) and reservations == 0) or elapsed > timeout:
            return elapsed, state, reservations
        time.sleep(0.02)


def assert_no_leaks(cluster: LocalCluster, timeout: float = LEASE_SECONDS + 3) -> None:
    _, state, reservations = wait_empty(cluster, timeout)
    assert state == {"prefill": (0, 0), "decode": (0, 0)} and reservations == 0, (state, reservations)


def retry_until_served(cluster: LocalCluster, timeout: float) -> float:
    """Seconds until a request goes through again (nodes reconnecting after a restart)."""
    start = time.monotonic()
    with Client(cluster.coordinator_address, timeout=20) as c:
        while True:
            try:
                r = c.generate(tokens(30, 1), max_new_tokens=4, temperature=0, ignore_eos=True)
                assert len(r.token_ids) == 4
                return time.monotonic() - start
            except KvferryRpcError as e:
                assert e.code == grpc.StatusCode.UNAVAILABLE, e
                assert time.monotonic() - start < timeout, f"not served again after {timeout} s: {e}"
                time.sleep(0.1)


# ---- cancellation ---------------------------------------------------------------------------------
def test_cancel_frees_pages_on_both_services_within_1s(cluster: LocalCluster, client: Client) -> None:
    """The longest request the tiny model allows (~1.2 s of decode) is cancelled after its first
    chunk; both pools are empty within 1 s. A request that already finished by the time the client
    closed proves nothing, so at least one of three must have been cancelled while decoding."""
    cancelled_while_decoding = 0
    for seed in range(3):
        stream = client.stream(tokens(20, seed), max_new_tokens=480, temperature=0, ignore_eos=True)
        assert next(stream).finish_reason is None
        decoding = _running(cluster.address("decode")) > 0  # really decoding, holding pages
        stream.close()
        elapsed, state, reservations = wait_empty(cluster, 5.0)
        assert elapsed < 1.0, (elapsed, state, reservations)
        cancelled_while_decoding += decoding
        print(f"\ncancel: both pools empty {elapsed:.3f} s after the client closed its stream")
    assert cancelled_while_decoding >= 1


# ---- load -----------------------------------------------------------------------------------------
def test_64_concurrent_clients_lose_nothing_and_leak_nothing(cluster: LocalCluster, client: Client) -> None:
    """64 clients, each sending requests back to back for ~30 s (mixed prompt lengths, outputs,
    compression, unary and streamed): every request completes with exactly its tokens."""
    duration = 30.0

    async def one_client(i: int, stop_at: float) -> list[tuple[int, int]]:
        rng = random.Random(i)
        done = []
        async with AsyncClient(cluster.coordinator_address, timeout=120) as c:
            while time.monotonic() < stop_at:
                n = rng.choice([4, 8, 16, 32])
                kwargs: dict[str, Any] = dict(max_new_tokens=n, temperature=0, ignore_eos=True)
                if rng.random() < 0.5:
                    kwargs["compression"] = {"method": "compactor", "retention": 0.5, "sink": 2, "recent": 8}
                prompt = tokens(rng.randrange(8, 300), rng.randrange(10**6))
                if rng.random() < 0.5:
                    got = len((await c.generate(prompt, **kwargs)).token_ids)
                else:
                    got = sum([len(chunk.token_ids) async for chunk in c.stream(prompt, **kwargs)])
                done.append((n, got))
        return done

    async def run() -> list[list[tuple[int, int]]]:
        stop_at = time.monotonic() + duration
        return await asyncio.gather(*(one_client(i, stop_at) for i in range(64)))

    before = client.stats()
    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    pairs = [p for r in results for p in r]
    assert all(len(r) >= 1 for r in results)  # every client was served (no starvation)
    assert all(want == got for want, got in pairs), [p for p in pairs if p[0] != p[1]][:5]
    after = client.stats()
    assert after.requests_total - before.requests_total == len(pairs)
    assert after.requests_failed == before.requests_failed and after.requests_active == 0
    print(
        f"\nload: {len(pairs)} requests, {sum(g for _, g in pairs)} tokens from 64 clients in {elapsed:.1f} s"
    )


# ---- fuzz -----------------------------------------------------------------------------------------
def test_fuzzed_requests_never_crash_a_service(cluster: LocalCluster, client: Client) -> None:
    from fuzzing import fuzz_cluster

    fuzz_cluster(cluster)
    for node, process in cluster.processes.items():
        assert process.poll() is None, f"{node} died"
        assert is_serving(cluster.address(node)), node


# ---- kill -9 --------------------------------------------------------------------------------------
def test_decode_killed_mid_stream_is_unavailable_within_2s(cluster: LocalCluster, client: Client) -> None:
    stream = client.stream(tokens(20, 7), max_new_tokens=480, temperature=0, ignore_eos=True)
    next(stream)  # ~1.2 s of decode left
    killed = time.monotonic()
    cluster.kill("decode")
    with pytest.raises(KvferryRpcError) as err:
        for _ in stream:
            pass
    elapsed = time.monotonic() - killed
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
    assert elapsed < 2.0, elapsed
    # the prefill node holds nothing of that request, and a restarted decode node is found again
    cluster.start_node("decode")
    cluster.wait_ready(timeout=120, nodes=["decode"])
    served_after = retry_until_served(cluster, timeout=15)
    print(
        f"\ndecode kill: UNAVAILABLE after {elapsed:.3f} s; served again {served_after:.2f} s after restart"
    )


def test_prefill_killed_mid_transfer_frees_the_decode_reservation(
    cluster: LocalCluster, client: Client
) -> None:
    """A prefill node that ships pages over grpc in 16-byte chunks (so the transfer lasts seconds) is
    killed once the decode node holds its reservation; the decode node frees it (stream break, or lease)."""
    normal = list(cluster.prefill_args)
    cluster.kill("prefill")
    cluster.prefill_args = [*normal, "--transport", "grpc", "--chunk-bytes", "16"]
    try:
        cluster.start_node("prefill")
        cluster.wait_ready(timeout=120, nodes=["prefill"])
        stub = decode_stub(cluster)

        async def request_and_kill() -> tuple[KvferryRpcError | None, float]:
            async with AsyncClient(cluster.coordinator_address, timeout=60) as c:
                task = asyncio.ensure_future(c.generate(tokens(400, 3), max_new_tokens=8, ignore_eos=True))
                deadline = time.monotonic() + 30
                while stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5).reservations == 0:
                    assert time.monotonic() < deadline and not task.done(), "no reservation was made"
                    await asyncio.sleep(0.01)
                cluster.kill("prefill")
                killed = time.monotonic()
                try:
                    await task
                except KvferryRpcError as e:
                    return e, killed
                return None, killed

        error, killed = asyncio.run(request_and_kill())
        assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE, error
        freed = None
        while time.monotonic() - killed < LEASE_SECONDS + 2:
            info = stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5)
            if info.reservations == 0 and info.pool.used_pages == info.pool.reserved_pages == 0:
                freed = time.monotonic() - killed
                break
            time.sleep(0.02)
        assert freed is not None, "the decode reservation outlived its lease"
        print(
            f"\nprefill kill mid-transfer: decode pages freed {freed:.3f} s later (lease {LEASE_SECONDS} s)"
        )
    finally:
        cluster.kill("prefill")
        cluster.prefill_args = normal
        cluster.start_node("prefill")
        cluster.wait_ready(timeout=120, nodes=["prefill"])
    retry_until_served(cluster, timeout=15)


def test_coordinator_restart_finds_its_nodes_again(cluster: LocalCluster, client: Client) -> None:
    client.generate(tokens(20, 2), max_new_tokens=2)
    cluster.kill("coordinator")
    start = time.monotonic()
    cluster.start_node("coordinator")
    cluster.wait_ready(timeout=60, nodes=["coordinator"])
    served = retry_until_served(cluster, timeout=10)
    print(
        f"\ncoordinator restart: serving again {time.monotonic() - start:.2f} s after kill ({served:.2f} s after ready)"
    )


def test_logs_carry_the_request_id_across_processes(cluster: LocalCluster, client: Client) -> None:
    client.generate(tokens(40, 5), max_new_tokens=3, request_id="fault-trace-7", ignore_eos=True)
    assert cluster.log_dir is not None
    for node in ("coordinator", "prefill", "decode"):
        text = Path(cluster.log_dir / f"{node}.log").read_text()
        assert "[fault-trace-7]" in text, f"{node}: no line names the request"


def grpc_reserve_request(
    stub: decode_pb2_grpc.DecodeServiceStub, request_id: str, prompt_len: int, max_new_tokens: int
) -> decode_pb2.ReserveKVRequest:
    """A ReserveKV for the grpc transfer of a `prompt_len`-token prompt's whole KV (zero pages), for the
    model the decode node behind `stub` serves."""
    import torch

    from kvferry.engine.kv_handoff import KVLayout
    from kvferry.kvtransfer import ModelSpec, build_manifest, pages_to_bytes
    from kvferry.v1 import common_pb2

    info = stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5)
    m = info.model
    spec = ModelSpec(m.fingerprint, m.dtype, info.pool.page_size, m.num_layers, m.num_kv_heads, m.head_dim, 4)
    layout = KVLayout(torch.full((m.num_layers, m.num_kv_heads), prompt_len), spec.page_size)
    payload = pages_to_bytes(torch.zeros(layout.num_pages, 2, spec.page_size, spec.head_dim))
    return decode_pb2.ReserveKVRequest(
        request_id=request_id,
        manifest=build_manifest(spec, layout, payload),
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
        prompt_token_ids=tokens(prompt_len, 9),
        first_token_id=5,
        transport="grpc",
    )


RESERVER = """
import sys, time, grpc
from kvferry.v1 import decode_pb2, decode_pb2_grpc
request = decode_pb2.ReserveKVRequest.FromString(open(sys.argv[2], "rb").read())
stub = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(sys.argv[1]))
print(stub.ReserveKV(request, timeout=10).reservation_id, flush=True)
time.sleep(600)  # killed before any page is sent
"""


def test_sender_killed_between_reserve_and_pages_is_freed_by_the_lease(
    cluster: LocalCluster, client: Client, tmp_path: Path
) -> None:
    """A process that reserved KV on the decode node is kill -9'd before sending a page: nothing
    breaks on the decode side (no stream is open), so only the lease can free the pages."""
    import subprocess
    import sys

    stub = decode_stub(cluster)
    request = grpc_reserve_request(stub, "doomed-sender", 40, max_new_tokens=8)
    (tmp_path / "reserve.bin").write_bytes(request.SerializeToString())
    sender = subprocess.Popen(
        [sys.executable, "-P", "-c", RESERVER, cluster.address("decode"), str(tmp_path / "reserve.bin")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        reservation_id = sender.stdout.readline().strip()  # type: ignore[union-attr]
        assert reservation_id, "the sender could not reserve"
        assert stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5).reservations == 1
    finally:
        sender.kill()
        sender.wait()
    elapsed, state, reservations = wait_empty(cluster, LEASE_SECONDS + 3)
    assert state["decode"] == (0, 0) and reservations == 0, (state, reservations)
    assert LEASE_SECONDS * 0.5 < elapsed <= LEASE_SECONDS + 1.5, elapsed  # the lease, not anything sooner
    print(f"\nsender kill before pages: reservation freed by its lease {elapsed:.2f} s after the kill")


def test_decode_killed_mid_stream_is_continued_on_another_decode_node(
    cluster: LocalCluster, client: Client, tmp_path: Path
) -> None:
    """A second decode node and a coordinator that knows both: the decode node serving a stream is
    kill -9'd mid-stream; the coordinator continues the request (prompt + tokens streamed so far) on
    the other one, and the client reads one uninterrupted answer, equal to an undisturbed run."""
    import subprocess
    import sys

    from kvferry.clients.local_cluster import free_port

    ports = {"decode2": free_port(), "coordinator2": free_port()}
    decodes = [cluster.address("decode"), f"127.0.0.1:{ports['decode2']}"]
    log = tmp_path / "coordinator2.log"
    children = {
        "decode2": subprocess.Popen(
            [sys.executable, "-P", "-m", "kvferry.decode_service", "--port", str(ports["decode2"]),
             *cluster.engine_args, *cluster.decode_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        "coordinator2": subprocess.Popen(
            [sys.executable, "-P", "-m", "kvferry.coordinator", "--port", str(ports["coordinator2"]), "--log-level", "INFO",
             "--prefill-addresses", cluster.address("prefill"), "--decode-addresses", ",".join(decodes)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        ),
    }  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        for name, port in ports.items():
            while not is_serving(f"127.0.0.1:{port}", timeout=1.0):
                assert children[name].poll() is None and time.monotonic() < deadline, f"{name} did not start"
                time.sleep(0.25)
        prompt = tokens(20, 11)
        kwargs: dict[str, Any] = dict(max_new_tokens=480, temperature=0, ignore_eos=True)
        with Client(f"127.0.0.1:{ports['coordinator2']}", timeout=120) as c2:
            expected = c2.generate(prompt, **kwargs).token_ids
            stream = c2.stream(prompt, **kwargs)
            got = list(next(stream).token_ids)  # ~1.2 s of decode left
            busy = [a for a in decodes if _running(a) > 0]
            assert len(busy) == 1, busy
            if busy[0] == cluster.address("decode"):
                cluster.kill("decode")
            else:
                children["decode2"].kill()
            chunks = list(stream)
        got += [t for chunk in chunks for t in chunk.token_ids]
        assert chunks[-1].finish_reason == "length" and chunks[-1].stats is not None
        assert "continuing on another decode node" in log.read_text()
        assert got == expected
    finally:
        for child in children.values():
            child.kill()
            child.wait()
        if cluster.processes["decode"].poll() is not None:  # the client fixture checks its pool next
            cluster.start_node("decode")
            cluster.wait_ready(timeout=120, nodes=["decode"])


def _running(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = decode_pb2_grpc.DecodeServiceStub(channel)
        return stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5).running


def test_tls_cluster_of_real_processes(tiny_model: Callable[[str], TinyModel], tmp_path: Path) -> None:
    """The three processes configured only through KVFERRY_* env (as in compose): mutual TLS between
    all of them and the token on every port; a client with the CA and token is served, and a
    plaintext one is refused."""
    from certs import make_pki

    from kvferry.serving.security import client_credentials

    pki = make_pki(tmp_path / "pki")
    env = {
        "KVFERRY_TLS_CERT": str(pki.service_cert),
        "KVFERRY_TLS_KEY": str(pki.service_key),
        "KVFERRY_TLS_CLIENT_CA": str(pki.ca),
        "KVFERRY_TLS_CA": str(pki.ca),
        "KVFERRY_AUTH_TOKEN": "real-process-token",  # every service requires it and sends it
    }
    engine = ["--model", str(tiny_model("llama").path), "--device", "cpu", "--dtype", "float32",
              "--page-size", "4", "--max-model-len", "512", "--kv-cache-bytes", str(2 << 20),
              "--torch-threads", "1"]  # fmt: skip
    c = LocalCluster(
        engine_args=engine,
        env=env,
        log_dir=tmp_path / "logs",
        health_credentials=client_credentials(pki.ca, pki.client_cert, pki.client_key),
    )
    c.start()
    try:
        c.wait_ready(timeout=180)
        secure = dict(token="real-process-token", tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                      tls_key=str(pki.client_key))  # fmt: skip
        with Client(c.coordinator_address, timeout=30, **secure) as client:
            r = client.generate(tokens(50, 4), max_new_tokens=4, temperature=0, ignore_eos=True)
            assert len(r.token_ids) == 4 and r.stats.prefill.kv_bytes_shipped > 0
        with Client(c.coordinator_address, timeout=5, token="real-process-token") as plain:
            with pytest.raises(KvferryRpcError) as err:
                plain.info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "mTLS; outgoing TLS" in (tmp_path / "logs" / "decode.log").read_text()
    finally:
        c.stop()
