"""TLS, mutual TLS and the bearer token, positive and negative, over real gRPC: the coordinator serves
TLS with a bearer token to clients; the prefill and decode services require client certificates
(mTLS) and the same token, and every inter-service channel verifies its peer and carries the token.
Oversized KV transfers are refused at ReserveKV before anything is reserved."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from builders import TinyModel
from certs import Pki, make_pki
from cluster import ClusterSpec, InProcessCluster

from kvferry.clients import AsyncClient, Client, KvferryRpcError
from kvferry.coordinator.settings import CoordinatorSettings
from kvferry.engine.kv_handoff import KVLayout
from kvferry.kvtransfer import ModelSpec, build_manifest, pages_to_bytes
from kvferry.serving.security import auth_metadata, client_credentials, read_token, server_credentials
from kvferry.serving.settings import ServerSettings
from kvferry.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

TOKEN = "s3cret-t0ken"
PAGE_SIZE = 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cluster(
    tiny_model: Callable[[str], TinyModel], pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessCluster]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    spec = ClusterSpec(
        engine=dict(
            model=str(tiny_model("llama").path),
            device="cpu",
            dtype="float32",
            page_size=PAGE_SIZE,
            prefill_chunk=64,
            max_model_len=512,
            kv_cache_bytes=2 << 20,
            torch_threads=1,
        ),
        decode=dict(max_transfer_bytes=64 << 10),
        server=dict(
            tls_cert=str(pki.service_cert),
            tls_key=str(pki.service_key),
            tls_client_ca=str(pki.ca),  # prefill and decode: mutual TLS
            tls_ca=str(pki.ca),  # every outgoing channel verifies its peer
            auth_token_file=str(token_file),  # every port requires it, every outgoing channel sends it
        ),
        # the client-facing port: TLS and the bearer token (clients carry no certificate), and the HTTP API
        coordinator=dict(tls_client_ca=None, http_port=0),
    )
    c = InProcessCluster(spec).start()
    yield c
    c.stop()


def secure_client(cluster: InProcessCluster, pki: Pki, **kwargs: Any) -> Client:
    return Client(
        cluster.coordinator_address, **{"timeout": 30, "token": TOKEN, "tls_ca": str(pki.ca), **kwargs}
    )


# ---- the client-facing API: TLS + bearer token ----------------------------------------------------
def test_the_http_api_serves_https_with_the_same_certificate_and_token(
    cluster: InProcessCluster, pki: Pki
) -> None:
    import httpx

    port = cluster.hosts["coordinator"].http_port
    body = {"model": "x", "prompt": [1, 2, 3], "max_tokens": 2}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=30) as https:
        assert https.get(f"https://127.0.0.1:{port}/health").status_code == 200
        refused = https.post(f"https://127.0.0.1:{port}/v1/completions", json=body)
        assert refused.status_code == 401  # checked before anything else
        model = https.get(f"https://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        body["model"] = model.json()["data"][0]["id"]
        served = https.post(
            f"https://127.0.0.1:{port}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] >= 1
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a client trusting another CA
        httpx.get(
            f"https://127.0.0.1:{port}/health", verify=ssl.create_default_context(cafile=str(pki.rogue_ca))
        )
    cluster.assert_no_leaks()


def test_tls_with_token_serves_and_frees_everything(cluster: InProcessCluster, pki: Pki) -> None:
    with secure_client(cluster, pki) as client:
        r = client.generate(list(range(1, 60)), max_new_tokens=6, temperature=0, ignore_eos=True)
        assert len(r.token_ids) == 6 and r.stats.prefill.kv_bytes_shipped > 0  # through mTLS prefill->decode
        streamed = [t for c in client.stream(list(range(1, 60)), max_new_tokens=6, temperature=0,
                                              ignore_eos=True) for t in c.token_ids]  # fmt: skip
        assert streamed == r.token_ids
        info = client.info()
        assert all(n.reachable for n in [*info.prefill_nodes, *info.decode_nodes])  # Info over mTLS
        assert client.stats().requests_total >= 2
    cluster.assert_no_leaks()


def test_async_client_with_tls_and_token(cluster: InProcessCluster, pki: Pki) -> None:
    import asyncio

    async def go() -> int:
        async with AsyncClient(cluster.coordinator_address, token=TOKEN, tls_ca=pki.ca.read_bytes()) as c:
            return len(
                (await c.generate([3, 4, 5], max_new_tokens=3, temperature=0, ignore_eos=True)).token_ids
            )

    assert asyncio.run(go()) == 3


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated(
    cluster: InProcessCluster, pki: Pki, token: str | None
) -> None:
    with secure_client(cluster, pki, token=token) as client:
        for call in (
            lambda: client.generate([1, 2, 3], max_new_tokens=2),
            lambda: list(client.stream([1, 2, 3], max_new_tokens=2)),
            client.info,
            client.stats,
        ):
            with pytest.raises(KvferryRpcError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in err.value.details


def test_health_needs_no_token(cluster: InProcessCluster, pki: Pki) -> None:
    from kvferry.serving.healthcheck import is_serving

    assert is_serving(cluster.coordinator_address, credentials=client_credentials(pki.ca))
    assert not is_serving(cluster.coordinator_address)  # but it needs TLS


def test_plaintext_client_is_refused(cluster: InProcessCluster) -> None:
    with (
        Client(cluster.coordinator_address, timeout=5, token=TOKEN) as client,
        pytest.raises(KvferryRpcError) as err,
    ):
        client.generate([1, 2, 3], max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_is_refused(cluster: InProcessCluster, pki: Pki) -> None:
    rogue = secure_client(cluster, pki, tls_ca=str(pki.rogue_ca), timeout=5)
    with rogue as client, pytest.raises(KvferryRpcError) as err:
        client.generate([1, 2, 3], max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ---- inter-service links: mutual TLS --------------------------------------------------------------
def _info(
    address: str, node: str, credentials: grpc.ChannelCredentials | None, token: str | None = TOKEN
) -> Any:
    channel = (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    )
    metadata = auth_metadata(token)
    with channel:
        if node == "decode":
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            return stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5, metadata=metadata)
        stub = prefill_pb2_grpc.PrefillServiceStub(channel)
        return stub.Info(prefill_pb2.PrefillInfoRequest(), timeout=5, metadata=metadata)


@pytest.mark.parametrize("node", ["prefill", "decode"])
def test_services_require_a_client_certificate_from_the_ca(
    cluster: InProcessCluster, pki: Pki, node: str
) -> None:
    address = cluster.address(node)
    assert (
        _info(address, node, client_credentials(pki.ca, pki.client_cert, pki.client_key)).pool.total_pages > 0
    )
    for refused in (
        None,  # plaintext
        client_credentials(pki.ca),  # TLS without a client certificate
        client_credentials(pki.ca, pki.rogue_cert, pki.rogue_key),  # a certificate of another CA
    ):
        with pytest.raises(grpc.RpcError) as err:
            _info(address, node, refused)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # the right certificate without the token: mTLS alone does not open the service
    with pytest.raises(grpc.RpcError) as err:
        _info(address, node, client_credentials(pki.ca, pki.client_cert, pki.client_key), token=None)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        server_credentials(ServerSettings(tls_cert="x.pem"))
    with pytest.raises(ValueError, match="tls_client_ca"):
        server_credentials(ServerSettings(tls_client_ca="ca.pem"))
    with pytest.raises(ValueError, match="cannot read"):
        server_credentials(ServerSettings(tls_cert="/nonexistent.pem", tls_key="/nonexistent.key"))
    with pytest.raises(ValueError, match="CA"):
        client_credentials(None, "c.pem", "k.pem")


def test_token_from_file_or_setting(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("  abc \n")
    assert read_token(None, str(f)) == "abc"
    assert read_token("xyz", None) == "xyz"
    assert read_token(None, None) is None
    with pytest.raises(ValueError, match="not both"):
        read_token("a", str(f))
    f.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(None, str(f))
    env = {"KVFERRY_AUTH_TOKEN": "from-env"}
    from kvferry.serving.settings import parse_settings

    assert parse_settings(CoordinatorSettings, [], env).auth_token == "from-env"
    assert parse_settings(CoordinatorSettings, ["--auth-token", "flag"], env).auth_token == "flag"


# ---- oversized or mismatched transfers are refused at ReserveKV ------------------------------------
def _decode_stub(cluster: InProcessCluster, pki: Pki) -> decode_pb2_grpc.DecodeServiceStub:
    creds = client_credentials(pki.ca, pki.client_cert, pki.client_key)
    return decode_pb2_grpc.DecodeServiceStub(grpc.secure_channel(cluster.address("decode"), creds))


def test_transfer_size_limits() -> None:
    from kvferry.engine.errors import ResourceExhaustedError
    from kvferry.kvtransfer.manifest import check_transfer_size
    from kvferry.v1 import kv_pb2

    spec = ModelSpec("f", "float32", 4, 2, 2, 16, 4)  # 512-byte pages
    fits = kv_pb2.KVManifest(num_pages=100, byte_count=100 * 512)
    check_transfer_size(fits, spec, pool_pages=100, max_bytes=0)
    with pytest.raises(ResourceExhaustedError, match="never fit") as err:
        check_transfer_size(kv_pb2.KVManifest(num_pages=101, byte_count=101 * 512), spec, 100, 0)
    assert err.value.retryable is False and err.value.field == "manifest.num_pages"
    with pytest.raises(ResourceExhaustedError, match="max_transfer_bytes") as err:
        check_transfer_size(fits, spec, 100, max_bytes=100 * 512 - 1)
    assert err.value.retryable is False and err.value.field == "manifest.byte_count"


@pytest.mark.parametrize(
    ("head_len", "prompt_len", "overrides", "code", "field"),
    [
        # bigger than max_transfer_bytes (64 KiB) though it would fit the pool
        (300, 300, {}, grpc.StatusCode.RESOURCE_EXHAUSTED, "manifest.byte_count"),
        # more pages than the whole pool, announced by a lying manifest
        (
            8,
            8,
            {"num_pages": 10**9, "byte_count": 10**9 * 512},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "manifest.byte_count",
        ),
        # kept tokens beyond the prompt
        (50, 10, {}, grpc.StatusCode.INVALID_ARGUMENT, "manifest.head_lens"),
        # byte count that does not match the pages
        (8, 8, {"byte_count": 7}, grpc.StatusCode.INVALID_ARGUMENT, "manifest.byte_count"),
        (8, 8, {"dtype": "float16"}, grpc.StatusCode.FAILED_PRECONDITION, "manifest.dtype"),
    ],
)
def test_bad_manifests_are_refused_before_any_page(
    cluster: InProcessCluster, pki: Pki, head_len: int, prompt_len: int, overrides: dict[str, Any],
    code: grpc.StatusCode, field: str,
) -> None:  # fmt: skip
    engine = cluster.decode.worker.engine
    spec = ModelSpec.of_engine(engine)
    layout = KVLayout(torch.full((engine.num_layers, engine.num_kv_heads), head_len), spec.page_size)
    payload = pages_to_bytes(torch.zeros(layout.num_pages, 2, spec.page_size, spec.head_dim))
    manifest = build_manifest(spec, layout, payload)
    for name, value in overrides.items():
        setattr(manifest, name, value)
    before = cluster.pool_state()["decode"]
    with pytest.raises(grpc.RpcError) as err:
        _decode_stub(cluster, pki).ReserveKV(
            decode_pb2.ReserveKVRequest(
                request_id="oversized",
                manifest=manifest,
                sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=4),
                prompt_token_ids=[1] * prompt_len,
                first_token_id=5,
                transport="grpc",
            ),
            timeout=10,
            metadata=auth_metadata(TOKEN),
        )
    assert err.value.code() == code, err.value.details()
    assert dict(err.value.trailing_metadata())["kvferry-field"] == field
    assert cluster.pool_state()["decode"] == before == (0, 0)
    assert len(cluster.decode.reservations) == 0


def test_cli_takes_token_and_ca(
    cluster: InProcessCluster, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvferry.clients.cli import main

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    base = ["stats", "--address", cluster.coordinator_address, "--tls-ca", str(pki.ca)]
    assert main([*base, "--token-file", str(token_file)]) == 0
    assert "requests:" in capsys.readouterr().out
    assert main(base) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
