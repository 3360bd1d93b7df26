"""The bearer token on every link, over real gRPC on plaintext ports (a token without TLS, the case
mTLS does not already cover): every method of every kvferry service and reflection refuses a call
without it (UNAUTHENTICATED, before the servicer runs: nothing reserved, nothing generated), the calls
between the services carry it (the golden path over the grpc transport), the `Bearer` scheme is matched
in any case, health stays open, and reflection on each port describes only that port's own API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from builders import TinyModel, greedy, run_to_completion
from cluster import ClusterSpec, InProcessCluster, tiny_engine
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvferry.clients import Client, KvferryRpcError
from kvferry.serving.security import TokenAuth
from kvferry.v1 import common_pb2, coordinator_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2

TOKEN = "plaintext-cluster-token"
SERVICES: dict[str, ServiceDescriptor] = {
    "coordinator": coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"],
    "prefill": prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"],
    "decode": decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
}


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(tiny: TinyModel) -> Iterator[InProcessCluster]:
    spec = ClusterSpec(
        engine=tiny_engine(tiny.path),
        prefill=dict(transport="grpc", chunk_bytes=4 << 10),  # PushKV: a client stream carrying the token
        server=dict(auth_token=TOKEN),  # every service: required on its port, sent on its channels
    )
    c = InProcessCluster(spec).start()
    yield c
    c.stop()


def _call(channel: grpc.Channel, service: ServiceDescriptor, method: str, metadata: Any) -> Any:
    """Call any method with an empty request (or a stream of one), as raw bytes."""
    m = service.methods_by_name[method]
    path = f"/{service.full_name}/{method}"
    identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    if m.client_streaming and m.server_streaming:
        return list(channel.stream_stream(path, **identity)(iter([b""]), timeout=10, metadata=metadata))
    if m.client_streaming:
        return channel.stream_unary(path, **identity)(iter([b""]), timeout=10, metadata=metadata)
    if m.server_streaming:
        return list(channel.unary_stream(path, **identity)(b"", timeout=10, metadata=metadata))
    return channel.unary_unary(path, **identity)(b"", timeout=10, metadata=metadata)


@pytest.mark.parametrize("node", list(SERVICES))
def test_every_method_refuses_a_call_without_the_token(cluster: InProcessCluster, node: str) -> None:
    service = SERVICES[node]
    refused = [None, (("authorization", "Bearer wrong"),), (("authorization", f"Basic {TOKEN}"),)]
    with grpc.insecure_channel(cluster.address(node)) as channel:
        for method in service.methods_by_name:
            for metadata in refused:
                with pytest.raises(grpc.RpcError) as err:
                    _call(channel, service, method, metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
    assert cluster.pool_state() == {"prefill": (0, 0), "decode": (0, 0)}
    assert len(cluster.decode.reservations) == 0


def test_a_reservation_without_the_token_takes_no_page(cluster: InProcessCluster) -> None:
    """The attack of the issue: reserving decode's pages directly, without credentials."""
    request = decode_pb2.ReserveKVRequest(
        request_id="intruder", prompt_token_ids=[1] * 400, first_token_id=5, transport="grpc",
        sampling=common_pb2.SamplingParams(max_new_tokens=100),
    )  # fmt: skip
    with grpc.insecure_channel(cluster.address("decode")) as channel:
        with pytest.raises(grpc.RpcError) as err:
            decode_pb2_grpc.DecodeServiceStub(channel).ReserveKV(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            decode_pb2_grpc.DecodeServiceStub(channel).ExportKV(decode_pb2.ExportKVRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the pool's shm path stays private
    assert cluster.pool_state()["decode"] == (0, 0)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_token_passes_every_link_whatever_the_scheme_case(
    cluster: InProcessCluster, tiny: TinyModel, scheme: str
) -> None:
    """Coordinator -> prefill (Prefill, Info), prefill -> decode (ReserveKV, PushKV), coordinator ->
    decode (Decode, Info): each checks the token, so an answer equal to the colocated engine's means
    every call between the services carried it."""
    prompt = [1 + (7 * i) % (tiny.vocab_size - 1) for i in range(90)]
    engine = tiny.engine(page_size=4, prefill_chunk=64, max_model_len=512)
    (expected,) = run_to_completion(engine, [prompt], [greedy(6)])
    with Client(cluster.coordinator_address, timeout=60) as client:
        client._metadata = (("authorization", f"{scheme} {TOKEN}"),)  # the scheme as a caller spells it
        r = client.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True)
        assert r.token_ids == expected.output_token_ids
        assert r.stats.prefill.transport == "grpc" and r.stats.prefill.kv_bytes_shipped > 0
        info = client.info()
        assert all(n.reachable for n in [*info.prefill_nodes, *info.decode_nodes]), info
    cluster.assert_no_leaks()


def test_a_client_without_the_token_is_unauthenticated(cluster: InProcessCluster) -> None:
    with Client(cluster.coordinator_address, timeout=10) as client, pytest.raises(KvferryRpcError) as err:
        client.generate([1, 2, 3], max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("node", list(SERVICES))
def test_health_is_open_and_reflection_needs_the_token(cluster: InProcessCluster, node: str) -> None:
    with grpc.insecure_channel(cluster.address(node)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            _reflect(channel, None, reflection_pb2.ServerReflectionRequest(list_services=""))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _reflect(channel: grpc.Channel, metadata: Any, *requests: Any) -> list[Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(stub.ServerReflectionInfo(iter(requests), timeout=5, metadata=metadata))


def test_reflection_on_the_client_port_describes_only_the_client_api(cluster: InProcessCluster) -> None:
    ask = reflection_pb2.ServerReflectionRequest
    with grpc.insecure_channel(cluster.coordinator_address) as channel:
        listed, own, decode, prefill, stats = _reflect(
            channel,
            (("authorization", f"Bearer {TOKEN}"),),
            ask(list_services=""),
            ask(file_containing_symbol="kvferry.v1.CoordinatorService"),
            ask(file_containing_symbol="kvferry.v1.DecodeService"),
            ask(file_containing_symbol="kvferry.v1.PrefillService.Prefill"),
            ask(file_containing_symbol="kvferry.v1.PrefillStats"),  # a message the client API uses
        )
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "kvferry.v1.CoordinatorService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"
    }  # fmt: skip
    assert own.file_descriptor_response.file_descriptor_proto  # coordinator.proto and its imports
    for hidden in (decode, prefill):
        assert hidden.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    from google.protobuf import descriptor_pb2

    (described,) = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in stats.file_descriptor_response.file_descriptor_proto
    ][:1]
    assert described.name == "kvferry/v1/prefill.proto" and not described.service  # messages only


def test_bearer_scheme_is_case_insensitive_and_the_token_exact() -> None:
    auth = TokenAuth("abc", ["kvferry.v1.DecodeService"])
    for ok in ("Bearer abc", "bearer abc", "BeArEr abc"):
        assert auth.denial([("authorization", ok)]) is None, ok
    for bad in ("Bearer abcd", "Bearer ab", "Bearer ", "Basic abc", "abc", "Bearerabc"):
        assert auth.denial([("authorization", bad)]) is not None, bad
    assert "missing" in (auth.denial([]) or "")
    assert auth.applies("/kvferry.v1.DecodeService/ReserveKV")
    assert not auth.applies("/grpc.health.v1.Health/Check")
