"""The handoff through the real services: prefill finished -> decode ready, per transport.

Starts a decode, a prefill and a coordinator process for each transport (`kvferry up` with these
options), sends long random-token prompts one at a time with compactor compression, and reads each
request's stats: `handoff_seconds` (the prefill node's gathered pages -> payload and manifest ->
ReserveKV -> transfer -> the decode node's verified commit), `transfer_seconds` (ReserveKV -> commit),
bytes shipped, and the decode node's view. The first request of each transport warms the link up
(ExportKV and mapping, or the NCCL pair) and is not counted.

    python -m benchmarks.handoff --model benchmarks/configs/llama-3.1-8b --context 32768 \\
        --retention 0.5 --transports grpc,cuda_ipc --out docs/benchmarks          # one GPU
    python -m benchmarks.handoff ... --decode-device cuda:1 --transports cuda_ipc,nccl --tag 2gpu

Writes handoff[_TAG].json and .png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvferry.clients import Client
from kvferry.clients.local_cluster import LocalCluster


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """One cluster for `variant`: a transport name, then options after `:` joined by `+`: `noverify`
    for a decode node that skips the sum64 check of direct writes (what the check costs), `late` for a
    prefill node that reserves after prefill instead of when the last chunk starts."""
    transport, _, option = variant.partition(":")
    options = set(option.split("+")) - {""}
    if options - {"noverify", "late"}:
        raise SystemExit(f"--transports: unknown option in {variant!r} (noverify, late)")
    verify = ["--no-verify-direct-writes"] if "noverify" in options else []
    late = ["--no-early-reserve"] if "late" in options else []
    engine = [
        "--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype,
        "--page-size", str(args.page_size), "--prefill-chunk", str(args.prefill_chunk),
        "--max-model-len", str(args.context + 64),  # buffers sized for the model's 128K would not fit twice
    ]  # fmt: skip
    logs = (
        Path(args.log_dir) / variant.replace(":", "-")
        if args.log_dir
        else Path(tempfile.mkdtemp(prefix=f"handoff-{transport}-"))
    )
    cluster = LocalCluster(
        engine,
        decode_args=[
            "--device",
            args.decode_device,
            "--kv-cache-bytes",
            str(int(args.decode_kv_gib * (1 << 30))),
            *verify,
        ],
        prefill_args=[
            "--device",
            args.prefill_device,
            "--transport",
            transport,
            "--kv-cache-bytes",
            str(int(args.prefill_kv_gib * (1 << 30))),
            *late,
        ],  # fmt: skip
        log_dir=logs,
        env={"NCCL_NVLS_ENABLE": "0"},
    )
    gen = torch.Generator().manual_seed(0)
    compression = None if args.retention >= 1.0 else {"method": args.method, "retention": args.retention}
    rows = []
    with cluster:
        cluster.wait_ready(timeout=900, progress=lambda line: print(f"  {line}", file=sys.stderr))
        with Client(cluster.coordinator_address, timeout=900) as client:
            for i in range(args.requests + 1):
                prompt = torch.randint(1, args.vocab, (args.context,), generator=gen).tolist()
                r = client.generate(
                    prompt, compression=compression, max_new_tokens=2, temperature=0, ignore_eos=True
                )
                p, d = r.stats.prefill, r.stats.decode
                row = {
                    "warm_up": i == 0,
                    "transport": p.transport,
                    "prefill_s": p.prefill_seconds,
                    "handoff_s": p.handoff_seconds,
                    "transfer_s": p.transfer_seconds,
                    "decode_transfer_s": d.transfer_seconds,
                    "bytes_shipped": p.kv_bytes_shipped,
                    "bytes_full": p.kv_bytes_full,
                    "manifest_bytes": p.manifest_bytes,
                    "retention": p.retention,
                }
                rows.append(row)
                print(
                    f"  {transport} #{i}{' (warm-up)' if i == 0 else ''}: handoff {1e3 * row['handoff_s']:.1f} ms, "
                    f"transfer {1e3 * row['transfer_s']:.1f} ms, {row['bytes_shipped'] / 1e9:.2f} GB over {row['transport']}",
                    file=sys.stderr,
                )
    counted = [r for r in rows if not r["warm_up"]]
    handoff = statistics.median(r["handoff_s"] for r in counted)
    transfer = statistics.median(r["transfer_s"] for r in counted)
    shipped = counted[0]["bytes_shipped"]
    return {
        "requested": variant,
        "transport": counted[0]["transport"]
        + (" (no sum64 check)" if verify else "")
        + (" (reserved after prefill)" if late else ""),
        "verify_direct_writes": not verify,
        "early_reserve": not late,
        "handoff_ms_median": 1e3 * handoff,
        "transfer_ms_median": 1e3 * transfer,
        "payload_gb": shipped / 1e9,
        "handoff_gb_per_s": shipped / handoff / 1e9,
        "rows": rows,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [r["transport"] for r in results]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = range(len(results))
    ax.bar(
        [i - 0.2 for i in x],
        [r["handoff_ms_median"] for r in results],
        0.4,
        label="handoff (prefill done → decode ready)",
    )
    ax.bar([i + 0.2 for i in x], [r["transfer_ms_median"] for r in results], 0.4, label="ReserveKV → commit")
    ax.set_xticks(list(x), names)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    for i, r in enumerate(results):
        each = [1e3 * row["handoff_s"] for row in r["rows"] if not row["warm_up"]]
        # Every measured request: the spread is the story, not the median.
        ax.scatter([i - 0.2] * len(each), each, s=14, color="black", zorder=3,
                   label="each request" if i == 0 else None)  # fmt: skip
        ax.annotate(f"median {r['handoff_ms_median']:.1f} ms\n{r['payload_gb']:.2f} GB", (i, max(each)), xytext=(0, 6),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.margins(y=0.25)
    ax.axhline(10, color="gray", ls="--", lw=0.8)
    ax.text(len(results) - 0.5, 10, "10 ms target", fontsize=8, va="bottom", ha="right", color="gray")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    c = report["config"]
    fig.suptitle(
        f"KV handoff through the services: {c['context']} tokens at retention {c['retention']} ({c['model_name']})\n"
        f"{report['device']}, prefill {c['prefill_device']} → decode {c['decode_device']}, {report['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="model folder (config.json is enough with --load-format dummy)"
    )
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--retention", type=float, default=0.5)
    p.add_argument("--method", default="compactor")
    p.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    p.add_argument(
        "--requests", type=int, default=3, help="measured requests per transport (plus one warm-up)"
    )
    p.add_argument(
        "--transports",
        default="grpc,cuda_ipc",
        help="comma-separated; NAME:noverify runs the decode node without its sum64 check of direct writes, "
        "NAME:late reserves after prefill (no early reservation), NAME:late+noverify both",
    )
    p.add_argument("--prefill-device", default="cuda:0")
    p.add_argument("--decode-device", default="cuda:0")
    p.add_argument("--prefill-kv-gib", type=float, default=8.0)
    p.add_argument("--decode-kv-gib", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument(
        "--log-dir", default=None, help="service logs go to LOG_DIR/<transport>/ (default: a temp folder)"
    )
    args = p.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {device}"
    report: dict[str, Any] = {
        "benchmark": "handoff",
        "device": device,
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.handoff " + shlex.join(sys.argv[1:]),
        "config": {**vars(args), "out": str(args.out), "model_name": Path(args.model).name},
        "results": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"handoff{'_' + args.tag if args.tag else ''}"
    for transport in args.transports.split(","):
        print(f"{transport}:", file=sys.stderr)
        report["results"].append(measure(args, transport))
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))  # partial results survive
    plot(report, stem.with_suffix(".png"))
    for r in report["results"]:
        print(f"{r['transport']:>9}: handoff {r['handoff_ms_median']:8.1f} ms  transfer {r['transfer_ms_median']:8.1f} ms  "
              f"{r['payload_gb']:.2f} GB  {r['handoff_gb_per_s']:.1f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
