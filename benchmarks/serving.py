"""Serving benchmark: a load generator for a kvferry cluster (or the colocated engine) on long prompts.

Requests are random token-id prompts (speed does not depend on the words) with input and output
lengths drawn uniformly from the given ranges, `ignore_eos` so every request produces exactly its
output length. Load is a fixed number of requests in flight (--concurrency) or a Poisson arrival rate
(--request-rate). Reports TTFT, TPOT (mean time per output token after the first), inter-token
latency and end-to-end latency at p50/p90/p99, output and request throughput, retention, KV bytes
shipped vs uncompressed, and the decode node's KV pages in use and batch size over the run.

    # against a running coordinator (kvferry up ...)
    python benchmarks/serving.py --address 127.0.0.1:50051 --num-requests 64 --concurrency 16
    # start a local cluster with these engine flags, sweep retention, write JSON + PNG
    python benchmarks/serving.py --start-cluster --engine-args="--model cfg/ --load-format dummy" \\
        --retention 1,0.5,0.25,0.1 --out docs/benchmarks/serving
    # the same workload through the colocated engine in this process
    python benchmarks/serving.py --colocated --engine-args="--model cfg/ --load-format dummy" ...
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402


@dataclass
class Request:
    prompt: list[int]
    output_len: int


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


def make_workload(args: argparse.Namespace, vocab: int) -> list[Request]:
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_requests):
        n_in = rng.randint(args.input_len, max(args.input_len, args.input_len_max or args.input_len))
        n_out = rng.randint(args.output_len, max(args.output_len, args.output_len_max or args.output_len))
        out.append(Request([rng.randrange(1, vocab) for _ in range(n_in)], n_out))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    return {"mean": statistics.fmean(values), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(records: list[Record], wall: float, samples: list[dict[str, float]]) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and r.token_times]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    out_tokens = sum(len(r.token_times) for r in ok)
    full = sum(r.kv_bytes_full for r in ok)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "wall_seconds": wall,
        "output_tokens": out_tokens,
        "output_throughput_tok_s": out_tokens / wall,
        "request_throughput_req_s": len(ok) / wall,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": percentiles(itl),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "retention_mean": statistics.fmean(r.retention for r in ok) if ok else None,
        "kv_bytes_shipped": sum(r.kv_bytes_shipped for r in ok),
        "kv_bytes_full": full,
        "transfer_s": percentiles([r.transfer_seconds for r in ok if r.kv_bytes_shipped]),
        "decode_batch": percentiles([s["running"] for s in samples]),
        "decode_kv_used_bytes": percentiles([s["kv_used_bytes"] for s in samples]),
        "samples": samples,
    }


# ---- against a coordinator -------------------------------------------------------------------------
async def run_cluster(
    args: argparse.Namespace, address: str, work: list[Request], retention: float
) -> dict[str, Any]:
    import grpc

    from clients import AsyncClient
    from protos.kvferry.v1 import decode_pb2, decode_pb2_grpc

    records = [Record(len(r.prompt)) for r in work]
    samples: list[dict[str, float]] = []
    compression = None if retention >= 1.0 else {"method": args.method, "retention": retention}
    bar = tqdm(total=len(work), desc=f"retention {retention}", disable=args.quiet)
    async with AsyncClient(address, timeout=args.timeout) as client:
        info = await client.info()
        decode_channels = [grpc.aio.insecure_channel(n.address) for n in info.decode_nodes]
        decode_stubs = [decode_pb2_grpc.DecodeServiceStub(c) for c in decode_channels]
        start = time.perf_counter()
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                running, used = 0, 0
                for stub in decode_stubs:
                    d = await stub.Info(decode_pb2.DecodeInfoRequest(), timeout=5)
                    running += d.running
                    used += d.pool.used_pages * d.pool.bytes_per_page
                samples.append({"t": time.perf_counter() - start, "running": running, "kv_used_bytes": used})
                await asyncio.sleep(args.sample_seconds)

        async def one(i: int) -> None:
            rec, req = records[i], work[i]
            rec.send = time.perf_counter()
            try:
                async for chunk in client.stream(
                    req.prompt, compression=compression, temperature=0.0, max_new_tokens=req.output_len,
                    ignore_eos=True,
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
                        rec.transfer_seconds = p.transfer_seconds
            except Exception as e:  # counted, not fatal: a benchmark reports failures
                rec.error = f"{type(e).__name__}: {e}"
            bar.update(1)

        sampler = asyncio.create_task(sample())
        await drive(args, [lambda i=i: one(i) for i in range(len(work))])
        wall = time.perf_counter() - start
        done.set()
        await sampler
        for c in decode_channels:
            await c.close()
    bar.close()
    return summarize(records, wall, samples)


async def drive(args: argparse.Namespace, jobs: list[Any]) -> None:
    """Fixed concurrency, or Poisson arrivals at --request-rate."""
    if args.request_rate:
        rng = random.Random(args.seed + 1)
        tasks = []
        for job in jobs:
            tasks.append(asyncio.create_task(job()))
            await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        return
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))


# ---- colocated engine ------------------------------------------------------------------------------
def run_colocated(
    args: argparse.Namespace, engine: Any, work: list[Request], retention: float
) -> dict[str, Any]:
    from engine import CompressionParams, SamplingParams

    compression = None if retention >= 1.0 else CompressionParams(method=args.method, retention=retention)
    records = [Record(len(r.prompt)) for r in work]
    samples: list[dict[str, float]] = []
    pending = list(range(len(work)))
    live: dict[str, int] = {}
    seen: dict[str, int] = {}
    bar = tqdm(total=len(work), desc=f"colocated retention {retention}", disable=args.quiet)
    start = time.perf_counter()
    last_sample = 0.0
    decode_seconds, decode_tokens = 0.0, 0
    while pending or live:
        while pending and len(live) < args.concurrency:
            i = pending.pop(0)
            sp = SamplingParams(temperature=0.0, max_new_tokens=work[i].output_len, ignore_eos=True)
            seq = engine.add_request(work[i].prompt, sp, compression)
            records[i].send = time.perf_counter()
            live[seq.request_id] = i
            seen[seq.request_id] = 0
        t0 = time.perf_counter()
        produced = engine.step()
        now = time.perf_counter()
        if produced and len(produced[0].output_token_ids) > 1:  # a decode step (prefill gives token 1)
            decode_seconds += now - t0
            decode_tokens += len(produced)
        for seq in produced:
            i = live.get(seq.request_id)
            if i is None:
                continue
            new = len(seq.output_token_ids) - seen[seq.request_id]
            seen[seq.request_id] += new
            records[i].token_times += [now] * new
            if seq.is_finished:
                s = seq.stats
                records[i].retention = s.retention
                records[i].kv_bytes_shipped = s.kv_bytes  # what a disaggregated run would ship
                records[i].kv_bytes_full = s.kv_bytes_full
                del live[seq.request_id]
                bar.update(1)
        if now - last_sample >= args.sample_seconds:
            last_sample = now
            samples.append(
                {
                    "t": now - start,
                    "running": engine.scheduler.running_count(),
                    "kv_used_bytes": engine.pool.num_used * engine.pool.bytes_per_page,
                }
            )
    bar.close()
    engine.pool.assert_no_leaks()
    result = summarize(records, time.perf_counter() - start, samples)
    # What a decode node alone would do at this KV budget: tokens per second of decode steps.
    result["decode_step_throughput_tok_s"] = decode_tokens / decode_seconds if decode_seconds else None
    result["decode_step_seconds"] = decode_seconds
    return result


# ---- main ------------------------------------------------------------------------------------------
def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "cpu"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [f"{r['mode']}\nr={r['retention']}" for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(labels, [r["output_throughput_tok_s"] for r in runs], color="tab:blue")
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title("throughput")
    for key, ax, title in (("ttft_s", axes[1], "TTFT (s)"), ("tpot_s", axes[2], "TPOT (s)")):
        p50 = [r[key].get("p50", 0) for r in runs]
        p99 = [r[key].get("p99", 0) for r in runs]
        x = range(len(runs))
        ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
        ax.set_xticks(list(x), labels)
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    meta = results["meta"]
    fig.suptitle(f"kvferry serving - {meta['device']} - {meta['date']} - {meta['workload']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="a running coordinator")
    where.add_argument(
        "--start-cluster", action="store_true", help="start coordinator + prefill + decode here"
    )
    where.add_argument("--colocated", action="store_true", help="the in-process engine, no services")
    p.add_argument("--engine-args", default="", help="engine flags for --start-cluster / --colocated")
    p.add_argument("--decode-kv-bytes", type=int, help="decode node (or colocated engine) KV budget")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=8192)
    p.add_argument("--input-len-max", type=int)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--output-len-max", type=int)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--request-rate", type=float, help="Poisson arrivals per second (instead of concurrency)")
    p.add_argument("--retention", default="1.0", help="comma-separated; 1.0 = uncompressed")
    p.add_argument("--method", default="compactor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--sample-seconds", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=2, help="requests run (and discarded) before measuring")
    p.add_argument("--out", type=Path, help="write <out>.json and <out>.png")
    p.add_argument("--append", action="store_true", help="add runs to an existing <out>.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    retentions = [float(x) for x in args.retention.split(",")]
    runs: list[dict[str, Any]] = []
    mode = "colocated" if args.colocated else "disaggregated"
    if args.colocated:
        from engine import EngineConfig
        from engine.llm_engine import LLMEngine
        from serving.settings import EngineSettings, parse_settings

        settings = parse_settings(EngineSettings, shlex.split(args.engine_args), environ={})
        config: EngineConfig = settings.engine_config()
        if args.decode_kv_bytes:
            config.kv_cache_bytes = args.decode_kv_bytes
        engine = LLMEngine(config)
        vocab = engine.loaded.config.vocab_size
        for retention in retentions:
            warm = make_workload(argparse.Namespace(**{**vars(args), "num_requests": args.warmup}), vocab)
            if warm:
                run_colocated(argparse.Namespace(**{**vars(args), "quiet": True}), engine, warm, retention)
            result = run_colocated(args, engine, make_workload(args, vocab), retention)
            runs.append({"mode": mode, "retention": retention, **result})
    else:
        cluster = None
        address = args.address
        if args.start_cluster:
            from clients.local_cluster import LocalCluster

            decode_args = ["--kv-cache-bytes", str(args.decode_kv_bytes)] if args.decode_kv_bytes else []
            cluster = LocalCluster(shlex.split(args.engine_args), decode_args=decode_args)
            cluster.start()
            cluster.wait_ready(timeout=900, progress=lambda line: print(line, flush=True))
            address = cluster.coordinator_address
        try:
            from clients import Client

            with Client(address) as c:
                vocab = c.info().decode_nodes[0].model.vocab_size
            for retention in retentions:
                if args.warmup:
                    warm = make_workload(
                        argparse.Namespace(**{**vars(args), "num_requests": args.warmup}), vocab
                    )
                    asyncio.run(
                        run_cluster(
                            argparse.Namespace(**{**vars(args), "quiet": True}), address, warm, retention
                        )
                    )
                result = asyncio.run(run_cluster(args, address, make_workload(args, vocab), retention))
                runs.append({"mode": mode, "retention": retention, **result})
        finally:
            if cluster is not None:
                cluster.stop()
    workload = (
        f"{args.num_requests} req, in {args.input_len}-{args.input_len_max or args.input_len}, "
        f"out {args.output_len}-{args.output_len_max or args.output_len}, "
        + (f"rate {args.request_rate}/s" if args.request_rate else f"concurrency {args.concurrency}")
    )
    results = {
        "meta": {
            "device": device_name(),
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/serving.py "
            + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "workload": workload,
            "decode_kv_bytes": args.decode_kv_bytes,
            "engine_args": args.engine_args,
        },
        "runs": runs,
    }
    for r in runs:
        print(
            f"{r['mode']:>13} r={r['retention']:<5} {r['output_throughput_tok_s']:9.1f} tok/s  "
            f"TTFT p50 {r['ttft_s'].get('p50', float('nan')):.3f}s p99 {r['ttft_s'].get('p99', float('nan')):.3f}s  "
            f"TPOT p50 {r['tpot_s'].get('p50', float('nan')) * 1e3:.1f}ms  batch mean "
            f"{r['decode_batch'].get('mean', 0):.1f}  failed {r['failed']}"
            + (f"  decode-step {d:.1f} tok/s" if (d := r.get("decode_step_throughput_tok_s")) else "")
        )
    if args.out:
        json_path = args.out.with_suffix(".json")
        if args.append and json_path.exists():
            previous = json.loads(json_path.read_text())
            results["runs"] = previous["runs"] + runs
            results["meta"]["command"] = previous["meta"]["command"] + " ; " + results["meta"]["command"]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
        plot(results, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
