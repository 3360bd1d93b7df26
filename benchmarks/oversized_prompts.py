"""Memory after refused requests: each service's RSS while oversized prompts are refused.

Starts a coordinator, a prefill and a decode process (the bundled SmolLM2 on CPU, as `kvferry up` does)
and sends prompts of `--prompt-mib` MiB of text, plain and chat in turn, each refused with
INVALID_ARGUMENT before it is tokenized (its bytes exceed what max_model_len tokens can hold). After
each refusal (and a short pause, so the service's post-call heap trim has run) it reads every
service's RSS. Growth is measured from the RSS after the first `--warm-up` refusals (gRPC and the
allocator size their buffers on the first big messages) to the last.

    python benchmarks/oversized_prompts.py --prompts 100 --out docs/benchmarks/oversized_prompts

Writes NAME.json and NAME.png; `tests/test_bounded_requests.py` runs a short version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from kvferry.clients import Client, KvferryRpcError
from kvferry.clients.local_cluster import LocalCluster

SERVICES = ("coordinator", "prefill", "decode")


def rss_mib(cluster: LocalCluster) -> dict[str, float]:
    return {node: psutil.Process(cluster.processes[node].pid).memory_info().rss / 2**20 for node in SERVICES}


def refuse_oversized(
    cluster: LocalCluster, prompts: int, prompt_bytes: int, warm_up: int = 5, pause: float = 0.5
) -> dict[str, Any]:
    """Send `prompts` oversized prompts to a ready cluster; per refusal its status, seconds and every
    service's RSS (MiB), and each service's growth after the warm-up refusals (a fraction)."""
    text = ("lorem ipsum dolor " * (prompt_bytes // 18 + 1))[:prompt_bytes]
    samples: list[dict[str, Any]] = [{"refused": 0, "seconds": 0.0, "code": "-", "rss_mib": rss_mib(cluster)}]
    with Client(cluster.coordinator_address, timeout=120) as client:
        for i in range(prompts):
            start = time.perf_counter()
            try:
                if i % 2:
                    client.generate(messages=[{"role": "user", "content": text}], max_new_tokens=2)
                else:
                    client.generate(text, max_new_tokens=2)
                code = "OK"
            except KvferryRpcError as e:
                code = e.code.name
            seconds = time.perf_counter() - start
            time.sleep(pause)
            samples.append({"refused": i + 1, "seconds": seconds, "code": code, "rss_mib": rss_mib(cluster)})
    warm = samples[min(warm_up, prompts)]["rss_mib"]
    last = samples[-1]["rss_mib"]
    return {
        "prompts": prompts,
        "prompt_bytes": prompt_bytes,
        "warm_up": warm_up,
        "codes": sorted({s["code"] for s in samples[1:]}),
        "max_seconds": max(s["seconds"] for s in samples[1:]),
        "growth_after_warm_up": {node: last[node] / warm[node] - 1 for node in SERVICES},
        "samples": samples,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [s["refused"] for s in result["samples"]]
    for node in SERVICES:
        ax.plot(xs, [s["rss_mib"][node] for s in result["samples"]], label=node)
    ax.axvline(result["warm_up"], color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel(f"oversized prompts refused ({result['prompt_bytes'] / 2**20:.0f} MiB each)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Service memory while oversized prompts are refused")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--prompt-mib", type=float, default=10.0)
    p.add_argument("--warm-up", type=int, default=5)
    p.add_argument("--model", help="HF folder or .gguf (default: the bundled SmolLM2)")
    p.add_argument("--kv-cache-bytes", type=int, default=64 << 20)
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.png")
    args = p.parse_args(argv)
    engine = ["--device", "cpu", "--kv-cache-bytes", str(args.kv_cache_bytes), "--torch-threads", "1"]
    if args.model:
        engine += ["--model", args.model]
    with tempfile.TemporaryDirectory(prefix="kvferry-oversized-") as logs:
        cluster = LocalCluster(engine_args=engine, log_dir=Path(logs))
        with cluster:
            cluster.wait_ready(600)
            result = refuse_oversized(cluster, args.prompts, int(args.prompt_mib * 2**20), args.warm_up)
    result["command"] = "python benchmarks/oversized_prompts.py " + shlex.join(argv or sys.argv[1:])
    result["date"] = datetime.date.today().isoformat()
    result["machine"] = f"{platform.machine()}, {psutil.cpu_count()} CPUs (shared), {platform.platform()}"
    growth = ", ".join(f"{n} {100 * g:+.1f}%" for n, g in result["growth_after_warm_up"].items())
    print(f"{args.prompts} prompts refused ({result['codes']}), slowest {result['max_seconds']:.2f} s; "
          f"RSS growth after warm-up: {growth}")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
