"""The load generator's core, shared by `kvferry bench`'s workloads (clients/bench.py: random prompts,
clients/docqa_bench.py: questions on shared documents): requests and their records, lengths and
arrivals, driving them through a coordinator at fixed concurrency or Poisson arrivals, the summary
(latency percentiles, throughput, bytes, context cache), and the cluster a run starts or targets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvferry.clients.cluster_options import ClusterOptions, cluster_options


@dataclass
class Request:
    prompt: list[int]
    output_len: int
    context: list[int] | None = None  # a document in front of the prompt (the docqa workload)


@dataclass
class Record:
    input_len: int
    output_len: int = 0
    send: float = 0.0
    token_times: list[float] = field(default_factory=list)
    retention: float = 1.0
    kv_bytes_shipped: int = 0
    kv_bytes_full: int = 0
    transfer_seconds: float = 0.0
    handoff_seconds: float = 0.0
    transport: str = ""
    context_cache: str = ""  # the prefill node's "hit" / "miss" / "off" (requests with a context)
    decode_context_cache: str = ""
    prefill_tokens_computed: int = 0
    context_handle: str = ""
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.send

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.send

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


# ---- workload -------------------------------------------------------------------------------------
def parse_length(text: str) -> tuple[int, int]:
    """ "8192" -> (8192, 8192); "16k" -> (16384, 16384); "16k-32k" or "16384:32768" -> a range (k = 1024)."""

    def one(part: str) -> int:
        part = part.strip().lower()
        value = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        if value < 1:
            raise argparse.ArgumentTypeError(f"lengths must be >= 1, got {part!r}")
        return value

    for sep in ("-", ":"):
        if sep in text:
            lo, hi = (one(p) for p in text.split(sep, 1))
            if hi < lo:
                raise argparse.ArgumentTypeError(f"empty range {text!r}")
            return lo, hi
    n = one(text)
    return n, n


def _draw(rng: random.Random, lo: int, hi: int, dist: str) -> int:
    if hi <= lo:
        return lo
    if dist == "normal":  # centred in the range, 3 sigma to either end, clipped
        return min(hi, max(lo, round(rng.gauss((lo + hi) / 2, (hi - lo) / 6))))
    return rng.randint(lo, hi)


def length_range(args: argparse.Namespace, which: str) -> tuple[int, int]:
    lo, hi = getattr(args, f"{which}_len")
    top = getattr(args, f"{which}_len_max")
    return lo, max(lo, top) if top else hi


def warmup_workload(args: argparse.Namespace, vocab: int) -> list[Request]:
    """--warmup requests, run (and discarded) before each measured run: short (at most 2048 prompt and
    16 output tokens, so 32K workloads do not spend minutes warming up), enough to compile the kernels
    and take every code path once."""
    rng = random.Random(args.seed + 7)
    n_in = min(length_range(args, "input")[0], 2048)
    n_out = min(length_range(args, "output")[0], 16)
    return [Request([rng.randrange(1, vocab) for _ in range(n_in)], n_out) for _ in range(args.warmup)]


def arrival_offsets(args: argparse.Namespace, n: int) -> list[float] | None:
    """Seconds after the start at which each request arrives (Poisson at --rate); None: concurrency."""
    if not args.request_rate:
        return None
    rng = random.Random(args.seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(args.request_rate)
    return out


# ---- results --------------------------------------------------------------------------------------
def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(records: list[Record], wall: float, samples: list[dict[str, float]]) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.token_times]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    out_tokens = sum(len(r.token_times) for r in ok)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "wall_seconds": wall,
        "input_tokens": sum(r.input_len for r in ok),
        "output_tokens": out_tokens,
        "output_throughput_tok_s": out_tokens / wall,
        "request_throughput_req_s": len(ok) / wall,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": percentiles(itl),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "retention_mean": statistics.fmean(r.retention for r in ok) if ok else None,
        "kv_bytes_shipped": sum(r.kv_bytes_shipped for r in ok),
        "kv_bytes_full": sum(r.kv_bytes_full for r in ok),
        "transports": sorted({r.transport for r in ok if r.transport}),
        "transfer_s": percentiles([r.transfer_seconds for r in ok if r.transport]),
        "handoff_s": percentiles([r.handoff_seconds for r in ok if r.handoff_seconds]),
        "decode_batch": percentiles([s["running"] for s in samples]),
        "decode_kv_used_bytes": percentiles([s["kv_used_bytes"] for s in samples]),
        "samples": samples,
        "context_cache": {
            node: {kind: sum(getattr(r, attr) == kind for r in ok) for kind in ("hit", "miss", "off")}
            for node, attr in (("prefill", "context_cache"), ("decode", "decode_context_cache"))
        },
        "prefill_tokens_computed": sum(r.prefill_tokens_computed for r in ok),
        "per_request": [
            {
                "input_len": r.input_len,
                "output_len": len(r.token_times),
                "ttft_s": r.ttft,
                "tpot_s": r.tpot,
                "e2e_s": r.e2e,
            }  # fmt: skip
            for r in ok
        ],
    }


# ---- against a coordinator ------------------------------------------------------------------------
async def drive(
    args: argparse.Namespace, jobs: list[Callable[[], Awaitable[None]]], offsets: list[float] | None
) -> None:
    """Fixed concurrency, or each job started at its arrival offset (Poisson at --rate)."""
    if offsets is not None:
        loop = asyncio.get_running_loop()
        start, tasks = loop.time(), []
        for job, at in zip(jobs, offsets):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(job()))
        await asyncio.gather(*tasks)
        return
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))


def _client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"token": getattr(args, "token", None), "tls_ca": getattr(args, "tls_ca", None)}


async def run_cluster(
    args: argparse.Namespace,
    address: str,
    work: list[Request],
    retention: float | str,
    quiet: bool = False,
    cache_context: bool | None = None,
    label: str | None = None,
) -> tuple[dict[str, Any], list[Record]]:
    """The summary of `work` through the coordinator at `address`, and each request's record.
    `retention`: a fraction (1: the whole cache) or "auto"; `cache_context`: requests with a context
    cache it (None: the cluster's default)."""
    from tqdm import tqdm

    from kvferry.clients import AsyncClient

    records = [Record(len(r.prompt) + len(r.context or ())) for r in work]
    samples: list[dict[str, float]] = []
    # "none", not unset: a cluster with a compression policy would compress a request that names none
    compression = (
        {"method": "none"}
        if retention != "auto" and float(retention) >= 1.0
        else {"method": args.method, "retention": retention}
    )
    bar = tqdm(total=len(work), desc=label or f"disaggregated r={retention}", disable=quiet or args.quiet)
    pool: dict[str, Any] = {}
    async with AsyncClient(address, timeout=args.timeout, **_client_kwargs(args)) as client:
        info = await client.info(timeout=10)
        decode = [n for n in info.decode_nodes if n.reachable]
        pool["kv_pool_bytes"] = sum(n.pool.total_pages * n.pool.bytes_per_page for n in decode)
        pool["model"] = decode[0].model.source if decode else ""
        start = time.perf_counter()
        done = asyncio.Event()

        async def sample() -> None:  # the coordinator's view of its decode nodes (works through TLS)
            while not done.is_set():
                try:
                    nodes = [n for n in (await client.info(timeout=5)).decode_nodes if n.reachable]
                except Exception:  # a sample missed is not a failed request
                    nodes = None
                if nodes is not None:
                    samples.append(
                        {
                            "t": time.perf_counter() - start,
                            "running": sum(n.load for n in nodes),
                            "kv_used_bytes": sum(n.pool.used_pages * n.pool.bytes_per_page for n in nodes),
                        }
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), args.sample_seconds)

        async def one(i: int) -> None:
            rec, req = records[i], work[i]
            rec.send = time.perf_counter()
            try:
                async for chunk in client.stream(
                    req.prompt, compression=compression, temperature=0.0, max_new_tokens=req.output_len,
                    ignore_eos=True, context=req.context, cache_context=cache_context,
                ):  # fmt: skip
                    now = time.perf_counter()
                    rec.token_times += [now] * len(chunk.token_ids)
                    if chunk.stats is not None:
                        p = chunk.stats.prefill
                        rec.retention, rec.kv_bytes_shipped, rec.kv_bytes_full = (
                            p.retention,
                            p.kv_bytes_shipped,
                            p.kv_bytes_full,
                        )
                        rec.transfer_seconds, rec.handoff_seconds = p.transfer_seconds, p.handoff_seconds
                        rec.transport = p.transport
                        rec.context_cache, rec.prefill_tokens_computed = (
                            p.context_cache,
                            p.prefill_tokens_computed,
                        )
                        rec.context_handle = p.context_handle
                        rec.decode_context_cache = chunk.stats.decode.context_cache
            except Exception as e:  # counted, not fatal: a benchmark reports failures
                rec.error = f"{type(e).__name__}: {e}"
            bar.update(1)

        sampler = asyncio.create_task(sample())
        await drive(args, [lambda i=i: one(i) for i in range(len(work))], arrival_offsets(args, len(work)))
        wall = time.perf_counter() - start
        done.set()
        await sampler
    bar.close()
    return {**summarize(records, wall, samples), **pool}, records


def bench_options(args: argparse.Namespace) -> ClusterOptions:
    options = cluster_options(args)
    if args.decode_kv_bytes and options.decode_kv_cache_bytes is None:
        options.decode_kv_cache_bytes = args.decode_kv_bytes
    return options


@contextlib.contextmanager
def coordinator_address(args: argparse.Namespace, options: ClusterOptions) -> Iterator[str]:
    """--target, or a coordinator + prefill + decode started here (with the cluster flags) and stopped
    on the way out."""
    from kvferry.clients.local_cluster import LocalCluster

    if args.target is not None:
        yield args.target
        return
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="kvferry-bench-"))
    cluster = LocalCluster.from_options(options, log_dir=log_dir)
    print(f"starting coordinator, prefill and decode (logs in {log_dir})", file=sys.stderr, flush=True)
    cluster.start()
    try:
        cluster.wait_ready(timeout=args.ready_timeout, progress=lambda line: print(line, file=sys.stderr))
        yield cluster.coordinator_address
    finally:
        cluster.stop()
