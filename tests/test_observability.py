"""Prometheus endpoints of the three services (parsed by prometheus_client's own parser), deadlines
counted apart from cancels, the request id in every service's log lines, and bounded admission
(RESOURCE_EXHAUSTED, retryable) on the coordinator and the prefill service."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
from builders import TinyModel
from cluster import ClusterSpec, InProcessCluster, scrape_url, tiny_engine

from kvferry.clients import Client, KvferryRpcError
from kvferry.serving.metrics import RATIO_BUCKETS, new_registry
from kvferry.serving.request_context import RequestIdFilter
from kvferry.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc


@pytest.fixture(scope="module")
def cluster(tiny_model: Callable[[str], TinyModel]) -> Iterator[InProcessCluster]:
    spec = ClusterSpec(
        engine=tiny_engine(tiny_model("llama").path),
        server=dict(metrics_port=0),
        prefill=dict(max_pending_requests=1),
        coordinator=dict(max_active_requests=1),
    )
    c = InProcessCluster(spec).start()
    yield c
    c.stop()


def scrape(cluster: InProcessCluster, node: str) -> dict[str, float]:
    return scrape_url(f"http://127.0.0.1:{cluster.hosts[node].metrics_port}/metrics")


def test_metrics_endpoints(cluster: InProcessCluster) -> None:
    with Client(cluster.coordinator_address, timeout=30) as client:
        r = client.generate(
            list(range(1, 200)),
            max_new_tokens=5,
            temperature=0,
            ignore_eos=True,
            compression={"retention": 0.5},
        )
    assert r.finish_reason == "length"
    cluster.assert_no_leaks()
    c, p, d = (scrape(cluster, n) for n in ("coordinator", "prefill", "decode"))
    assert c['kvferry_requests_total{outcome="ok"}'] >= 1
    assert c["kvferry_time_to_first_token_seconds_count"] >= 1
    assert c["kvferry_time_per_output_token_seconds_count"] >= 1
    ttft_count = c["kvferry_time_to_first_token_seconds_count"]
    assert c['kvferry_time_to_first_token_seconds_bucket{le="+Inf"}'] == ttft_count
    assert c["kvferry_e2e_request_latency_seconds_count"] == ttft_count
    assert c["kvferry_prompt_tokens_total"] >= 199 and c["kvferry_generation_tokens_total"] >= 5
    assert c["kvferry_retention_ratio_count"] >= 1
    assert 0 < c["kvferry_kv_bytes_shipped_total"] < c["kvferry_kv_bytes_uncompressed_total"]
    assert c["kvferry_kv_transfer_seconds_count"] >= 1
    assert (
        c['kvferry_rpc_requests_total{code="OK",method="kvferry.v1.CoordinatorService/GenerateUnary"}'] >= 1
    )
    assert p['kvferry_rpc_requests_total{code="OK",method="kvferry.v1.PrefillService/Prefill"}'] >= 1
    assert p["kvferry_kv_bytes_shipped_total"] == c["kvferry_kv_bytes_shipped_total"]
    assert p["kvferry_prefill_queue_depth"] == 0 and p["kvferry_prefill_seconds_count"] >= 1
    assert p['kvferry_chosen_retention_ratio_count{mode="ratio"}'] >= 1
    assert d["kvferry_kv_bytes_received_total"] == p["kvferry_kv_bytes_shipped_total"]
    assert d["kvferry_decode_output_tokens_total"] >= 5
    for s in (p, d):  # pages: all free again, and the states add up
        assert s['kvferry_kv_pages{state="total"}'] == s['kvferry_kv_pages{state="free"}'] > 0
        assert s['kvferry_kv_pages{state="used"}'] == s['kvferry_kv_pages{state="reserved"}'] == 0
        assert s["kvferry_num_requests_waiting"] == s["kvferry_num_requests_running"] == 0
        assert s["kvferry_kv_cache_usage_perc"] == 0
    assert d["kvferry_decode_reservations"] == 0 and d["kvferry_decode_leases_expired_total"] == 0
    assert 'kvferry_gc_pause_seconds_count{generation="0"}' not in c  # in-process hosts leave GC alone


def test_auto_retention_choices_are_a_histogram(cluster: InProcessCluster) -> None:
    before = scrape(cluster, "prefill").get('kvferry_chosen_retention_ratio_count{mode="auto"}', 0.0)
    auto = {"retention": "auto", "quality_target": 0.05}
    with Client(cluster.coordinator_address, timeout=30) as client:
        r = client.generate(list(range(1, 150)), max_new_tokens=2, temperature=0, compression=auto)
    chosen = r.stats.prefill.chosen_retention
    assert 0 < chosen < 1
    p = scrape(cluster, "prefill")
    assert p['kvferry_chosen_retention_ratio_count{mode="auto"}'] == before + 1
    upper = min(b for b in RATIO_BUCKETS if chosen <= b)
    assert p[f'kvferry_chosen_retention_ratio_bucket{{le="{upper!r}",mode="auto"}}'] >= 1
    cluster.assert_no_leaks()


def test_a_deadline_is_counted_apart_from_a_cancel(cluster: InProcessCluster) -> None:
    """Issue 19: a request whose deadline passes is DEADLINE_EXCEEDED in the metrics (the coordinator's
    outcome and its gRPC call code), a stream the client closes is CANCELLED."""
    method = "kvferry.v1.CoordinatorService/Generate"
    before = scrape(cluster, "coordinator")
    with Client(cluster.coordinator_address, timeout=30) as client:
        # the deadline passes while the request is in the (stalled) prefill engine
        with cluster.stalled("prefill"), pytest.raises(KvferryRpcError) as err:
            list(client.stream([1, 2, 3, 4], max_new_tokens=4, timeout=0.3))
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        cluster.assert_no_leaks()
        stream = client.stream(list(range(1, 50)), max_new_tokens=400, temperature=0, ignore_eos=True)
        next(stream)
        stream.close()  # the client leaves mid-stream
    cluster.assert_no_leaks()
    after = scrape(cluster, "coordinator")

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert grew('kvferry_requests_total{outcome="deadline_exceeded"}') == 1
    assert grew('kvferry_requests_total{outcome="cancelled"}') == 1
    assert grew(f'kvferry_rpc_requests_total{{code="DEADLINE_EXCEEDED",method="{method}"}}') == 1
    assert grew(f'kvferry_rpc_requests_total{{code="CANCELLED",method="{method}"}}') == 1


def test_request_id_is_in_every_services_log_lines(cluster: InProcessCluster) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(RequestIdFilter())
    loggers = [
        logging.getLogger(f"kvferry.{n}") for n in ("coordinator", "prefill_service", "decode_service")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        with Client(cluster.coordinator_address, timeout=30) as client:
            client.generate([1, 2, 3, 4, 5], max_new_tokens=3, request_id="trace-me-42", ignore_eos=True)
        cluster.assert_no_leaks()
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    tagged = {r.name.split(".")[1] for r in records if r.request_id == "trace-me-42"}
    assert tagged == {"coordinator", "prefill_service", "decode_service"}, [
        (r.name, r.request_id, r.getMessage()) for r in records
    ]


def test_coordinator_refuses_beyond_max_active_requests(cluster: InProcessCluster) -> None:
    with Client(cluster.coordinator_address, timeout=30) as client:
        stream = client.stream(list(range(1, 50)), max_new_tokens=400, temperature=0, ignore_eos=True)
        next(stream)  # one request is active (max_active_requests=1)
        with pytest.raises(KvferryRpcError) as err:
            client.generate([1, 2, 3], max_new_tokens=2)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_active_requests" in err.value.details
        stream.close()
        assert scrape(cluster, "coordinator")['kvferry_requests_total{outcome="rejected"}'] >= 1
    cluster.assert_no_leaks()


def test_prefill_refuses_beyond_max_pending_requests(cluster: InProcessCluster) -> None:
    """Eight simultaneous Prefill calls on a node that takes one at a time: the others are refused
    at once with a retryable RESOURCE_EXHAUSTED, the accepted ones complete, nothing leaks."""
    prefill = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(cluster.address("prefill")))
    decode = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(cluster.address("decode")))
    results: list[object] = []

    def one(i: int) -> None:
        request = prefill_pb2.PrefillRequest(
            request_id=f"burst-{i}",
            prompt_token_ids=common_pb2.TokenIds(ids=[1 + i % 250 for i in range(400)]),
            sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=4),
            decode_address=cluster.address("decode"),
        )
        try:
            results.append(prefill.Prefill(request, timeout=30))
        except grpc.RpcError as e:
            results.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    served = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert refused and served and len(refused) + len(served) == 8
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
        assert dict(e.trailing_metadata())["kvferry-retryable"] == "true"
    for r in served:  # nobody will decode these: give their reservations back
        decode.Abort(decode_pb2.AbortRequest(reservation_id=r.kv_handle.reservation_id), timeout=5)
    assert scrape(cluster, "prefill")["kvferry_prefill_rejected_total"] == len(refused)
    cluster.assert_no_leaks()


def test_metrics_endpoint_refuses_a_taken_port_and_frees_its_own() -> None:
    """prometheus_client's server on a service's metrics port: a port already bound fails the start
    (one process per port), and stop() gives the port back."""
    import socket

    from kvferry.serving.metrics import MetricsEndpoint

    endpoint = MetricsEndpoint(new_registry(), "127.0.0.1", 0)
    port = endpoint.start()
    try:
        with pytest.raises(OSError):
            MetricsEndpoint(new_registry(), "127.0.0.1", port).start()
    finally:
        endpoint.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_gc_pauses_are_timed_per_generation_and_long_ones_logged(caplog: pytest.LogCaptureFixture) -> None:
    import gc

    from kvferry.serving import gc_pauses

    registry = new_registry()
    pauses = gc_pauses.GcPauses(registry)
    pauses.install()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        pauses.uninstall()
    gc.collect()  # not counted: uninstalled
    count = "kvferry_gc_pause_seconds_count"
    assert registry.get_sample_value(count, {"generation": "2"}) == 1
    assert registry.get_sample_value(count, {"generation": "0"}) >= 1
    with caplog.at_level(logging.INFO, logger="kvferry.serving.gc_pauses"):
        pauses._callback("start", {})
        pauses._started -= 0.05  # a 50 ms pause
        pauses._callback("stop", {"generation": 2, "collected": 7})
    assert "paused the process" in caplog.text


def test_freezing_the_start_up_heap_takes_it_out_of_collections() -> None:
    import gc

    from kvferry.serving.gc_pauses import freeze_start_up_heap

    try:
        assert freeze_start_up_heap() > 1000  # the interpreter and this test session alone
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
