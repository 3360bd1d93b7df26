"""Per-length cold costs: how long each new document length's first prefill takes in a fresh engine
after the prefill service's own warm-up, and which Triton kernels it compiled.

A serving node sees a new prompt length with every new document; anything compiled or planned per
length (a Triton constexpr that follows the prompt, an autotuner key, a cuDNN plan) is paid by a
user's request. The probe prefills lengths in three passes: `warm` (r = 1 over lengths A, to take the
model's own per-shape costs first), `compressed` (r = 0.5 over the same lengths A: what compression
adds on a new length) and `new` (r = 0.5 over lengths B never seen). A pass whose first requests are
slower than its last ones pays something per length; the Triton cache folder says which kernels
compiled (one entry per compiled variant).

    python3 benchmarks/cold_lengths.py --out docs/benchmarks          # H100, 8B shape (random weights)
    python3 benchmarks/cold_lengths.py --plot docs/benchmarks/cold_lengths.json   # redraw its PNG
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG_8B = Path(__file__).resolve().parent / "configs" / "llama-3.1-8b"
LENGTHS_A = [29044, 21461, 23126, 21130, 24923, 28403]
LENGTHS_B = [25757, 23008, 28391, 22987, 17003, 31017]


def compiled_kernels(cache_dir: Path) -> set[str]:
    """The Triton cache's compiled variants: one folder per variant, named by its kernel's JSON."""
    out = set()
    for meta in cache_dir.glob("*/*.json"):
        if not meta.name.startswith("__grp__"):
            out.add(f"{meta.parent.name[:10]}:{meta.stem}")
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Each request's time in run order, misses and hits, the ones that compiled a kernel marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(rows))
    for kind, color in (("miss", "tab:blue"), ("hit", "tab:green")):
        ax.bar([i + (0.2 if kind == "hit" else -0.2) for i in x], [r[f"{kind}_s"] for r in rows], 0.4,
               color=color, label=kind)  # fmt: skip
        for i, r in enumerate(rows):
            if r[f"{kind}_compiled"]:
                ax.annotate(f"{len(r[f'{kind}_compiled'])} compiled", (i, r[f"{kind}_s"]), ha="center",
                            va="bottom", fontsize=7, color="tab:red")  # fmt: skip
    ax.set_xticks(list(x), [f"{r['pass_'][:4]}\n{r['tokens']}" for r in rows], fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_xlabel(
        "pass (warm: r = 1, comp(ressed) and new: r = 0.5) and document tokens, in run order", fontsize=8
    )
    ax.set_title(
        f"first request per document length after warm-up: {report['device']}, {report['date']}", fontsize=9
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(CONFIG_8B), help="a config folder, GGUF or checkpoint")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--kv-cache-gib", type=float, default=30.0)
    p.add_argument("--question-tokens", type=int, default=48)
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the lengths (a CPU smoke run: 0.1)")
    p.add_argument("--out", type=Path)
    p.add_argument("--name", default="cold_lengths", help="output name under --out")
    p.add_argument("--plot", type=Path, help="redraw the PNG of this JSON and exit")
    args = p.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    cache_dir = Path(os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cold-")))

    import torch

    from kvferry.engine import EngineConfig, LLMEngine
    from kvferry.engine.sampling_params import SamplingParams
    from kvferry.prefill_service.prefill_engine import _warm_up

    engine = LLMEngine(
        EngineConfig(
            model=args.model, load_format=args.load_format, device=args.device,
            max_model_len=int(33024 * args.scale) if args.scale < 1 else 33024,
            kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        )
    )  # fmt: skip
    t = time.perf_counter()
    gpu = engine.device.type == "cuda"

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    _warm_up(engine)
    sync()
    warm_up_s = time.perf_counter() - t
    print(
        f"service warm-up {warm_up_s:.1f} s, {len(compiled_kernels(cache_dir))} Triton variants", flush=True
    )
    vocab = int(engine.loaded.config.vocab_size)
    scaled = lambda lengths: [int(n * args.scale) for n in lengths]  # noqa: E731
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for name, lengths, retention in (
        ("warm", scaled(LENGTHS_A), 1.0),
        ("compressed", scaled(LENGTHS_A), 0.5),
        ("new", scaled(LENGTHS_B), 0.5),
    ):
        for n in lengths:
            context = [rng.randrange(1, vocab) for _ in range(n)]
            compression = None if retention == 1 else {"method": "compactor", "retention": retention}
            row: dict[str, Any] = dict(pass_=name, tokens=n, retention=retention)
            for kind in ("miss", "hit"):  # the context prefilled and cached, then a question on it
                question = [rng.randrange(1, vocab) for _ in range(args.question_tokens)]
                before = compiled_kernels(cache_dir)
                sync()
                t = time.perf_counter()
                seq = engine.add_request(
                    context + question, SamplingParams(temperature=0, max_new_tokens=1), compression,
                    context_len=n, cache_context=True,
                )  # fmt: skip
                while not seq.is_finished:
                    engine.step()
                sync()
                row[f"{kind}_s"] = time.perf_counter() - t
                row[f"{kind}_compiled"] = sorted(compiled_kernels(cache_dir) - before)
                assert seq.stats.context_cache == kind, seq.stats.context_cache
            rows.append(row)
            print(f"{name:10s} {n:6d} tokens r={retention}: miss {row['miss_s']:.3f} s, hit {row['hit_s']:.3f} s; "
                  f"compiled {row['miss_compiled']} / {row['hit_compiled']}", flush=True)  # fmt: skip
            engine.context_cache.clear()
    engine.pool.assert_no_leaks()
    report = dict(
        command="python3 " + " ".join(sys.argv), device=torch.cuda.get_device_name() if gpu else "cpu",
        date=datetime.date.today().isoformat(), torch=torch.__version__, model=Path(args.model).name,
        service_warm_up_s=warm_up_s, rows=rows,
    )  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{args.name}.json"
        path.write_text(json.dumps(report, indent=1))
        plot(report, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
