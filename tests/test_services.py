"""The services end to end over real gRPC, on a tiny random llama: coordinator -> prefill -> transport
(shm, which auto picks on one CPU host, and grpc) -> decode equals the colocated engine token for token; errors arrive as the right status
codes naming the field; cancellation, aborts and leases free every page on both nodes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from builders import TinyModel
from cluster import ClusterSpec, InProcessCluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvferry.clients import AsyncClient, Client, KvferryRpcError
from kvferry.engine import CompressionParams, SamplingParams
from kvferry.engine.kv_handoff import KVLayout
from kvferry.kvtransfer import ModelSpec, build_manifest, pages_to_bytes
from kvferry.v1 import common_pb2, decode_pb2, decode_pb2_grpc

PAGE_SIZE = 4
MAX_MODEL_LEN = 512
DECODE_KV_BYTES = 1 << 20  # 2048 pages of 512 B: four max-length requests, so admission can be exercised


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model("llama")


def cluster_spec(tiny: TinyModel, transport: str = "auto") -> ClusterSpec:
    return ClusterSpec(
        engine=dict(
            model=str(tiny.path),
            device="cpu",
            dtype="float32",
            page_size=PAGE_SIZE,
            prefill_chunk=64,
            max_model_len=MAX_MODEL_LEN,
            kv_cache_bytes=4 << 20,
            torch_threads=1,
        ),
        decode=dict(kv_cache_bytes=DECODE_KV_BYTES, lease_seconds=1.5, max_chunk_bytes=64 << 10),
        prefill=dict(chunk_bytes=16 << 10, transport=transport),  # several PushKV chunks per request
    )


@pytest.fixture(scope="module")
def cluster(tiny: TinyModel) -> Iterator[InProcessCluster]:
    c = InProcessCluster(cluster_spec(tiny)).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def grpc_cluster(tiny: TinyModel) -> Iterator[InProcessCluster]:
    c = InProcessCluster(cluster_spec(tiny, transport="grpc")).start()
    yield c
    c.stop()


@pytest.fixture
def client(cluster: InProcessCluster) -> Iterator[Client]:
    with Client(cluster.coordinator_address, timeout=60) as c:
        yield c
    cluster.assert_no_leaks()  # every test leaves both pools empty


def prompt(length: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def colocated_stats(tiny: TinyModel, prompts: list[list[int]], n: int, compression: Any = None) -> list[Any]:
    """The prompts through the colocated engine, greedy: the finished Sequences (tokens and stats). On
    one intra-op thread, as the services' engines run (torch_threads=1): sums taken in another order
    differ in the last bits, enough to swap two near-tied chunks of a compressed cache."""
    engine = tiny.engine(page_size=PAGE_SIZE, prefill_chunk=64, max_model_len=MAX_MODEL_LEN)
    sp = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seqs = [engine.add_request(p, sp, compression) for p in prompts]
        while engine.has_unfinished():
            engine.step()
    finally:
        torch.set_num_threads(threads)
    engine.pool.assert_no_leaks()
    return seqs


def colocated(tiny: TinyModel, prompts: list[list[int]], n: int, compression: Any = None) -> list[list[int]]:
    return [s.output_token_ids for s in colocated_stats(tiny, prompts, n, compression)]


# ---- the golden path ------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["shm", "grpc"])
@pytest.mark.parametrize("method", [None, "compactor", "snapkv"])
def test_disaggregated_greedy_equals_colocated(
    tiny: TinyModel, request: pytest.FixtureRequest, method: str | None, transport: str
) -> None:
    nodes: InProcessCluster = request.getfixturevalue("cluster" if transport == "shm" else "grpc_cluster")
    with Client(nodes.coordinator_address, timeout=60) as client:
        _check_greedy_equals_colocated(tiny, client, method, transport)
    nodes.assert_no_leaks()


def _check_greedy_equals_colocated(
    tiny: TinyModel, client: Client, method: str | None, transport: str
) -> None:
    # 16 simultaneous requests of different lengths, so the decode node batches them
    prompts = [prompt(n, seed=n, vocab=tiny.vocab_size) for n in (7, 64, 130, 301, *range(20, 260, 20))]
    assert len(prompts) == 16
    comp = None if method is None else {"method": method, "retention": 0.5, "sink": 2, "recent": 8}
    expected = colocated(tiny, prompts, 24, None if comp is None else CompressionParams(**comp))
    results: dict[int, Any] = {}

    def one(i: int) -> None:  # concurrently, so the decode node batches them
        results[i] = client.generate(
            prompts[i], max_new_tokens=24, temperature=0, ignore_eos=True, compression=comp
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        r = results[i]
        assert r.token_ids == expected[i], f"prompt {i} ({len(p)} tokens)"
        assert r.finish_reason == "length"
        s = r.stats
        assert s.prefill.prompt_tokens == len(p)
        assert s.prefill.kv_bytes_shipped == s.prefill.kv_bytes == s.decode.kv_bytes_received
        assert s.prefill.transport == transport
        assert s.decode.output_tokens == 24
        if method is None:
            assert s.prefill.kv_bytes == s.prefill.kv_bytes_full and s.prefill.compression_method == "none"
        elif len(p) >= 64:
            assert s.prefill.kv_bytes < 0.75 * s.prefill.kv_bytes_full
            assert s.prefill.compression_method == method


def test_stream_adds_up_to_unary(tiny: TinyModel, client: Client) -> None:
    p = prompt(90, seed=5, vocab=tiny.vocab_size)
    unary = client.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True)
    chunks = list(client.stream(p, max_new_tokens=12, temperature=0, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats is not None


def test_seeded_sampling_is_reproducible_across_the_handoff(tiny: TinyModel, client: Client) -> None:
    p = prompt(40, seed=9, vocab=tiny.vocab_size)
    a = client.generate(p, max_new_tokens=16, temperature=1.0, top_k=20, seed=1234, ignore_eos=True)
    b = client.generate(p, max_new_tokens=16, temperature=1.0, top_k=20, seed=1234, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_first_token_can_finish_the_request(tiny: TinyModel, client: Client) -> None:
    r = client.generate(prompt(20, seed=2, vocab=tiny.vocab_size), max_new_tokens=1, temperature=0)
    assert len(r.token_ids) == 1 and r.finish_reason == "length"
    assert r.stats.decode_node == "" and r.stats.prefill.kv_bytes_shipped == 0


def test_async_client(tiny: TinyModel, cluster: InProcessCluster) -> None:
    import asyncio

    p = prompt(50, seed=3, vocab=tiny.vocab_size)

    async def go() -> tuple[list[int], list[int]]:
        async with AsyncClient(cluster.coordinator_address) as c:
            unary = await c.generate(p, max_new_tokens=8, temperature=0, ignore_eos=True)
            streamed = [
                t
                async for chunk in c.stream(p, max_new_tokens=8, temperature=0, ignore_eos=True)
                for t in chunk.token_ids
            ]
            return unary.token_ids, streamed

    unary, streamed = asyncio.run(go())
    assert unary == streamed == colocated(tiny, [p], 8)[0]
    cluster.assert_no_leaks()


# ---- retention="auto", keep_tokens, the compression policy -----------------------------------------
AUTO = {"method": "compactor", "retention": "auto", "quality_target": 0.05, "sink": 2, "recent": 8}
KEEP = {"method": "snapkv", "keep_tokens": 48, "sink": 2, "recent": 8}


@pytest.mark.parametrize("spec", [AUTO, KEEP], ids=["auto", "keep_tokens"])
def test_auto_and_keep_tokens_disaggregated_equal_colocated(
    tiny: TinyModel, client: Client, spec: dict[str, Any]
) -> None:
    prompts = [prompt(n, seed=n, vocab=tiny.vocab_size) for n in (40, 130, 301)]
    expected = colocated_stats(tiny, prompts, 12, CompressionParams(**spec))
    for p, want in zip(prompts, expected):
        r = client.generate(p, max_new_tokens=12, temperature=0, ignore_eos=True, compression=spec)
        assert r.token_ids == want.output_token_ids
        s = r.stats.prefill
        assert s.chosen_retention == pytest.approx(want.stats.chosen_retention)
        protected = 10 if s.chosen_retention < 1.0 else 0  # counted where the request was compressed
        assert s.kept_tokens == want.stats.kept_tokens and s.protected_tokens == protected
        assert s.protected_share == pytest.approx(protected / len(p))
        if spec is AUTO:
            assert s.HasField("context_nll") and s.context_nll == pytest.approx(want.stats.context_nll)
            assert s.chosen_retention < 1.0 and s.compression_method == "compactor"
        else:
            assert not s.HasField("context_nll")
            want_ratio = min(1.0, 48 / len(p))
            assert s.chosen_retention == pytest.approx(want_ratio)
            assert s.compression_method == ("none" if len(p) <= 48 else "snapkv")


def test_the_operator_policy_fills_what_a_request_leaves_unset(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    from kvferry.serving.compression_policy import CompressionPolicy

    servicer = cluster.hosts["coordinator"].component
    p = prompt(200, seed=4, vocab=tiny.vocab_size)
    ask = dict(max_new_tokens=4, temperature=0, ignore_eos=True)
    assert client.generate(p, **ask).stats.prefill.compression_method == "none"  # no policy: whole cache
    servicer.policy = CompressionPolicy.from_settings("streaming", "auto", 0.05)
    try:
        auto = client.generate(p, **ask).stats.prefill
        assert auto.compression_method == "streaming" and auto.HasField("context_nll")
        assert auto.chosen_retention < 1.0
        ratio = client.generate(p, compression={"retention": 0.25}, **ask).stats.prefill
        assert (ratio.compression_method, ratio.chosen_retention) == ("streaming", 0.25)
        named = client.generate(p, compression="snapkv", **ask).stats.prefill
        assert named.compression_method == "snapkv" and named.HasField("context_nll")
        opted_out = client.generate(p, compression="none", **ask).stats.prefill
        assert opted_out.compression_method == "none" and opted_out.kv_bytes == opted_out.kv_bytes_full
    finally:
        servicer.policy = CompressionPolicy()
    # a prefill node's own policy serves requests that reach it still without settings
    cluster.prefill.policy = CompressionPolicy.from_settings(None, "0.5", None)
    try:
        fixed = client.generate(p, **ask).stats.prefill
        assert (fixed.compression_method, fixed.chosen_retention) == ("compactor", 0.5)
    finally:
        cluster.prefill.policy = CompressionPolicy()


def test_bad_retention_forms(client: Client) -> None:
    """ "auto" and a number at once over raw gRPC; a retention that is neither, before it is sent."""
    from kvferry.engine.errors import InvalidArgumentError
    from kvferry.v1 import coordinator_pb2, coordinator_pb2_grpc

    request = coordinator_pb2.GenerateUnaryRequest(prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]))
    request.compression.retention = 0.5
    request.compression.auto_retention = True
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(client._channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateUnary(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("kvferry-field", "compression.retention") in err.value.trailing_metadata()
    with pytest.raises(InvalidArgumentError) as local:
        client.generate([1, 2, 3], retention="most")
    assert local.value.field == "compression.retention"


# ---- errors ---------------------------------------------------------------------------------------
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        (dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(compression={"method": "zip"}), grpc.StatusCode.INVALID_ARGUMENT, "compression.method"),
        (dict(compression={"retention": 1.5}), grpc.StatusCode.INVALID_ARGUMENT, "compression.retention"),
        (dict(compression={"retention": 0.0}), grpc.StatusCode.INVALID_ARGUMENT, "compression.retention"),
        (
            dict(compression={"retention": "auto", "quality_target": 1.5}),
            INVALID,
            "compression.quality_target",
        ),
        (
            dict(compression={"retention": "auto", "quality_target": 0.0}),
            INVALID,
            "compression.quality_target",
        ),
        (dict(compression={"keep_tokens": 0}), INVALID, "compression.keep_tokens"),
        (dict(compression={"keep_tokens": -5}), INVALID, "compression.keep_tokens"),
        (dict(compression={"keep_tokens": 8, "retention": 0.5}), INVALID, "compression.keep_tokens"),
        (dict(compression={"keep_tokens": 8}, retention="auto"), INVALID, "compression.keep_tokens"),
        (dict(compression={"protect_last_user_turn": True}), INVALID, "compression.protect_last_user_turn"),
        (dict(compression={"protect_question": True}), INVALID, "compression.protect_question"),
        (dict(question="Which one?"), INVALID, "question"),  # the tiny model has no tokenizer
        (dict(prompt=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
        (dict(prompt=[7] * 600), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (dict(prompt=[1, 999]), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        # issue 19: silently accepted before
        (dict(temperature=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(max_new_tokens=10**9), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(prompt=[1] * 500, max_new_tokens=13), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(prompt=[7] * 100_000), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            dict(
                prompt=None, messages=[{"role": "user", "content": "hi"}, {"role": "hacker", "content": "x"}]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[1].role",
        ),
        (
            dict(compression={"method": "streaming", "protected_spans": [(1, 2**32 - 1)]}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "compression.protected_spans",
        ),
        (
            dict(compression={"method": "streaming", "sink": 2**32 - 1}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "compression.sink",
        ),
        (
            dict(compression={"method": "snapkv", "window": 10**12}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "compression.window",
        ),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    client: Client, kwargs: dict[str, Any], code: grpc.StatusCode, field: str
) -> None:
    kwargs = {"prompt": [1, 2, 3], **kwargs}
    if kwargs["prompt"] is None:
        del kwargs["prompt"]
    with pytest.raises(KvferryRpcError) as err:
        client.generate(**kwargs)
    assert err.value.code == code
    assert err.value.field == field
    assert field.split(".")[-1] in err.value.details


def test_text_prompt_without_tokenizer_is_failed_precondition_or_invalid(client: Client) -> None:
    """The tiny model ships no tokenizer: a text prompt cannot be served and must say so."""
    with pytest.raises(KvferryRpcError) as err:
        client.generate("hello")
    assert err.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert "tokenizer" in err.value.details


def test_unreachable_nodes_are_unavailable() -> None:
    """A coordinator whose nodes do not answer refuses with UNAVAILABLE (no model needed)."""
    import asyncio

    from kvferry.coordinator import server as coordinator_server
    from kvferry.coordinator.settings import CoordinatorSettings
    from kvferry.serving.settings import ServerSettings  # noqa: F401

    async def go() -> KvferryRpcError:
        settings = CoordinatorSettings(
            port=0,
            prefill_addresses=["127.0.0.1:9"],
            decode_addresses=["127.0.0.1:9"],
            info_timeout_seconds=0.5,
        )
        host = coordinator_server.build(settings)
        await host.start()
        try:
            async with AsyncClient(f"127.0.0.1:{host.port}") as c:
                try:
                    await c.generate([1, 2, 3])
                except KvferryRpcError as e:
                    return e
                raise AssertionError("generate succeeded without nodes")
        finally:
            await host.stop()

    err = asyncio.run(go())
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:9" in err.details


# ---- cancellation and leases ----------------------------------------------------------------------
def test_cancelled_stream_frees_pages_on_both_nodes(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    p = prompt(200, seed=4, vocab=tiny.vocab_size)
    stream = client.stream(p, max_new_tokens=300, temperature=0, ignore_eos=True)
    got = [next(stream) for _ in range(3)]
    assert all(c.finish_reason is None for c in got)
    assert cluster.pool_state()["decode"] != (0, 0)  # it is really decoding, holding pages
    stream.close()  # cancels the call; the client fixture's leak check waits for the pages to return
    deadline = time.monotonic() + 10
    while client.stats().requests_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.stats().requests_cancelled >= 1


def test_deadline_exceeded_frees_pages(tiny: TinyModel, cluster: InProcessCluster, client: Client) -> None:
    p = prompt(100, seed=6, vocab=tiny.vocab_size)
    with cluster.stalled("prefill"), pytest.raises(KvferryRpcError) as err:  # no prefill before the deadline
        for _ in client.stream(p, max_new_tokens=400, temperature=0, ignore_eos=True, timeout=0.4):
            pass
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancel_during_a_prefill_chunk_stops_it_at_the_next_layer(
    tiny: TinyModel, cluster: InProcessCluster, client: Client, how: str
) -> None:
    """The prefill engine is held inside layer 0 of the first chunk of a 4-chunk prompt; the call is
    cancelled (or its deadline passes) meanwhile. Released, the chunk stops before layer 1 and the
    request is freed: the rest of the chunk and the 3 chunks after it never run."""
    from kvferry.clients.requests import GENERATE_UNARY, build_request
    from kvferry.v1 import coordinator_pb2_grpc

    model = cluster.prefill.engine.worker.engine.model.model
    inside, release, last_layer_runs = threading.Event(), threading.Event(), []
    request_id = f"held-in-layer-0-{how}"

    def hold(_module: Any, _args: Any) -> None:
        if not inside.is_set():
            inside.set()
            release.wait(30)

    hooks = [
        model.layers[0].register_forward_pre_hook(hold),
        model.layers[-1].register_forward_pre_hook(lambda *_: last_layer_runs.append(1)),
    ]
    try:
        request = build_request(
            GENERATE_UNARY, prompt(250, seed=8, vocab=tiny.vocab_size), None, None, None, request_id,
            dict(max_new_tokens=8, temperature=0, ignore_eos=True),
        )  # fmt: skip
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(grpc.insecure_channel(cluster.coordinator_address))
        call = stub.GenerateUnary.future(request, timeout=None if how == "cancel" else 1.0)
        assert inside.wait(30)
        if how == "cancel":
            call.cancel()
        engine = cluster.prefill.engine.worker.engine
        deadline = time.monotonic() + 30  # the cancel reaches the prefill handler, which flags the request
        while not engine.requests[request_id].cancel_requested:
            assert time.monotonic() < deadline, "the cancel never reached the prefill engine"
            time.sleep(0.01)
        release.set()
        with pytest.raises(grpc.RpcError if how == "deadline" else grpc.FutureCancelledError) as err:
            call.result(30)
        if how == "deadline":
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert cluster.wait_idle() == {"prefill": (0, 0), "decode": (0, 0)}
        assert last_layer_runs == []  # stopped between layer 0 and layer 1 of the first chunk
    finally:
        release.set()
        for hook in hooks:
            hook.remove()


def _assert_gone(stub: decode_pb2_grpc.DecodeServiceStub, reservation_id: str) -> None:
    with pytest.raises(grpc.RpcError) as gone:
        stub.Decode(decode_pb2.DecodeRequest(reservation_id=reservation_id), timeout=5).next()
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def _decode_channel(cluster: InProcessCluster) -> grpc.Channel:
    return grpc.insecure_channel(cluster.address("decode"))


def _decode_stub(cluster: InProcessCluster) -> decode_pb2_grpc.DecodeServiceStub:
    return decode_pb2_grpc.DecodeServiceStub(_decode_channel(cluster))


def _manifest(cluster: InProcessCluster, head_len: int, **overrides: Any) -> tuple[Any, memoryview]:
    engine = cluster.decode.worker.engine
    spec = ModelSpec.of_engine(engine)
    layout = KVLayout(torch.full((engine.num_layers, engine.num_kv_heads), head_len), spec.page_size)
    pages = torch.randn(layout.num_pages, 2, spec.page_size, spec.head_dim)
    payload = pages_to_bytes(pages)
    manifest = build_manifest(spec, layout, payload)
    for name, value in overrides.items():
        setattr(manifest, name, value)
    return manifest, payload


def _reserve(stub: Any, manifest: Any, prompt_len: int, max_new_tokens: int = 8) -> Any:
    return stub.ReserveKV(
        decode_pb2.ReserveKVRequest(
            request_id="test",
            manifest=manifest,
            sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
            prompt_token_ids=[1 + i % 250 for i in range(prompt_len)],
            first_token_id=5,
            transport="grpc",
        ),
        timeout=10,
    )


def _fill_decode_pool(stub: Any, manifest: Any) -> list[str]:
    """Reserve 400-token requests until the decode node answers RESOURCE_EXHAUSTED; their ids."""
    held = []
    with pytest.raises(grpc.RpcError) as err:
        for _ in range(10):
            held.append(_reserve(stub, manifest, 400, max_new_tokens=100).reservation_id)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return held


def test_manifest_of_another_model_is_failed_precondition(cluster: InProcessCluster, client: Client) -> None:
    manifest, _ = _manifest(cluster, 10, model_fingerprint="someone-else")
    with pytest.raises(grpc.RpcError) as err:
        _reserve(_decode_stub(cluster), manifest, 10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(err.value.trailing_metadata())["kvferry-field"] == "manifest.model_fingerprint"


@pytest.mark.parametrize("fault", ["flipped byte", "out of order"])
def test_corrupt_pages_are_data_loss_and_freed(cluster: InProcessCluster, client: Client, fault: str) -> None:
    stub = _decode_stub(cluster)
    manifest, payload = _manifest(cluster, 30)
    reservation = _reserve(stub, manifest, 30)
    rid = reservation.reservation_id
    if fault == "flipped byte":
        corrupt = bytearray(payload)
        corrupt[100] ^= 0xFF
        chunks = [decode_pb2.PushKVRequest(reservation_id=rid, offset=0, data=bytes(corrupt))]
        why = "checksum"
    else:
        first = bytes(payload[:512])
        chunks = [
            decode_pb2.PushKVRequest(reservation_id=rid, offset=0, data=first),
            decode_pb2.PushKVRequest(reservation_id=rid, offset=4096, data=first),
        ]
        why = "offset 4096"
    with pytest.raises(grpc.RpcError) as err:
        stub.PushKV(iter(chunks), timeout=10)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert why in err.value.details()
    _assert_gone(stub, rid)  # the reservation is gone with its pages


@pytest.mark.parametrize("garbage_at", [0, 1])
def test_undecodable_push_kv_messages_are_invalid_argument_and_freed(
    cluster: InProcessCluster, client: Client, garbage_at: int
) -> None:
    """Bytes that are no PushKVRequest, first or inside the stream: INVALID_ARGUMENT (was INTERNAL), and
    a reservation the stream had started to fill is freed with its pages."""
    stub = _decode_stub(cluster)
    manifest, payload = _manifest(cluster, 30)
    reservation = _reserve(stub, manifest, 30)
    good = decode_pb2.PushKVRequest(
        reservation_id=reservation.reservation_id, offset=0, data=bytes(payload[:512])
    )
    messages = [good.SerializeToString()]
    messages.insert(garbage_at, b"\xff\xff\xff\xff not a protobuf message")
    push = _decode_channel(cluster).stream_unary(
        "/kvferry.v1.DecodeService/PushKV", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.RpcError) as err:
        push(iter(messages), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert f"message {garbage_at} of the stream is not a valid message" in err.value.details()
    if garbage_at == 0:  # nothing touched the reservation: the sender may still fill it, or abort it
        assert stub.Abort(decode_pb2.AbortRequest(reservation_id=reservation.reservation_id), timeout=5).found
    _assert_gone(stub, reservation.reservation_id)


def test_unknown_reservation_is_not_found(cluster: InProcessCluster, client: Client) -> None:
    stub = _decode_stub(cluster)
    chunks = [decode_pb2.PushKVRequest(reservation_id="nope", offset=0, data=b"x")]
    with pytest.raises(grpc.RpcError) as err:
        stub.PushKV(iter(chunks), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Abort(decode_pb2.AbortRequest(reservation_id="nope"), timeout=5).found is False


def test_lease_expiry_frees_a_reservation_whose_pages_never_come(
    cluster: InProcessCluster, client: Client
) -> None:
    stub = _decode_stub(cluster)
    manifest, _ = _manifest(cluster, 40)
    reservation = _reserve(stub, manifest, 40)
    assert reservation.lease_seconds == 1.5
    assert cluster.pool_state()["decode"] != (0, 0)
    time.sleep(reservation.lease_seconds + 1.0)
    assert cluster.pool_state()["decode"] == (0, 0)
    with pytest.raises(grpc.RpcError) as err:
        stub.PushKV(
            iter([decode_pb2.PushKVRequest(reservation_id=reservation.reservation_id, data=b"")]), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_decode_admission_refuses_when_the_pool_is_promised(
    cluster: InProcessCluster, client: Client
) -> None:
    """Reservations promise pages; once the pool is promised a new one is RESOURCE_EXHAUSTED, and
    aborting them gives every page back."""
    stub = _decode_stub(cluster)
    manifest, _ = _manifest(cluster, 400)
    held = _fill_decode_pool(stub, manifest)
    assert 1 <= len(held) < 10
    for rid in held:
        assert stub.Abort(decode_pb2.AbortRequest(reservation_id=rid), timeout=5).found


def test_a_reservation_on_a_full_pool_waits_for_freed_pages(cluster: InProcessCluster) -> None:
    """A ReserveKV that finds the pool promised waits (reserve_hold_seconds) for a running request to
    give pages back, instead of failing at once and making the prefill node poll."""
    stub = _decode_stub(cluster)
    manifest, _ = _manifest(cluster, 400)
    held = _fill_decode_pool(stub, manifest)  # the last one waited out its hold: nothing was freed
    waiting = stub.ReserveKV.future(
        decode_pb2.ReserveKVRequest(
            request_id="waits", manifest=manifest,
            sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=100),
            prompt_token_ids=[1 + i % 250 for i in range(400)], first_token_id=5, transport="grpc",
        ),
        timeout=10,
    )  # fmt: skip
    time.sleep(0.2)
    assert stub.Abort(decode_pb2.AbortRequest(reservation_id=held.pop()), timeout=5).found
    held.append(waiting.result().reservation_id)  # got the pages the abort freed
    for rid in held:
        assert stub.Abort(decode_pb2.AbortRequest(reservation_id=rid), timeout=5).found


# ---- service plumbing -----------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["coordinator", "prefill", "decode"])
def test_health_and_reflection(cluster: InProcessCluster, node: str) -> None:
    channel = grpc.insecure_channel(cluster.address(node))
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    expected = {"coordinator": "CoordinatorService", "prefill": "PrefillService", "decode": "DecodeService"}
    assert f"kvferry.v1.{expected[node]}" in names and "grpc.health.v1.Health" in names


def test_info_and_stats(cluster: InProcessCluster, client: Client) -> None:
    info = client.info()
    (p,), (d,) = info.prefill_nodes, info.decode_nodes
    assert p.reachable and d.reachable
    assert p.model.fingerprint == d.model.fingerprint
    assert d.pool.total_pages == DECODE_KV_BYTES // d.pool.bytes_per_page
    before = client.stats()
    client.generate([5, 6, 7, 8], max_new_tokens=3, temperature=0, ignore_eos=True)
    after = client.stats()
    assert after.requests_total == before.requests_total + 1
    assert after.output_tokens_total == before.output_tokens_total + 3
    assert after.prompt_tokens_total == before.prompt_tokens_total + 4


def test_full_pool_is_retryable_but_never_fitting_is_not() -> None:
    """The prefill side waits for room on a full decode node only when room can ever come."""
    from kvferry.engine.errors import ResourceExhaustedError
    from kvferry.engine.kv_pool import KVPool

    pool = KVPool(8, PAGE_SIZE, 16, torch.float32, "cpu")
    with pytest.raises(ResourceExhaustedError, match="never fit") as never:
        pool.reserve(9)
    assert never.value.retryable is False
    pool.reserve(8)
    with pytest.raises(ResourceExhaustedError, match="available now") as full:
        pool.reserve(1)
    assert full.value.retryable is True
