"""retention="auto" through the engine's own paths, on the samples of a quality run (the test split).

For each sample of a `benchmarks/quality.py` run (its token ids from `--tokens-out`), three requests
through `LLM.generate`, greedy:
  full     the whole prompt, uncompressed (the reference, recomputed here on this device);
  whole    the whole prompt with retention="auto" and the question (and everything after the
           document) protected, as the quality run's "whole" setting;
  context  the document as a cached context (`context=`, `cache_context=True`, retention="auto"),
           the question prefilled over its compressed pages: the context cache's serving path.
Each cell records its score, the retention auto chose and the context's measured NLL; the summary is
quality_stats's (means over families with 95% bootstrap CIs, share of the full cache). Cells are keyed
`<setting>|auto@<quality target>`.

    python benchmarks/quality_auto.py --results docs/benchmarks/quality_test_h100.json \
        --tokens docs/benchmarks/quality_test_h100_tokens.jsonl --out docs/benchmarks/quality_auto_cpu.json

Run as a script (not -P: it imports its sibling modules).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
from quality_stats import summarize  # noqa: E402
from quality_tasks import score  # noqa: E402
from tqdm import tqdm

from kvferry.engine import LLM, CompressionParams  # noqa: E402
from kvferry.engine.sampling_params import SamplingParams  # noqa: E402


def run_sample(llm: LLM, sample: dict[str, Any], ids: list[int], target: float, settings: list[str]) -> dict:
    n, n_ctx = len(ids), sample["context_tokens"]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=sample["max_new_tokens"])
    auto = {"retention": "auto", "quality_target": target}
    full = llm.generate([ids], greedy)[0]
    out: dict[str, Any] = {
        **{k: sample[k] for k in ("family", "target_tokens", "seed", "split", "depth_bucket", "answers")},
        "prompt_tokens": n,
        "context_tokens": n_ctx,
        "full": {"score": score(sample["answers"], full.text), "text": full.text},
        "cells": {},
    }
    requests = {
        "whole": lambda: llm.generate(
            [ids], greedy, compression=CompressionParams(**auto, protected_spans=[sample["question_tokens"], (n_ctx, n)])
        )[0],
        "context": lambda: llm.generate(
            [ids[n_ctx:]], greedy, compression=CompressionParams(**auto), context=[ids[:n_ctx]],
            cache_context=True,
        )[0],
    }  # fmt: skip
    for setting in settings:
        t0 = time.perf_counter()
        got = requests[setting]()
        s = got.stats
        out["cells"][f"{setting}|auto@{target}"] = {
            "score": score(sample["answers"], got.text),
            "text": got.text,
            "kept": s.chosen_retention,
            "context_nll": s.context_nll,
            "context_cache": s.context_cache,
            "first_token_agrees": bool(got.token_ids[:1] == full.token_ids[:1]),
            "seconds": time.perf_counter() - t0,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="a quality.py JSON (its samples are run)")
    ap.add_argument("--tokens", type=Path, required=True, help="its --tokens-out JSONL")
    ap.add_argument("--target", type=float, default=0.95, help="quality_target")
    ap.add_argument("--settings", nargs="+", default=["whole", "context"], choices=["whole", "context"])
    ap.add_argument("--model", help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", nargs="+", type=int, help="only the samples of these target lengths")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    results = json.loads(args.results.read_text())
    tokens = {}
    for line in args.tokens.read_text().splitlines():
        t = json.loads(line)
        tokens[(t["family"], t["target_tokens"], t["seed"])] = t
    samples = [s for s in results["samples"] if not args.lengths or s["target_tokens"] in args.lengths]
    samples = samples[: args.limit or None]
    llm = LLM(args.model, device=args.device, dtype="float32")
    partial = args.out.with_suffix(".partial.jsonl")
    done = [json.loads(x) for x in partial.read_text().splitlines()] if partial.exists() else []
    seen = {(d["family"], d["target_tokens"], d["seed"]) for d in done}
    bar = tqdm(samples, desc="auto", unit="sample")
    with partial.open("a") as log:
        for sample in bar:
            key = (sample["family"], sample["target_tokens"], sample["seed"])
            if key in seen:
                continue
            t = tokens[key]
            row = run_sample(llm, {**sample, "max_new_tokens": t["max_new_tokens"]}, t["ids"], args.target,
                             args.settings)  # fmt: skip
            done.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(family=key[0], n=len(t["ids"]))
    report = {
        "environment": {
            "device": args.device,
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
        },  # fmt: skip
        "settings": {
            "results": str(args.results),
            "target": args.target,
            "settings": args.settings,
            "defaults": CompressionParams().__dict__,
        },  # fmt: skip
        "samples": done,
        "summary": summarize(done),
    }
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    for key, cell in report["summary"]["cells"].items():
        kept = [s["cells"][key]["kept"] for s in done if key in s["cells"]]
        print(
            f"{key}: accuracy {cell['mean']:.3f} {cell['ci']}, share of full {cell['share_of_full']['mean']:.3f} "
            f"{cell['share_of_full']['ci']}, kept mean {sum(kept) / len(kept):.2f} (min {min(kept):.2f}, "
            f"max {max(kept):.2f}); full {report['summary']['full']['mean']:.3f}"
        )


if __name__ == "__main__":
    main()
