"""`kvferry bench`: a load generator for kvferry on long prompts (also `python benchmarks/serving.py`).

Requests are random token-id prompts (speed does not depend on the words) with input and output
lengths drawn from the given ranges (uniform, or a normal centred in the range), `ignore_eos` so every
request produces exactly its output length. Load is a fixed number of requests in flight
(--concurrency) or Poisson arrivals (--rate). Reports TTFT, TPOT (mean time per output token after the
first), inter-token latency and end-to-end latency at p50/p90/p99, output and request throughput,
retention, KV bytes shipped vs uncompressed, the transport, and the decode side's KV bytes in use and
batch size sampled over the run; writes <out>.json and <out>.png. `--workload docqa` asks many
questions on a few shared documents instead, with the context cache off and on (clients/docqa_bench.py).

Where the load goes:
  (default)          start coordinator + prefill + decode here with the cluster flags, stop them after
  --target ADDR      a running coordinator (kvferry up, docker compose, ...)
  --colocated        the in-process engine, no services (the decode node's device and KV budget)
  --compare colocated,disaggregated
                     the same requests (and arrival times) through both, one after the other; one
                     plot compares their TTFT, TPOT and throughput

    kvferry bench --model benchmarks/configs/llama-3.1-8b --load-format dummy --decode-kv-cache-gib 6 \\
        --input-len 16k-32k --output-len 256 --num-requests 16 --rate 0.5 --retention 1,0.25 --out run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import random
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvferry.clients.cluster_options import ClusterOptions, add_cluster_flags
from kvferry.clients.load import (  # noqa: F401  (arrival_offsets, parse_length: this module's face too)
    Record,
    Request,
    _client_kwargs,
    _draw,
    arrival_offsets,
    bench_options,
    coordinator_address,
    length_range,
    parse_length,
    run_cluster,
    summarize,
    warmup_workload,
)

MODES = ("colocated", "disaggregated")


def make_workload(args: argparse.Namespace, vocab: int) -> list[Request]:
    rng = random.Random(args.seed)
    (in_lo, in_hi), (out_lo, out_hi) = length_range(args, "input"), length_range(args, "output")
    out = []
    for _ in range(args.num_requests):
        n_in = _draw(rng, in_lo, in_hi, args.input_dist)
        n_out = _draw(rng, out_lo, out_hi, args.output_dist)
        out.append(Request([rng.randrange(1, vocab) for _ in range(n_in)], n_out))
    return out


# ---- colocated engine ------------------------------------------------------------------------------
def run_colocated(
    args: argparse.Namespace, engine: Any, work: list[Request], retention: float, quiet: bool = False
) -> dict[str, Any]:
    from tqdm import tqdm

    from kvferry.engine import CompressionParams, SamplingParams

    compression = None if retention >= 1.0 else CompressionParams(method=args.method, retention=retention)
    records = [Record(len(r.prompt)) for r in work]
    samples: list[dict[str, float]] = []
    offsets = arrival_offsets(args, len(work))
    pending = list(range(len(work)))
    live: dict[str, int] = {}
    seen: dict[str, int] = {}
    bar = tqdm(total=len(work), desc=f"colocated r={retention}", disable=quiet or args.quiet)
    start = time.perf_counter()
    last_sample = -1e9
    decode_seconds, decode_tokens = 0.0, 0
    while pending or live:
        now = time.perf_counter()
        while pending and (
            now - start >= offsets[pending[0]] if offsets is not None else len(live) < args.concurrency
        ):
            i = pending.pop(0)
            sp = SamplingParams(temperature=0.0, max_new_tokens=work[i].output_len, ignore_eos=True)
            # Under --rate a request counts from its arrival, also when a long step delayed its admission.
            records[i].send = start + offsets[i] if offsets is not None else time.perf_counter()
            seq = engine.add_request(work[i].prompt, sp, compression)
            live[seq.request_id] = i
            seen[seq.request_id] = 0
        if not live:  # idle until the next arrival
            assert offsets is not None
            time.sleep(max(0.0, start + offsets[pending[0]] - time.perf_counter()))
            continue
        t0 = time.perf_counter()
        produced = engine.step()
        now = time.perf_counter()
        if produced and all(len(s.output_token_ids) > 1 for s in produced):  # a decode step
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
    result["kv_pool_bytes"] = engine.pool.num_pages * engine.pool.bytes_per_page
    result["model"] = str(engine.loaded.source)
    return result


# ---- plot -----------------------------------------------------------------------------------------
def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return "cpu"


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput, TTFT and TPOT (p50 / p90 / p99) per run, and decode KV in use over time; runs of
    different modes (a --compare) side by side in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [f"{r['mode']}\nr={r['retention']}" for r in runs]
    colors = {"colocated": "tab:orange", "disaggregated": "tab:blue"}
    x = list(range(len(runs)))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    axes[0].bar(x, [r["output_throughput_tok_s"] for r in runs],
                color=[colors.get(r["mode"], "tab:gray") for r in runs])  # fmt: skip
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title("throughput")
    for key, ax, title, scale in (
        ("ttft_s", axes[1], "TTFT (s)", 1.0),
        ("tpot_s", axes[2], "TPOT (ms)", 1e3),
    ):
        for k, q in enumerate(("p50", "p90", "p99")):
            ax.bar([i + (k - 1) * 0.27 for i in x], [r[key].get(q, 0) * scale for r in runs], 0.27, label=q)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in axes[:3]:
        ax.set_xticks(x, labels)
        ax.tick_params(axis="x", labelsize=7)
    for r, label in zip(runs, labels):
        s = r.get("samples") or []
        axes[3].plot([p["t"] for p in s], [p["kv_used_bytes"] / (1 << 30) for p in s], label=label.replace("\n", " "),
                     color=colors.get(r["mode"]), alpha=0.4 + 0.6 * float(r["retention"]))  # fmt: skip
    axes[3].set_xlabel("s")
    axes[3].set_ylabel("GiB")
    axes[3].set_title("decode KV in use")
    axes[3].legend(fontsize=6)
    meta = results["meta"]
    fig.suptitle(f"kvferry serving - {meta['device']} - {meta['date']} - {meta['workload']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command --------------------------------------------------------------------------------------
def add_bench_flags(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", "--address", dest="target", help="a running coordinator host:port")
    where.add_argument("--start-cluster", action="store_true", help="start the services here (the default)")
    where.add_argument("--colocated", action="store_true", help="the in-process engine, no services")
    p.add_argument(
        "--compare",
        help="comma list of modes run on the same load: colocated,disaggregated (the disaggregated one on "
        "--target or on services started here)",
    )
    p.add_argument("--token", help="bearer token of --target")
    p.add_argument("--tls-ca", help="PEM CA of --target (turns TLS on)")
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload", choices=("random", "docqa"), default="random",
        help="random: independent random prompts; docqa: questions on shared documents (clients/docqa_bench.py)",
    )  # fmt: skip
    w.add_argument("--num-requests", type=int, default=32)
    w.add_argument("--input-len", type=parse_length, default=(8192, 8192), help="N, 16k or a range 16k-32k")
    w.add_argument("--input-len-max", type=int, help="top of the input range (same as --input-len A-B)")
    w.add_argument("--input-dist", choices=("uniform", "normal"), default="uniform")
    w.add_argument("--output-len", type=parse_length, default=(256, 256), help="N or a range 128-512")
    w.add_argument("--output-len-max", type=int)
    w.add_argument("--output-dist", choices=("uniform", "normal"), default="uniform")
    w.add_argument("--concurrency", type=int, default=16, help="requests in flight (without --rate)")
    w.add_argument("--rate", "--request-rate", dest="request_rate", type=float,
                   help="Poisson arrivals per second (instead of --concurrency)")  # fmt: skip
    w.add_argument("--retention", default="1.0", help="comma-separated sweep; 1.0 = uncompressed")
    w.add_argument("--method", default="compactor", help="compression method")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(
        "--warmup", type=int, default=2, help="short requests (<= 2048 in, 16 out) run and discarded first"
    )
    o = p.add_argument_group("run and output")
    o.add_argument("--decode-kv-bytes", type=int, help="decode (or colocated) KV budget in bytes")
    o.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    o.add_argument("--sample-seconds", type=float, default=0.5, help="decode KV / batch sampling period")
    o.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for started services to load")
    o.add_argument("--log-dir", type=Path, help="started services' logs (default: a temporary folder)")
    o.add_argument("--out", type=Path, help="write <out>.json and <out>.png")
    o.add_argument("--append", action="store_true", help="add the runs to an existing <out>.json")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    from kvferry.clients.docqa_bench import add_docqa_flags  # it builds on this module

    add_docqa_flags(p)
    add_cluster_flags(p)


def bench_modes(args: argparse.Namespace) -> list[str]:
    if args.colocated and args.compare:
        raise ValueError("--colocated and --compare: pick one")
    if args.colocated:
        return ["colocated"]
    if args.compare:
        modes = [m.strip() for m in args.compare.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ValueError(f"--compare: unknown modes {bad}; use {','.join(MODES)}")
        return modes
    return ["disaggregated"]


def _check_fits(args: argparse.Namespace, max_model_len: int) -> None:
    longest = length_range(args, "input")[1] + length_range(args, "output")[1]
    if max_model_len and longest > max_model_len:
        raise ValueError(
            f"the longest request ({longest} positions) exceeds the model's max_model_len {max_model_len}; "
            "lower --input-len / --output-len or raise --max-model-len"
        )


def _colocated_runs(
    args: argparse.Namespace,
    options: ClusterOptions,
    retentions: list[float],
    done: Callable[[dict[str, Any]], None],
) -> None:
    import torch

    from kvferry.engine.llm_engine import LLMEngine

    settings = options.colocated_settings()
    threads = torch.get_num_threads()
    if settings.torch_threads:  # as a service applies it to its own process
        torch.set_num_threads(settings.torch_threads)
    engine = LLMEngine(settings.engine_config())
    try:
        vocab = engine.loaded.config.vocab_size
        _check_fits(args, int(engine.max_model_len))
        for retention in retentions:
            if args.warmup:
                run_colocated(args, engine, warmup_workload(args, vocab), retention, quiet=True)
            result = run_colocated(args, engine, make_workload(args, vocab), retention)
            done({"mode": "colocated", "retention": retention, **result})
    finally:
        torch.set_num_threads(threads)
        device = engine.device
        del engine
        gc.collect()
        if device.type == "cuda":  # give the memory to the services started next
            torch.cuda.empty_cache()


def _disaggregated_runs(
    args: argparse.Namespace,
    options: ClusterOptions,
    retentions: list[float],
    done: Callable[[dict[str, Any]], None],
) -> None:
    from kvferry.clients import Client

    with coordinator_address(args, options) as address:
        with Client(address, timeout=30, **_client_kwargs(args)) as c:
            model = c.info().decode_nodes[0].model
        _check_fits(args, model.max_model_len)
        for retention in retentions:
            if args.warmup:
                warm = warmup_workload(args, model.vocab_size)
                asyncio.run(run_cluster(args, address, warm, retention, quiet=True))
            result, _ = asyncio.run(
                run_cluster(args, address, make_workload(args, model.vocab_size), retention)
            )
            done({"mode": "disaggregated", "retention": retention, "target": address, **result})


def describe_workload(args: argparse.Namespace) -> str:
    (a, b), (c, d) = length_range(args, "input"), length_range(args, "output")
    dist = "" if args.input_dist == "uniform" else f" ({args.input_dist})"
    load = f"rate {args.request_rate}/s" if args.request_rate else f"concurrency {args.concurrency}"
    return f"{args.num_requests} req, in {a}-{b}{dist}, out {c}-{d}, {load}"


def _line(r: dict[str, Any]) -> str:
    nan = float("nan")
    return (
        f"{r['mode']:>13} r={r['retention']:<5} {r['output_throughput_tok_s']:9.1f} tok/s  "
        f"TTFT p50 {r['ttft_s'].get('p50', nan):.3f}s p99 {r['ttft_s'].get('p99', nan):.3f}s  "
        f"TPOT p50 {r['tpot_s'].get('p50', nan) * 1e3:.1f}ms  batch mean {r['decode_batch'].get('mean', 0):.1f}  "
        f"KV shipped {r['kv_bytes_shipped'] / (1 << 30):.2f} GiB  {','.join(r.get('transports', [])) or '-'}  "
        f"failed {r['failed']}"
        + (f"  decode-step {d:.1f} tok/s" if (d := r.get("decode_step_throughput_tok_s")) else "")
    )


def _run_meta(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """What every result file records about its run."""
    options = bench_options(args)
    return {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "target": args.target,
        "decode_kv_bytes": options.decode_kv_cache_bytes or options.kv_cache_bytes,
        "prefill_argv": options.prefill_argv(),
        "decode_argv": options.decode_argv(),
    }


def _with_sigterm(body: Callable[[], int]) -> int:
    """`body()`, with SIGTERM raising KeyboardInterrupt meanwhile (so services started here stop)."""

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, terminate) if in_main else None
    try:
        return body()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, before)


def run(args: argparse.Namespace, command: str) -> int:
    """Run the benchmark `args` describe (flags of add_bench_flags); `command` is recorded in the JSON.

    <out>.json and <out>.png are rewritten after every run, so a run cut short keeps what finished.
    SIGTERM stops services started here before exiting (as Ctrl-C does)."""
    if args.workload == "docqa":
        from kvferry.clients import docqa_bench

        return _with_sigterm(lambda: docqa_bench.run(args, command, _run_meta(args, command)))
    modes = bench_modes(args)
    retentions = [float(x) for x in args.retention.split(",")]
    options = bench_options(args)
    previous: dict[str, Any] | None = None
    if args.out and args.append and args.out.with_suffix(".json").exists():
        previous = json.loads(args.out.with_suffix(".json").read_text())
    meta = _run_meta(args, command)
    if previous is not None:
        meta["command"] = previous["meta"]["command"] + " ; " + command
    results: dict[str, Any] = {
        "meta": {**meta, "workload": describe_workload(args), "modes": modes},
        "runs": [] if previous is None else list(previous["runs"]),
    }
    runs: list[dict[str, Any]] = []

    def done(result: dict[str, Any]) -> None:
        runs.append(result)
        results["runs"].append(result)
        print(_line(result), flush=True)
        if args.out:
            json_path = args.out.with_suffix(".json")
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(results, indent=1))
            plot(results, args.out.with_suffix(".png"))

    def body() -> int:
        for mode in modes:
            (_colocated_runs if mode == "colocated" else _disaggregated_runs)(args, options, retentions, done)
        return 0

    _with_sigterm(body)
    if args.out:
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    failed = sum(r["failed"] for r in runs)
    if failed:
        print(f"{failed} requests failed (see 'errors' in the JSON)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/serving.py") -> int:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_flags(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    return run(args, " ".join([prog, *(shlex.quote(a) for a in argv)]))
