"""Hypothesis fuzzing of every service's request messages: random bytes to every method, and
structured messages with hostile values (NaN and infinite floats, huge and negative-looking ids,
long stop lists, inconsistent manifests). A call may fail, but only with a status code a caller can
act on: never INTERNAL or UNKNOWN (an unhandled error), and the service must keep serving."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvferry.v1 import common_pb2, coordinator_pb2, decode_pb2, kv_pb2

TIMEOUT = 20.0
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
UNARY_METHODS = {
    "coordinator": ["/kvferry.v1.CoordinatorService/GenerateUnary", "/kvferry.v1.CoordinatorService/Info",
                    "/kvferry.v1.CoordinatorService/Stats"],
    "prefill": ["/kvferry.v1.PrefillService/Prefill", "/kvferry.v1.PrefillService/Info"],
    "decode": ["/kvferry.v1.DecodeService/ReserveKV", "/kvferry.v1.DecodeService/Abort",
               "/kvferry.v1.DecodeService/Info"],
}  # fmt: skip
STREAM_METHODS = {
    "coordinator": ["/kvferry.v1.CoordinatorService/Generate"],
    "decode": ["/kvferry.v1.DecodeService/Decode"],
}

u32 = st.integers(0, 2**32 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
small_text = st.text(max_size=12)


@st.composite
def sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams()
    if draw(st.booleans()):
        s.temperature = draw(floats)
    if draw(st.booleans()):
        s.top_p = draw(floats)
    if draw(st.booleans()):
        s.top_k = draw(u32)
    if draw(st.booleans()):
        s.max_new_tokens = draw(st.one_of(st.integers(0, 24), u32))
    else:
        s.max_new_tokens = 4  # keep the valid ones short
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    s.stop.extend(draw(st.lists(small_text, max_size=3)))
    s.stop_token_ids.extend(draw(st.lists(u32, max_size=3)))
    s.ignore_eos = draw(st.booleans())
    return s


@st.composite
def compression(draw: st.DrawFn) -> common_pb2.CompressionParams:
    c = common_pb2.CompressionParams()
    for name, value in (
        ("method", st.sampled_from(["compactor", "snapkv", "none", "streaming", "zip", ""])),
        ("retention", floats),
        ("sink", st.integers(-(2**31), 2**31 - 1)),
        ("recent", st.integers(-(2**31), 2**31 - 1)),
        ("budget", st.sampled_from(["uniform", "adaptive", "global", "x"])),
        ("head_floor", floats),
    ):
        if draw(st.booleans()) and name in c.DESCRIPTOR.fields_by_name:
            with contextlib.suppress(TypeError, ValueError):  # a value the field's type cannot hold
                setattr(c, name, draw(value))
    for start, end in draw(st.lists(st.tuples(u32, u32), max_size=2)):
        c.protected_spans.add(start=start, end=end)
    c.protect_last_user_turn = draw(st.booleans())
    return c


@st.composite
def generate_request(draw: st.DrawFn) -> coordinator_pb2.GenerateUnaryRequest:
    r = coordinator_pb2.GenerateUnaryRequest()
    ids = draw(st.lists(st.one_of(st.integers(0, 320), u32), max_size=40))
    choice = draw(st.sampled_from(["ids", "prompt", "messages", "none"]))
    if choice == "ids":
        r.prompt_token_ids.ids.extend(ids)
    elif choice == "prompt":
        r.prompt = draw(st.text(max_size=30))
    elif choice == "messages":
        for role, content in draw(st.lists(st.tuples(small_text, small_text), max_size=3)):
            r.messages.messages.add(role=role, content=content)
    r.sampling.CopyFrom(draw(sampling()))
    if draw(st.booleans()):
        r.compression.CopyFrom(draw(compression()))
    if draw(st.booleans()):
        r.request_id = draw(st.text(max_size=64))
    return r


@st.composite
def reserve_request(draw: st.DrawFn) -> decode_pb2.ReserveKVRequest:
    m = kv_pb2.KVManifest(
        model_fingerprint=draw(small_text),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "int8", ""])),
        codec=draw(st.sampled_from(["none", "fp8", ""])),
        page_size=draw(st.one_of(st.just(4), u32)),
        num_layers=draw(st.one_of(st.integers(0, 4), u32)),
        num_kv_heads=draw(st.one_of(st.integers(0, 4), u32)),
        head_dim=draw(st.one_of(st.just(16), u32)),
        num_pages=draw(st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))),
        byte_count=draw(st.one_of(st.integers(0, 1 << 16), st.integers(0, 2**64 - 1))),
        checksum_algorithm=draw(st.sampled_from(["crc32", "md5", ""])),
        checksum=draw(u32),
    )
    m.head_lens.extend(draw(st.lists(st.one_of(st.integers(0, 64), u32), max_size=16)))
    return decode_pb2.ReserveKVRequest(
        request_id=draw(small_text),
        manifest=m,
        sampling=draw(sampling()),
        prompt_token_ids=draw(st.lists(st.one_of(st.integers(0, 320), u32), max_size=64)),
        first_token_id=draw(st.one_of(st.integers(0, 320), u32)),
        transport=draw(st.sampled_from(["grpc", "", "carrier-pigeon"])),
    )


def _check(error: grpc.RpcError, what: str) -> None:
    assert error.code() not in BAD_CODES, f"{what}: {error.code().name}: {error.details()}"


def fuzz_cluster(cluster: Any, examples: int = 40) -> None:
    channels = {
        node: grpc.insecure_channel(cluster.address(node)) for node in ("coordinator", "prefill", "decode")
    }
    try:
        _fuzz_bytes(channels, examples)
        _fuzz_generate(channels["coordinator"], examples)
        _fuzz_reserve(channels["decode"], examples)
    finally:
        for channel in channels.values():
            channel.close()


def _fuzz_bytes(channels: dict[str, grpc.Channel], examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.binary(max_size=256))
    def run(payload: bytes) -> None:
        for node, methods in UNARY_METHODS.items():
            for method in methods:
                call = channels[node].unary_unary(method)  # bytes in, bytes out
                try:
                    call(payload, timeout=TIMEOUT)
                except grpc.RpcError as e:
                    _check(e, f"{method} <- {payload!r}")
        for node, methods in STREAM_METHODS.items():
            for method in methods:
                try:
                    list(channels[node].unary_stream(method)(payload, timeout=TIMEOUT))
                except grpc.RpcError as e:
                    _check(e, f"{method} <- {payload!r}")

    run()


def _fuzz_generate(channel: grpc.Channel, examples: int) -> None:
    from kvferry.v1 import coordinator_pb2_grpc

    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=generate_request())
    def run(request: coordinator_pb2.GenerateUnaryRequest) -> None:
        try:
            stub.GenerateUnary(request, timeout=TIMEOUT)
        except grpc.RpcError as e:
            _check(e, str(request))

    run()


def _fuzz_reserve(channel: grpc.Channel, examples: int) -> None:
    from kvferry.v1 import decode_pb2_grpc

    stub = decode_pb2_grpc.DecodeServiceStub(channel)

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=reserve_request())
    def run(request: decode_pb2.ReserveKVRequest) -> None:
        try:
            reply = stub.ReserveKV(request, timeout=TIMEOUT)
        except grpc.RpcError as e:
            _check(e, str(request))
            return
        stub.Abort(decode_pb2.AbortRequest(reservation_id=reply.reservation_id), timeout=TIMEOUT)

    run()
