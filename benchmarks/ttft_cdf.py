"""TTFT distributions of `kvferry bench` runs side by side: one CDF per JSON (its first run), for
comparing settings that change who waits (the prefill order, admission) more than the mean.

    python3 benchmarks/ttft_cdf.py A.json B.json ... --labels a b ... --out docs/benchmarks/NAME.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="bench JSONs (per_request TTFTs of their first run)")
    p.add_argument("--labels", nargs="+", help="one per JSON (default: file names)")
    p.add_argument("--title", default="TTFT per request")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    labels = args.labels or [r.stem for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("--labels: one per JSON")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path, label in zip(args.runs, labels):
        run = json.loads(path.read_text())["runs"][0]
        ttfts = sorted(r["ttft_s"] for r in run["per_request"])
        n = len(ttfts)
        t = run["ttft_s"]
        ax.step(ttfts, [(i + 1) / n for i in range(n)], where="post",
                label=f"{label}: mean {t['mean']:.1f} s, p50 {t['p50']:.1f} s, {run['request_throughput_req_s']:.3f} req/s")  # fmt: skip
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("share of requests")
    ax.set_title(args.title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
