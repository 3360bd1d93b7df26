"""`kvferry bench` on CPU: a tiny random llama behind a real in-process cluster (and, marked slow, a
cluster the command starts itself as three processes). The JSON carries the numbers the docs quote,
the PNG is written, a --compare run puts the same requests through the colocated engine and the
services. The GPU flags of `kvferry up` / `bench` are checked where they land: the services' own
settings classes, parsed from the command lines the local cluster would run."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import TinyModel
from cluster import ClusterSpec, InProcessCluster

from kvferry.clients import bench
from kvferry.clients.cli import main as cli_main
from kvferry.clients.cli import parser as cli_parser
from kvferry.clients.cluster_options import GIB, TRANSPORTS, cluster_options
from kvferry.clients.local_cluster import LocalCluster
from kvferry.decode_service.settings import DecodeSettings
from kvferry.kvtransfer.selection import AUTO, TRANSPORT_NAMES
from kvferry.prefill_service.settings import PrefillSettings
from kvferry.serving.settings import parse_settings

PAGE_SIZE = 4
ENGINE = [
    "--page-size",
    str(PAGE_SIZE),
    "--prefill-chunk",
    "64",
    "--max-model-len",
    "512",
    "--torch-threads",
    "1",
]
DECODE_KV_BYTES = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(tiny: TinyModel) -> Iterator[InProcessCluster]:
    engine = dict(model=str(tiny.path), device="cpu", dtype="float32", page_size=PAGE_SIZE, prefill_chunk=64,
                  max_model_len=512, kv_cache_bytes=4 << 20, torch_threads=1)  # fmt: skip
    c = InProcessCluster(ClusterSpec(engine=engine, decode=dict(kv_cache_bytes=DECODE_KV_BYTES))).start()
    yield c
    c.stop()


def _read(out: Path) -> dict[str, Any]:
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    return json.loads(out.with_suffix(".json").read_text())


def _check_latencies(run: dict[str, Any]) -> None:
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = run[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)
    assert run["output_throughput_tok_s"] > 0 and run["request_throughput_req_s"] > 0


def test_bench_against_a_running_cluster(cluster: InProcessCluster, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = cli_main(
        ["bench", "--target", cluster.coordinator_address, "--num-requests", "4", "--input-len", "48-96",
         "--output-len", "6", "--concurrency", "2", "--retention", "1,0.5", "--warmup", "1",
         "--sample-seconds", "0.05", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    results = _read(out)
    assert results["meta"]["command"].startswith("kvferry bench --target")
    full, half = results["runs"]
    for run, retention in ((full, 1.0), (half, 0.5)):
        assert (run["mode"], run["retention"], run["target"]) == (
            "disaggregated",
            retention,
            cluster.coordinator_address,
        )
        assert run["requests"] == 4 and run["failed"] == 0
        assert run["output_tokens"] == 4 * 6
        assert [r["output_len"] for r in run["per_request"]] == [6] * 4
        assert all(48 <= r["input_len"] <= 96 for r in run["per_request"])
        _check_latencies(run)
        assert run["transports"] == ["shm"]  # auto between two CPU engines of one host
        assert run["kv_pool_bytes"] <= DECODE_KV_BYTES and run["kv_pool_bytes"] > DECODE_KV_BYTES // 2
        assert run["samples"] and run["decode_kv_used_bytes"]["p99"] <= run["kv_pool_bytes"]
    # the same requests at both retentions: the same uncompressed bytes, half of them shipped
    assert full["kv_bytes_full"] == half["kv_bytes_full"] == full["kv_bytes_shipped"] > 0
    assert full["retention_mean"] == 1.0
    assert abs(half["retention_mean"] - 0.5) < 0.1
    assert 0.4 < half["kv_bytes_shipped"] / half["kv_bytes_full"] < 0.6
    cluster.assert_no_leaks()


def test_docqa_questions_on_cached_documents(cluster: InProcessCluster, tmp_path: Path) -> None:
    out = tmp_path / "docqa"
    code = cli_main(
        ["bench", "--target", cluster.coordinator_address, "--workload", "docqa", "--documents", "2",
         "--questions-per-document", "3", "--zipf", "0", "--input-len", "96", "--question-len", "8-12",
         "--output-len", "4", "--concurrency", "2", "--context-caches", "off,1,0.5,auto", "--warmup", "0",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    results = _read(out)
    assert results["meta"]["questions_per_document"] == [3, 3]
    off, whole, half, auto = results["runs"]
    assert [r["context_cache_setting"] for r in results["runs"]] == ["off", "1", "0.5", "auto"]
    for run in results["runs"]:
        assert run["requests"] == 6 and run["failed"] == 0 and run["output_tokens"] == 6 * 4
        _check_latencies(run)
        assert run["cached_pages_after_drop"] == 0  # each setting's contexts dropped: the next starts cold
    assert off["context_cache"]["prefill"] == {"hit": 0, "miss": 0, "off": 6}
    assert off["documents_cached"] == 0 and off["documents_per_gib"] is None
    assert off["prefill_tokens_computed"] == sum(r["input_len"] for r in off["per_request"])
    for run in (whole, half, auto):  # each document computed once, its other questions hit
        assert run["context_cache"]["prefill"] == {"hit": 4, "miss": 2, "off": 0}
        assert run["context_cache"]["decode"]["hit"] + run["context_cache"]["decode"]["miss"] == 6
        assert run["documents_cached"] == 2 and run["prefill_evictions"] == 0
        assert run["prefill_tokens_computed"] < off["prefill_tokens_computed"]
    # half the pages of a document at retention 0.5: twice the documents per GiB
    assert 1.6 < half["documents_per_gib"] / whole["documents_per_gib"] <= 2.0
    assert auto["documents_per_gib"] >= whole["documents_per_gib"]
    cluster.assert_no_leaks()


def test_compare_puts_the_same_load_through_both(
    cluster: InProcessCluster, tiny: TinyModel, tmp_path: Path
) -> None:
    out = tmp_path / "compare"
    code = cli_main(
        ["bench", "--compare", "colocated,disaggregated", "--target", cluster.coordinator_address,
         "--model", str(tiny.path), "--device", "cpu", "--dtype", "float32", "--engine-args", " ".join(ENGINE),
         "--decode-kv-bytes", str(DECODE_KV_BYTES), "--num-requests", "3", "--input-len", "40-80",
         "--output-len", "4-8", "--rate", "20", "--retention", "0.5", "--warmup", "0", "--out", str(out),
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    colocated, disaggregated = _read(out)["runs"]
    assert (colocated["mode"], disaggregated["mode"]) == ("colocated", "disaggregated")
    for run in (colocated, disaggregated):
        assert run["failed"] == 0
        _check_latencies(run)
    # identical requests: prompt lengths, output lengths and the uncompressed KV they make
    shape = [
        [(r["input_len"], r["output_len"]) for r in run["per_request"]] for run in (colocated, disaggregated)
    ]
    assert sorted(shape[0]) == sorted(shape[1])
    assert colocated["kv_bytes_full"] == disaggregated["kv_bytes_full"]
    assert colocated["kv_bytes_shipped"] == disaggregated["kv_bytes_shipped"]  # the same selection kept
    assert (
        colocated["decode_step_throughput_tok_s"] > 0 and "decode_step_throughput_tok_s" not in disaggregated
    )
    assert colocated["kv_pool_bytes"] <= DECODE_KV_BYTES
    cluster.assert_no_leaks()


def test_a_workload_the_model_cannot_hold_is_refused_before_sending(
    cluster: InProcessCluster, tmp_path: Path
) -> None:
    code = cli_main(["bench", "--target", cluster.coordinator_address, "--input-len", "600", "--output-len",
                     "8", "--num-requests", "1", "--warmup", "0", "--quiet"])  # fmt: skip
    assert code == 2  # ValueError: max_model_len 512


# ---- workload ----------------------------------------------------------------------------------------
def _args(*argv: str) -> Any:
    return cli_parser().parse_args(["bench", *argv])


def test_length_ranges_and_distributions() -> None:
    assert bench.parse_length("8192") == (8192, 8192)
    assert bench.parse_length("16k-32k") == (16384, 32768)
    assert bench.parse_length("100:200") == (100, 200)
    with pytest.raises(Exception, match="empty range"):
        bench.parse_length("32k-16k")
    uniform = _args("--input-len", "16k-32k", "--num-requests", "200", "--output-len", "256")
    lens = [len(r.prompt) for r in bench.make_workload(uniform, vocab=50)]
    assert min(lens) >= 16384 and max(lens) <= 32768
    assert min(lens) < 18000 and max(lens) > 31000  # the whole range is used
    # the old spelling --input-len A --input-len-max B means the same range
    old = _args("--input-len", "16384", "--input-len-max", "32768", "--num-requests", "200")
    assert [len(r.prompt) for r in bench.make_workload(old, vocab=50)] == lens
    normal = _args("--input-len", "1000-2000", "--input-dist", "normal", "--num-requests", "400")
    nlens = [len(r.prompt) for r in bench.make_workload(normal, vocab=50)]
    assert min(nlens) >= 1000 and max(nlens) <= 2000
    assert abs(statistics.fmean(nlens) - 1500) < 30 and statistics.pstdev(nlens) < 250  # uniform: ~289


def test_poisson_arrivals_at_the_rate() -> None:
    offsets = bench.arrival_offsets(_args("--rate", "4"), 2000)
    assert offsets is not None and offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert abs(statistics.fmean(gaps) - 0.25) < 0.02
    assert abs(statistics.pstdev(gaps) - 0.25) < 0.03  # exponential: sd == mean
    assert bench.arrival_offsets(_args("--concurrency", "4"), 10) is None


def test_compare_modes_are_checked() -> None:
    assert bench.bench_modes(_args("--compare", "colocated,disaggregated")) == ["colocated", "disaggregated"]
    assert bench.bench_modes(_args("--colocated")) == ["colocated"]
    assert bench.bench_modes(_args()) == ["disaggregated"]
    with pytest.raises(ValueError, match="unknown modes"):
        bench.bench_modes(_args("--compare", "colocated,prefill-only"))


# ---- GPU placement flags -> the services' settings --------------------------------------------------
def _settings(cluster: LocalCluster) -> tuple[PrefillSettings, DecodeSettings]:
    def flags(node: str) -> list[str]:  # what follows `python -P -m kvferry.<service>`
        command = cluster.command(node)
        return command[command.index("-m") + 2 :]

    return parse_settings(PrefillSettings, flags("prefill"), environ={}), parse_settings(
        DecodeSettings, flags("decode"), environ={}
    )


def test_up_gpu_flags_reach_each_service() -> None:
    args = cli_parser().parse_args(
        ["up", "--model", "benchmarks/configs/llama-3.1-8b", "--load-format", "dummy", "--device", "cuda",
         "--prefill-device", "cuda:0", "--decode-device", "cuda:1", "--dtype", "bfloat16", "--kv-cache-gib", "4",
         "--decode-kv-cache-gib", "40.5", "--max-model-len", "33000", "--max-num-seqs", "32",
         "--transport", "nccl", "--prefill-args", "--reserve-wait-seconds 600", "--decode-args",
         "--lease-seconds 60"]
    )  # fmt: skip
    prefill, decode = _settings(LocalCluster.from_options(cluster_options(args)))
    assert (prefill.device, decode.device) == ("cuda:0", "cuda:1")
    assert (prefill.kv_cache_bytes, decode.kv_cache_bytes) == (4 * GIB, int(40.5 * GIB))
    for s in (prefill, decode):
        assert (s.model, s.load_format, s.dtype) == ("benchmarks/configs/llama-3.1-8b", "dummy", "bfloat16")
        assert (s.max_model_len, s.max_num_seqs) == (33000, 32)
    assert prefill.transport == "nccl"
    assert (prefill.reserve_wait_seconds, decode.lease_seconds) == (600, 60)


def test_defaults_leave_the_services_defaults() -> None:
    prefill, decode = _settings(LocalCluster.from_options(cluster_options(cli_parser().parse_args(["up"]))))
    assert prefill.transport == AUTO == PrefillSettings.transport
    assert (prefill.device, decode.device) == ("auto", "auto")
    assert prefill.kv_cache_bytes is None and decode.kv_cache_bytes is None
    # --device alone places both; the CLI's transport choices are the transfer layer's
    prefill, decode = _settings(
        LocalCluster.from_options(cluster_options(cli_parser().parse_args(["up", "--device", "cuda:2"])))
    )
    assert (prefill.device, decode.device) == ("cuda:2", "cuda:2")
    assert (AUTO, *TRANSPORT_NAMES) == TRANSPORTS
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["up", "--transport", "carrier-pigeon"])


def test_bench_colocated_engine_is_the_decode_nodes() -> None:
    args = _args("--compare", "colocated,disaggregated", "--prefill-device", "cuda:0", "--decode-device",
                 "cuda:1", "--decode-kv-bytes", str(6 * GIB), "--engine-args", "--page-size 32")  # fmt: skip
    options = bench.bench_options(args)
    colocated = options.colocated_settings()
    assert (colocated.device, colocated.kv_cache_bytes, colocated.page_size) == ("cuda:1", 6 * GIB, 32)
    prefill, decode = _settings(LocalCluster.from_options(options))
    assert (prefill.device, prefill.page_size, prefill.kv_cache_bytes) == ("cuda:0", 32, None)
    assert (decode.device, decode.kv_cache_bytes) == ("cuda:1", 6 * GIB)


# ---- the command starting its own cluster (three processes) ------------------------------------------
def _reap(model_path: Path) -> list[int]:
    """Services of these tests still running (their command line names the tiny model's folder, which
    only they use): killed by pid so a failing test leaves nothing behind; their pids."""
    found = subprocess.run(
        ["pgrep", "-f", f"_service .*--model {model_path}"], capture_output=True, text=True
    )
    pids = [int(p) for p in found.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


@pytest.mark.slow
def test_bench_starts_and_stops_a_local_cluster(tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "local"
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "kvferry.clients.cli", "bench", "--model", str(tiny.path), "--device", "cpu",
         "--dtype", "float32", "--engine-args", " ".join(ENGINE), "--kv-cache-bytes", str(4 << 20),
         "--num-requests", "3", "--input-len", "64", "--output-len", "5", "--concurrency", "3",
         "--retention", "0.5", "--warmup", "0", "--log-dir", str(tmp_path / "logs"),
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = _read(out)["runs"]
    assert run["failed"] == 0 and run["output_tokens"] == 15
    assert run["transports"] == ["shm"]
    _check_latencies(run)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert set(logs) == {"coordinator.log", "prefill.log", "decode.log"}
    assert _reap(tiny.path) == [], "a service outlived kvferry bench"


@pytest.mark.slow
def test_sigterm_stops_the_services_bench_started(tiny: TinyModel, tmp_path: Path) -> None:
    """`timeout 300 kvferry bench ...` on a device machine must not leave GPU processes behind."""
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "kvferry.clients.cli", "bench", "--model", str(tiny.path), "--device", "cpu",
         "--engine-args", " ".join(ENGINE), "--kv-cache-bytes", str(4 << 20), "--num-requests", "500",
         "--input-len", "256", "--output-len", "200", "--warmup", "0", "--log-dir", str(tmp_path / "logs"),
         "--out", str(tmp_path / "never"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    services: list[int] = []
    try:
        lines: list[str] = []
        while not any("coordinator ready" in line for line in lines):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, "".join(lines)
            lines.append(line)
        time.sleep(1.0)  # requests in flight
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        services = [int(p) for p in children.stdout.split()]
        assert len(services) == 3
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        alive = [pid for pid in services if _alive(pid)]
        assert alive == [], "a service outlived kvferry bench"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in services:  # never leave them behind, also when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (tmp_path / "never.json").exists()  # nothing finished, nothing claimed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (it only waits for its parent, already exited, to be reaped)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
