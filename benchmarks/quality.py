"""Quality benchmark: task accuracy vs retention for every compression method, on SmolLM2.

One prefill per sample is shared by every (method, retention) cell: all scorers observe the same
chunked prefill, then each cell packs its own kept tokens into fresh pages (the same
select-and-pack the engine runs after prefill) and the cells decode greedily, batched by
retention. The first token comes from the full-cache prefill in every cell, exactly as in the engine.
The question and the answer prefix (everything after the document) are protected for every method,
as a caller would protect them; sink 4 and recent 32 are the defaults.

    python benchmarks/quality.py                       # the full run (~35 min on 1 core of a 2-core CPU)
    python benchmarks/quality.py --samples 1 --lengths 1024 --tasks single_needle   # smoke run
    python benchmarks/quality.py --plot-only docs/benchmarks/quality.json           # redraw the PNG
    python benchmarks/quality.py --plot-only docs/benchmarks/quality.json \
        --merge-kvpress docs/benchmarks/quality_kvpress.json    # add kvpress's run (quality_kvpress.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from quality_plot import markdown_table, plot, task_table  # noqa: E402
from quality_tasks import TASKS, Sample, make_sample, score  # noqa: E402
from tqdm import tqdm

from kvferry.engine import LLM, CompressionParams, SamplingParams  # noqa: E402
from kvferry.engine.compression import PromptShape, Scorer, make_scorer, pack_kept, select_tokens  # noqa: E402
from kvferry.engine.forward_batch import DecodeBatch  # noqa: E402
from kvferry.engine.llm_engine import LLMEngine  # noqa: E402
from kvferry.engine.page_table import SequenceKV  # noqa: E402
from kvferry.engine.sequence import Sequence, SequenceStatus  # noqa: E402
from kvferry.engine.tokenizer import encode_chat  # noqa: E402

KVPRESS_NOT_MERGED = (
    "kvpress needs transformers<5.3, so it runs in its own venv: benchmarks/quality_kvpress.py, then "
    "`quality.py --plot-only <json> --merge-kvpress <kvpress json>` merges it here"
)


class FanOut:
    """The prefill observer of the benchmark: every scorer sees every chunk; time is kept per scorer."""

    def __init__(self, scorers: dict[str, Scorer]) -> None:
        self.scorers = scorers
        self.seconds = dict.fromkeys(scorers, 0.0)

    def observe(self, layer: int, q: torch.Tensor, k_pre: torch.Tensor, k: torch.Tensor, start: int) -> None:
        for name, scorer in self.scorers.items():
            t0 = time.perf_counter()
            scorer.observe(layer, q, k_pre, k, start)
            self.seconds[name] += time.perf_counter() - t0


def parse_spec(spec: str) -> tuple[str, str]:
    """'compactor' or 'compactor:adaptive' -> (method, budget)."""
    method, _, budget = spec.partition(":")
    return method, budget or "uniform"


def question_start(tokenizer: Any, sample: Sample, ids: list[int]) -> int:
    """Token index where the question begins: the protected tail starts there."""
    user = sample.messages[0]["content"]
    head = user[: user.rindex("Question:")]
    head_ids = encode_chat(tokenizer, [{"role": "user", "content": head}, sample.messages[1]])
    common = 0
    while common < min(len(ids), len(head_ids)) and ids[common] == head_ids[common]:
        common += 1
    return common - 2  # back off the boundary token(s) the two encodings may merge differently


def new_decode_seq(engine: LLMEngine, ids: list[int], first: int, sampling: SamplingParams) -> Sequence:
    seq = engine.make_sequence(ids, sampling)
    seq.kv = SequenceKV(engine.pool, engine.num_layers, engine.num_kv_heads, seq.cache_tokens_needed() + 1)
    seq.num_prefilled = len(ids)
    seq.output_token_ids = [first]
    seq.status = SequenceStatus.DECODE
    return seq


class GroupedDecode:
    """One model forward over several decode groups; attention runs group by group, so a group of
    10%-retention cells does not pad its heads to the full-cache cell's length."""

    def __init__(self, groups: list[list[Sequence]]) -> None:
        self.batches = [DecodeBatch([s.kv for s in g], [s.num_tokens - 1 for s in g]) for g in groups]  # type: ignore[misc]
        self.sizes = [len(g) for g in groups]
        self.positions = torch.cat([b.positions for b in self.batches])

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor, scale: float
    ) -> torch.Tensor:
        outs, at = [], 0
        for batch, size in zip(self.batches, self.sizes):
            part = slice(at, at + size)
            outs.append(batch.attend(layer, q[part], k[part], v[part], k_pre[part], scale))
            at += size
        return torch.cat(outs)

    def finish(self) -> None:
        for batch in self.batches:
            batch.finish()


@torch.inference_mode()
def decode_greedy(engine: LLMEngine, groups: list[list[Sequence]], sample: Sample) -> None:
    """Greedy tokens until max_new_tokens, eos, or every expected answer is in the text (the score
    can no longer change, so stopping there gives the same score as decoding on)."""

    def settled(s: Sequence) -> bool:
        return (
            s.output_token_ids[-1] in engine.eos_ids
            or score(sample, engine.decode_text(s.output_token_ids)) == 1
        )

    for _ in range(sample.max_new_tokens - 1):
        groups = [[s for s in g if not settled(s)] for g in groups]
        groups = [g for g in groups if g]
        if not groups:
            return
        for s in (s for g in groups for s in g):
            assert s.kv is not None
            s.kv.grow(1)
        seqs = [s for g in groups for s in g]
        batch = GroupedDecode(groups)
        ids = torch.tensor([s.last_token for s in seqs])
        hidden = engine.model(ids, batch.positions, batch)
        batch.finish()
        for s, t in zip(seqs, engine.model.logits(hidden).argmax(dim=-1).tolist()):
            s.output_token_ids.append(t)


def run_sample(
    engine: LLMEngine, sample: Sample, specs: list[str], retentions: list[float], knobs: dict[str, Any]
) -> dict[str, Any]:
    tok = engine.tokenizer
    ids = encode_chat(tok, sample.messages)
    n = len(ids)
    tail = (question_start(tok, sample, ids), n)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=sample.max_new_tokens)
    base = engine.make_sequence(ids, sampling)
    base.kv = SequenceKV(engine.pool, engine.num_layers, engine.num_kv_heads, base.cache_tokens_needed() + 1)
    shape = PromptShape(engine.num_layers, engine.num_kv_heads, n)
    methods = sorted({parse_spec(s)[0] for s in specs})
    fan = FanOut({m: make_scorer(CompressionParams(method=m, **knobs), shape, base.kv) for m in methods})

    t0 = time.perf_counter()
    logits = None
    while base.num_prefilled < n:
        logits = engine.runner.prefill(base, min(engine.scheduler.prefill_chunk, n - base.num_prefilled), fan)
    assert logits is not None
    prefill_total = time.perf_counter() - t0
    first = int(logits.argmax())
    prefill_only = prefill_total - sum(fan.seconds.values())  # the model's own work
    scores = {}
    for m in methods:
        t1 = time.perf_counter()
        with torch.inference_mode():
            scores[m] = fan.scorers[m].scores()
        fan.seconds[m] += time.perf_counter() - t1

    cells: dict[tuple[str, float], Sequence] = {}
    kept_frac: dict[tuple[str, float], float] = {}
    select_seconds: dict[str, float] = defaultdict(float)
    for spec in specs:
        method, budget = parse_spec(spec)
        for r in retentions:
            if r >= 1.0:
                continue
            t1 = time.perf_counter()
            params = CompressionParams(
                method=method, retention=r, budget=budget, protected_spans=[tail], **knobs
            )
            kept, lens = select_tokens(scores[method], params)
            select_seconds[spec] += time.perf_counter() - t1
            seq = new_decode_seq(engine, ids, first, sampling)
            assert seq.kv is not None and base.kv is not None
            seq.kv.grow_to(lens)
            pack_kept(engine.pool.kv, base.kv.page_table, kept, lens, seq.kv.page_table)
            cells[(spec, r)] = seq
            kept_frac[(spec, r)] = int(lens.sum()) / (n * engine.num_layers * engine.num_kv_heads)
    base.output_token_ids = [first]
    base.status = SequenceStatus.DECODE
    groups: dict[float, list[Sequence]] = defaultdict(list)
    for (_, r), seq in cells.items():
        groups[r].append(seq)
    groups[1.0].append(base)
    t2 = time.perf_counter()
    decode_greedy(engine, list(groups.values()), sample)
    decode_seconds = time.perf_counter() - t2

    full_text = engine.decode_text(base.output_token_ids)
    result: dict[str, Any] = {
        "task": sample.task,
        "target_tokens": sample.target_tokens,
        "prompt_tokens": n,
        "protected_tail_tokens": n - tail[0],
        "answers": sample.answers,
        "full": {"score": score(sample, full_text), "text": full_text},
        "cells": {},
        "prefill_seconds": prefill_only,
        "decode_seconds": decode_seconds,
        "scoring_seconds": {
            spec: fan.seconds[parse_spec(spec)[0]] + select_seconds[spec] / max(1, len(retentions) - 1)
            for spec in specs
        },
    }
    for (spec, r), seq in cells.items():
        text = engine.decode_text(seq.output_token_ids)
        result["cells"][f"{spec}@{r}"] = {
            "score": score(sample, text),
            "text": text,
            "kept": kept_frac[(spec, r)],
        }
        assert seq.kv is not None
        seq.kv.free()
    assert base.kv is not None
    base.kv.free()
    engine.pool.assert_no_leaks()
    return result


def summarize(samples: list[dict[str, Any]], specs: list[str], retentions: list[float]) -> dict[str, Any]:
    """Mean accuracy per (spec, retention) per task and length, averaged over tasks, and vs full."""
    by: dict[tuple[str, int, str, float], list[float]] = defaultdict(list)
    kept: dict[tuple[str, float], list[float]] = defaultdict(list)
    for s in samples:
        for spec in specs:
            for r in retentions:
                cell = s["full"] if r >= 1.0 else s["cells"][f"{spec}@{r}"]
                by[(s["task"], s["target_tokens"], spec, r)].append(cell["score"])
                kept[(spec, r)].append(1.0 if r >= 1.0 else cell["kept"])
    tasks = sorted({s["task"] for s in samples})
    lengths = sorted({s["target_tokens"] for s in samples})
    table: dict[str, Any] = {}
    for spec in specs:
        table[spec] = {}
        for r in retentions:
            per = {
                f"{t}@{length}": sum(v) / len(v)
                for (t, length, sp, rr), v in by.items()
                if sp == spec and rr == r
            }
            for length in lengths:
                ts = [per[f"{t}@{length}"] for t in tasks if f"{t}@{length}" in per]
                per[f"mean@{length}"] = sum(ts) / len(ts)
            ts = [per[f"mean@{length}"] for length in lengths]
            per["mean"] = sum(ts) / len(ts)
            per["kept_fraction"] = sum(kept[(spec, r)]) / len(kept[(spec, r)])
            table[spec][str(r)] = per
    full_mean = table[specs[0]]["1.0"]["mean"] if 1.0 in retentions else None
    for spec in specs:
        for r in retentions:
            cell = table[spec][str(r)]
            cell["share_of_full"] = cell["mean"] / full_mean if full_mean else None
    return {"tasks": tasks, "lengths": lengths, "table": table}


def merge_kvpress(report: dict[str, Any], kv: dict[str, Any]) -> None:
    """Add kvpress's run (benchmarks/quality_kvpress.py) to the report, with kvferry's numbers on the
    same subset of samples beside it."""
    retentions = report["settings"]["retentions"]
    presses = list(kv["settings"]["presses"])
    ids = {(s["task"], s["target_tokens"], s["seed"]) for s in kv["samples"]}
    same = [s for s in report["samples"] if (s["task"], s["target_tokens"], s["seed"]) in ids]
    prefill = sum(s["prefill_seconds"] for s in kv["samples"])
    compressed = [r for r in retentions if r < 1.0]
    share = {
        p: sum(
            sum(s["scoring_seconds"][f"{p}@{r}"] for r in compressed) / len(compressed) for s in kv["samples"]
        )
        / prefill
        for p in presses
    }
    report["kvpress"] = {
        "status": "ran",
        "environment": kv["environment"],
        "settings": kv["settings"],
        "samples_per_task_and_length": len({s["seed"] for s in kv["samples"]}),
        "summary": {**summarize(kv["samples"], presses, retentions), "scoring_share_of_prefill": share},
        "kvferry_same_samples": summarize(same, report["settings"]["methods"], retentions),
        "prompt_tokens_differ": sum(
            1
            for s in same
            for k in kv["samples"]
            if (k["task"], k["target_tokens"], k["seed"]) == (s["task"], s["target_tokens"], s["seed"])
            and k["prompt_tokens"] != s["prompt_tokens"]
        ),
        "samples": kv["samples"],
    }


def print_tables(report: dict[str, Any]) -> None:
    retentions = report["settings"]["retentions"]
    summary = report["summary"]
    print(markdown_table(summary, retentions))
    print()
    print(markdown_table(summary, retentions, "share_of_full"))
    print()
    for spec in summary["table"]:
        print(task_table(summary, spec, retentions))
        print()
    if "summary" in report.get("kvpress", {}):
        print(markdown_table(report["kvpress"]["summary"], retentions))
        print()
        print(markdown_table(report["kvpress"]["kvferry_same_samples"], retentions))
        print()
        for spec in report["kvpress"]["summary"]["table"]:
            print(task_table(report["kvpress"]["summary"], spec, retentions))
            print()


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor()
    )
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"cpu: {cpu} ({torch.get_num_threads()} torch threads)",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="HF folder or GGUF; default: the bundled SmolLM2-135M-Instruct"
    )
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096], help="prompt tokens (approx.)")
    ap.add_argument("--samples", type=int, default=4, help="samples per (task, length)")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=[
            "compactor",
            "compactor:adaptive",
            "snapkv",
            "kvcompress",
            "streaming",
            "random",
        ],
        help="method[:budget] (budget: uniform, adaptive, global)",
    )
    ap.add_argument("--retentions", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25, 0.1])
    ap.add_argument("--seed", type=int, default=0, help="first sample seed")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)"
    )
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/quality.json"))
    ap.add_argument("--plot-only", type=Path, default=None, help="redraw the PNG of an existing JSON")
    ap.add_argument("--merge-kvpress", type=Path, default=None, help="with --plot-only: add kvpress's JSON")
    ap.add_argument(
        "--date", default=None, help="with --plot-only: the date shown (the JSON keeps the clock's)"
    )
    args = ap.parse_args()
    if args.plot_only:
        report = json.loads(args.plot_only.read_text())
        if args.merge_kvpress:
            merge_kvpress(report, json.loads(args.merge_kvpress.read_text()))
        if args.date:
            report["environment"]["date_label"] = args.date
        if args.merge_kvpress or args.date:
            args.plot_only.write_text(json.dumps(report, indent=1))
        plot(report, args.plot_only.with_suffix(".png"))
        print_tables(report)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    knobs: dict[str, Any] = {}
    retentions = sorted(set(args.retentions), reverse=True)
    llm = LLM(
        args.model, device="cpu", dtype="float32", prefill_chunk=args.prefill_chunk, kv_cache_bytes=4 << 30
    )
    engine = llm.engine
    count = lambda text: len(engine.tokenizer(text).input_ids)  # noqa: E731
    jobs = [
        (t, length, args.seed + i) for length in args.lengths for i in range(args.samples) for t in args.tasks
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Each finished sample is appended here, so an interrupted run resumes where it stopped.
    partial = args.out.with_suffix(".partial.jsonl")
    samples: list[dict[str, Any]] = []
    if partial.exists():
        samples = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    done = {(s["task"], s["target_tokens"], s["seed"]) for s in samples}
    bar = tqdm(jobs, desc="quality", unit="sample")
    started = time.perf_counter()
    for task, length, seed in bar:
        if (task, length, seed) in done:
            continue
        result = run_sample(engine, make_sample(task, length, seed, count), args.methods, retentions, knobs)
        result["seed"] = seed
        samples.append(result)
        with partial.open("a") as f:
            f.write(json.dumps(result) + "\n")
        bar.set_postfix(task=task, n=result["prompt_tokens"], full=result["full"]["score"])
    samples = [s for s in samples if (s["task"], s["target_tokens"], s["seed"]) in set(jobs)]
    summary = summarize(samples, args.methods, retentions)
    prefill = sum(s["prefill_seconds"] for s in samples)
    summary["scoring_share_of_prefill"] = {
        spec: sum(s["scoring_seconds"][spec] for s in samples) / prefill for spec in args.methods
    }
    report = {
        "environment": environment(args),
        "model": engine.loaded.source,
        "settings": {
            "samples_per_task_and_length": args.samples,
            "methods": args.methods,
            "retentions": retentions,
            "defaults": {
                k: v for k, v in vars(CompressionParams()).items() if k not in ("method", "retention")
            },
            "protected": "sink 4 + recent 32 + the question and answer prefix (after the document)",
            "prefill_chunk": args.prefill_chunk,
            "wall_seconds": time.perf_counter() - started,
        },
        "kvpress": {"status": "not merged", "how": KVPRESS_NOT_MERGED},
        "summary": summary,
        "samples": samples,
    }
    args.out.write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps({k: summary[k] for k in ("scoring_share_of_prefill",)}, indent=1))
    for spec in args.methods:
        row = " ".join(f"{summary['table'][spec][str(r)]['mean']:.3f}" for r in retentions)
        print(f"{spec:22s} {row}")


if __name__ == "__main__":
    main()
