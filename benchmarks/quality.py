"""Quality benchmark: task accuracy vs retention for compression variants, in two settings, on SmolLM2.

Settings (both from ONE prefill per sample, shared by every (variant, retention, setting) cell):
  whole    the whole prompt is compressed, with the question (and everything after the document)
           protected; the first answer token comes from the full-cache prefill, as in the engine.
  context  only the context (chat header, instruction, document) is compressed; the question, the
           end of the user turn, the assistant header and the answer prefix are then fed after
           compression, uncompressed (kvpress's setting, and the one a document cache needs). They
           are fed one token per decode step over the compressed cache: each head appends to its own
           tail, the same computation as a causal prefill of the question over the compressed context.
The prefill is cut at the end of the context, so the context's scorers see exactly its tokens while
the whole prompt's scorers see all of them. Each cell packs its kept tokens into fresh pages (the
engine's select-and-pack) and every cell of a sample decodes greedily in one batch per step.

Per sample it records each cell's answer and score, the kept share, whether the first answer token
decoded over the compressed cache equals the full cache's (the whole setting: the second answer
token, the first one that sees the compressed cache), and calibration signals: the model's mean
token negative log-likelihood on the context and the default compactor's score concentration.

    python benchmarks/quality.py --split tuning --per-cell 4            # the tuning sweep
    python benchmarks/quality.py --limit 2 --lengths 2048 --variants compactor snapkv   # smoke
    python benchmarks/quality.py --device cuda --dtype bfloat16 --kv-gib 40 ...        # on a GPU
    python benchmarks/quality.py --summarize docs/benchmarks/quality.json \\
        --merge-kvpress docs/benchmarks/quality_kvpress.json     # add kvpress, redo tables and plot
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from quality_plot import plot, print_tables  # noqa: E402
from quality_stats import merge_kvpress, paired_difference, parse_cell, summarize  # noqa: E402
from quality_tasks import FAMILIES, LENGTHS, SPLITS, Sample, make_sample, score, split_seeds  # noqa: E402
from quality_variants import DEFAULT_VARIANTS, parse_variant, scorer_key  # noqa: E402
from tqdm import tqdm

from kvferry.engine import LLM, CompressionParams  # noqa: E402
from kvferry.engine.compression import PromptShape, Scorer, make_scorer, pack_kept, select_tokens  # noqa: E402
from kvferry.engine.forward_batch import DecodeBatch  # noqa: E402
from kvferry.engine.llm_engine import LLMEngine  # noqa: E402
from kvferry.engine.page_table import SequenceKV  # noqa: E402
from kvferry.engine.sampling_params import SamplingParams  # noqa: E402
from kvferry.engine.tokenizer import encode_chat  # noqa: E402

SETTINGS = ("whole", "context")


@dataclass
class Prompt:
    """A sample's token ids and where its parts are."""

    sample: Sample
    ids: list[int]
    context_len: int  # ids[:context_len] is the context
    question: tuple[int, int]  # [start, end) token range of the question


def tokenize(tokenizer: Any, sample: Sample) -> Prompt:
    """The engine's token ids for the sample (encode_chat), with the context / question boundaries
    mapped from character offsets; a token straddling the context's end belongs to the context."""
    text = tokenizer.apply_chat_template(sample.messages, continue_final_message=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    assert ids == encode_chat(tokenizer, sample.messages), "the rendered template tokenizes differently"
    at = text.index(sample.messages[0]["content"])
    starts = [s for s, _ in enc.offset_mapping]
    ends = [e for _, e in enc.offset_mapping]

    def first_ending_after(char: int) -> int:
        return next(i for i, e in enumerate(ends) if e > char)

    context_len = first_ending_after(at + sample.context_end - 1) + 1
    q0 = first_ending_after(at + sample.question_span[0])
    q1 = next((i for i, s in enumerate(starts) if s >= at + sample.question_span[1]), len(ids))
    return Prompt(sample, ids, context_len, (q0, q1))


class FanOut:
    """The prefill observer: every scorer sees the chunks of its own prompt; time kept per scorer."""

    def __init__(self, scorers: dict[tuple[str, str], Scorer], context_len: int) -> None:
        self.scorers = scorers  # (setting, scorer key) -> scorer
        self.context_len = context_len
        self.seconds: dict[tuple[str, str], float] = dict.fromkeys(scorers, 0.0)

    def observe(self, layer: int, q: torch.Tensor, k_pre: torch.Tensor, k: torch.Tensor, start: int) -> None:
        for key, scorer in self.scorers.items():
            if key[0] == "context" and start >= self.context_len:
                continue
            t0 = time.perf_counter()
            scorer.observe(layer, q, k_pre, k, start)
            self.seconds[key] += time.perf_counter() - t0


class ContextNLL:
    """Mean negative log-likelihood of the context's tokens under the model, from the hidden states
    the prefill computes anyway (a hook on the final norm); only the LM head is extra."""

    def __init__(self, engine: LLMEngine, ids: list[int], context_len: int) -> None:
        self.engine = engine
        self.targets = torch.tensor(ids[1:context_len], device=engine.device)  # token t+1 given <= t
        self.start = 0
        self.nll: list[torch.Tensor] = []
        self.handle = engine.model.model.norm.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, hidden: torch.Tensor) -> None:
        stop = min(self.start + hidden.shape[0], len(self.targets))
        if stop > self.start:
            logits = self.engine.model.logits(hidden[: stop - self.start])
            target = self.targets[self.start : stop]
            self.nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))

    def close(self) -> dict[str, float]:
        self.handle.remove()
        nll = torch.cat(self.nll).float().cpu()
        quarter = max(1, len(nll) // 4)
        return {
            "nll_mean": float(nll.mean()),
            "nll_std": float(nll.std()),
            "nll_p90": float(nll.quantile(0.9)),
            "nll_last_quarter": float(nll[-quarter:].mean()),
        }


@dataclass
class Cell:
    """One decode: a (setting, variant, retention) cell or the full cache."""

    key: str
    kv: SequenceKV
    position: int  # of the next input token
    feed: list[int]  # prompt tokens still to feed before answering (the context setting's question)
    out: list[int]
    kept: float = 1.0
    kept_of_prompt: float = 1.0


class GroupedDecode:
    """One model forward over several decode groups; attention runs group by group, so a group of
    10%-retention cells does not pad its heads to the full-cache cell's length."""

    def __init__(self, groups: list[list[Cell]]) -> None:
        self.batches = [DecodeBatch([c.kv for c in g], [c.position for c in g]) for g in groups]
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
def decode_cells(engine: LLMEngine, groups: list[list[Cell]], sample: Sample) -> None:
    """Feed each cell's pending prompt tokens, then decode greedily until max_new_tokens, eos, or
    every expected answer is in the text (the score can no longer change, so stopping there gives
    the same score as decoding on)."""

    def done(c: Cell) -> bool:
        if c.feed or not c.out:
            return False
        text = engine.decode_text(c.out)
        return len(c.out) >= sample.max_new_tokens or (
            # two tokens at least: the whole setting's first-token agreement reads the second
            len(c.out) >= 2 and (c.out[-1] in engine.eos_ids or score(sample.answers, text) == 1)
        )

    while True:
        groups = [[c for c in g if not done(c)] for g in groups]
        groups = [g for g in groups if g]
        if not groups:
            return
        cells = [c for g in groups for c in g]
        for c in cells:
            c.kv.grow(1)
        batch = GroupedDecode(groups)
        ids = torch.tensor([c.feed[0] if c.feed else c.out[-1] for c in cells], device=engine.device)
        hidden = engine.model(ids, batch.positions, batch)
        batch.finish()
        for c, t in zip(cells, engine.model.logits(hidden).argmax(dim=-1).tolist()):
            c.position += 1
            if c.feed:
                c.feed.pop(0)
                if c.feed:
                    continue  # a question token's logits: not an answer yet
            c.out.append(t)


def concentration(values: torch.Tensor, top: float) -> float:
    """Mean over (layer, head) of the share of a non-negative statistic [L, H, n] held by its top share of tokens."""
    v = values.float().clamp(min=0)
    k = max(1, round(top * v.shape[-1]))
    share = v.topk(k, dim=-1).values.sum(-1) / v.sum(-1).clamp(min=1e-12)
    return float(share.mean())


def score_signals(scorer: Scorer) -> dict[str, float]:
    """Cheap statistics of the default compactor's observation that may predict tolerance to compression."""
    out: dict[str, float] = {}
    for name in ("mass", "leverage"):
        values = getattr(scorer, name, None)
        if isinstance(values, torch.Tensor):
            out[f"{name}_top10"] = concentration(values, 0.1)
            out[f"{name}_top25"] = concentration(values, 0.25)
    return out


def run_sample(
    engine: LLMEngine,
    prompt: Prompt,
    variants: dict[str, dict[str, Any]],
    retentions: list[float],
    settings: list[str],
) -> dict[str, Any]:
    """Every (setting, variant, retention) cell of one sample; its pages are freed on every exit."""
    owned: list[SequenceKV] = []
    try:
        result = _run_sample(engine, prompt, variants, retentions, settings, owned)
    finally:
        for kv in owned:
            kv.free()
    engine.pool.assert_no_leaks()
    return result


def _run_sample(
    engine: LLMEngine,
    prompt: Prompt,
    variants: dict[str, dict[str, Any]],
    retentions: list[float],
    settings: list[str],
    owned: list[SequenceKV],
) -> dict[str, Any]:
    sample, ids = prompt.sample, prompt.ids
    n, n_ctx = len(ids), prompt.context_len
    kv_shape = (engine.num_layers, engine.num_kv_heads)
    base = engine.make_sequence(ids, SamplingParams(temperature=0.0, max_new_tokens=sample.max_new_tokens))
    base.kv = SequenceKV(engine.pool, *kv_shape, n + sample.max_new_tokens + 1)
    owned.append(base.kv)
    lens = {"whole": n, "context": n_ctx}
    # protected in the whole setting: the question and everything after the document
    spans = {"whole": [prompt.question, (n_ctx, n)], "context": []}
    cell_params: dict[tuple[str, str], CompressionParams] = {}  # (setting, variant) at retention 0.5
    scorers: dict[tuple[str, str], Scorer] = {}
    for setting in settings:
        for name, fields in variants.items():
            params = CompressionParams(**fields, protected_spans=spans[setting])
            key = (setting, scorer_key(params))
            cell_params[(setting, name)] = params
            if key not in scorers:
                scorers[key] = make_scorer(params, PromptShape(*kv_shape, lens[setting]), base.kv)
    fan = FanOut(scorers, n_ctx)
    nll = ContextNLL(engine, ids, n_ctx)
    t0 = time.perf_counter()
    logits = None
    try:
        while base.num_prefilled < n:
            start = base.num_prefilled
            edge = n_ctx if start < n_ctx else n  # a chunk never crosses the end of the context
            nll.start = start
            logits = engine.runner.prefill(base, min(engine.scheduler.prefill_chunk, edge - start), fan)
    finally:
        signals = nll.close()
    assert logits is not None
    first = int(logits.argmax())
    prefill_seconds = time.perf_counter() - t0 - sum(fan.seconds.values())

    cells: list[Cell] = []
    groups: dict[tuple[str, float], list[Cell]] = defaultdict(list)
    full = Cell("full", base.kv, n, [], [first])
    groups[("full", 1.0)].append(full)
    scores_cache: dict[tuple[tuple[str, str], float], torch.Tensor] = {}
    select_seconds = 0.0
    with torch.no_grad():  # not inference_mode: the cells' page tables must stay normal tensors
        for (setting, name), params0 in cell_params.items():
            key = (setting, scorer_key(params0))
            scorer = scorers[key]
            for r in retentions:
                t1 = time.perf_counter()
                params = dataclasses.replace(params0, retention=r)
                scorer.params = params  # the compactor's blend weight may depend on the retention
                cached = (key, params.blend_weight)
                if cached not in scores_cache:
                    scores_cache[cached] = scorer.scores()
                fan.seconds[key] += time.perf_counter() - t1
                t1 = time.perf_counter()
                kept, kept_lens = select_tokens(scores_cache[cached], params)
                feed = ids[n_ctx:] if setting == "context" else []
                kv = SequenceKV(
                    engine.pool, *kv_shape, int(kept_lens.max()) + len(feed) + sample.max_new_tokens + 1
                )
                owned.append(kv)
                kv.grow_to(kept_lens)
                pack_kept(engine.pool.kv, base.kv.page_table, kept, kept_lens, kv.page_table)
                select_seconds += time.perf_counter() - t1
                total = int(kept_lens.sum())
                heads = kv_shape[0] * kv_shape[1]
                cell = Cell(
                    f"{setting}|{name}@{r}", kv, lens[setting], list(feed), [] if feed else [first],
                    kept=total / (lens[setting] * heads), kept_of_prompt=(total + len(feed) * heads) / (n * heads),
                )  # fmt: skip
                cells.append(cell)
                groups[(setting, r)].append(cell)
    default_context = scorers.get(("context", scorer_key(CompressionParams())))
    if default_context is not None:
        signals.update(score_signals(default_context))
    t2 = time.perf_counter()
    decode_cells(engine, list(groups.values()), sample)
    decode_seconds = time.perf_counter() - t2

    full_text = engine.decode_text(full.out)
    result: dict[str, Any] = {
        "family": sample.family,
        "target_tokens": sample.target_tokens,
        "seed": sample.seed,
        "split": sample.split,
        "depth_bucket": sample.depth_bucket,
        "answer_depths": sample.answer_depths,
        "prompt_tokens": n,
        "context_tokens": n_ctx,
        "question_tokens": list(prompt.question),
        "answers": sample.answers,
        "full": {"score": score(sample.answers, full_text), "text": full_text, "tokens": full.out[:2]},
        "cells": {},
        "signals": signals,
        "seconds": {
            "prefill": prefill_seconds,
            "decode": decode_seconds,
            "select_and_pack": select_seconds,
            # a variant's scorer (shared with the variants that differ from it in selection only)
            "scoring": {f"{s}|{v}": fan.seconds[(s, scorer_key(p))] for (s, v), p in cell_params.items()},
        },
    }
    for c in cells:
        text = engine.decode_text(c.out)
        # the first answer token decoded over the compressed cache: the context setting's first,
        # the whole setting's second (its first comes from the full prefill)
        at = 1 if c.key.startswith("whole|") else 0
        agree = c.out[at] == full.out[at] if len(c.out) > at and len(full.out) > at else None
        result["cells"][c.key] = {
            "score": score(sample.answers, text),
            "text": text,
            "kept": c.kept,
            "kept_of_prompt": c.kept_of_prompt,
            "first_token_agrees": agree,
        }
    return result


def environment(device: str) -> dict[str, Any]:
    import transformers

    if device.startswith("cuda"):
        name = f"cuda: {torch.cuda.get_device_name()}"
    else:
        lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor()
        )
        name = f"cpu: {cpu} ({torch.get_num_threads()} torch threads)"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": name,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
    }


def versus_table(samples: list[dict[str, Any]], variant: str) -> str:
    """Markdown: `variant` minus each other variant of the same setting and retention, paired, with the
    95% CI and the number of samples both have."""
    cells = {parse_cell(k) for s in samples for k in s["cells"]}
    rows = []
    for setting, other, r in sorted(cells, key=lambda c: (c[0], c[1], -c[2])):
        if other == variant or (setting, variant, r) not in cells:
            continue
        d = paired_difference(samples, f"{setting}|{variant}@{r:g}", f"{setting}|{other}@{r:g}")
        lo, hi = d["ci"]
        rows.append(
            f"| {setting} | {other} | {r:g} | {d['mean']:+.3f} [{lo:+.2f}, {hi:+.2f}] | {d['samples']} |"
        )
    head = f"| setting | {variant} minus | r | paired difference [95% CI] | samples |\n| --- | --- | ---: | ---: | ---: |"
    return "\n".join([head, *rows])


def jobs(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    seeds = split_seeds(args.split, args.per_cell, args.first_seed)
    out = [(f, length, s) for s in seeds for length in args.lengths for f in args.families]
    return out[: args.limit] if args.limit else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="HF folder or GGUF; default: the bundled SmolLM2-135M-Instruct"
    )
    ap.add_argument("--split", choices=SPLITS, default="tuning")
    ap.add_argument("--per-cell", type=int, default=4, help="samples per (family, length)")
    ap.add_argument("--first-seed", type=int, default=0, help="offset into the split's seeds")
    ap.add_argument("--limit", type=int, default=0, help="run only the first N samples (smoke tests)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS), help="prompt tokens (approx.)")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="names (quality_variants.py) or name=method,field:value",
    )
    ap.add_argument("--retentions", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--kv-gib", type=float, default=6.0, help="KV pool size (all cells of a sample live at once)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (1 is fastest on a shared 2-core box)"
    )
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument(
        "--time-budget", type=float, default=0, help="start no sample after this many seconds (0: none); "
        "samples run seed by seed, so a cut run still covers every family and length evenly",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/quality.json"))
    ap.add_argument(
        "--tokens-out",
        type=Path,
        default=None,
        help="write each sample's token ids (quality_kvpress.py reads them)",
    )
    ap.add_argument(
        "--tokens-only", action="store_true", help="with --tokens-out: write the token ids and stop"
    )
    ap.add_argument(
        "--summarize", type=Path, default=None, help="redo the summary, tables and plot of an existing JSON"
    )
    ap.add_argument(
        "--merge-kvpress", type=Path, nargs="+", default=[], help="with --summarize: add kvpress's JSON(s)"
    )
    ap.add_argument(
        "--versus", default=None, help="with --summarize: print this variant minus every other, paired"
    )
    args = ap.parse_args()
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        for path in args.merge_kvpress:
            merge_kvpress(report, json.loads(path.read_text()))
        report["summary"] = summarize(report["samples"])
        args.summarize.write_text(json.dumps(report, indent=1))
        plot(report, args.summarize.with_suffix(".png"))
        print_tables(report)
        if args.versus:
            print(versus_table(report["samples"], args.versus))
        return
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    variants = dict(parse_variant(v) for v in args.variants)
    retentions = sorted({r for r in args.retentions if r < 1.0}, reverse=True)
    llm = LLM(
        args.model, device=args.device, dtype=args.dtype, prefill_chunk=args.prefill_chunk,
        kv_cache_bytes=int(args.kv_gib * (1 << 30)),
    )  # fmt: skip
    engine = llm.engine
    count = lambda text: len(engine.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    todo = jobs(args)
    prompts = [tokenize(engine.tokenizer, make_sample(f, length, seed, count)) for f, length, seed in todo]
    if args.tokens_out:
        args.tokens_out.parent.mkdir(parents=True, exist_ok=True)
        with args.tokens_out.open("w") as f:
            for p in prompts:
                s = p.sample
                f.write(json.dumps({
                    "family": s.family, "target_tokens": s.target_tokens, "seed": s.seed, "split": s.split,
                    "ids": p.ids, "context_tokens": p.context_len, "answers": s.answers,
                    "max_new_tokens": s.max_new_tokens,
                }) + "\n")  # fmt: skip
        if args.tokens_only:
            return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Each finished sample is appended here, so an interrupted run resumes where it stopped.
    partial = args.out.with_suffix(".partial.jsonl")
    samples = (
        [json.loads(x) for x in partial.read_text().splitlines() if x.strip()] if partial.exists() else []
    )
    done = {(s["family"], s["target_tokens"], s["seed"]) for s in samples}
    started = time.perf_counter()
    bar = tqdm(prompts, desc="quality", unit="sample")
    for p in bar:
        s = p.sample
        if (s.family, s.target_tokens, s.seed) in done:
            continue
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            print(
                f"time budget of {args.time_budget:.0f} s spent: stopping before {s.family}@{s.target_tokens} seed {s.seed}"
            )
            break
        result = run_sample(engine, p, variants, retentions, args.settings)
        samples.append(result)
        with partial.open("a") as f:
            f.write(json.dumps(result) + "\n")
        bar.set_postfix(family=s.family, n=result["prompt_tokens"], full=result["full"]["score"])
    wanted = set(todo)
    samples = [s for s in samples if (s["family"], s["target_tokens"], s["seed"]) in wanted]
    report = {
        "environment": environment(args.device),
        "model": engine.loaded.source,
        "settings": {
            "split": args.split,
            "per_cell": args.per_cell,
            "variants": variants,
            "retentions": retentions,
            "settings": args.settings,
            "dtype": args.dtype,
            "defaults": {
                k: v for k, v in vars(CompressionParams()).items() if k not in ("method", "retention")
            },
            "protected": {
                "whole": "sink 4 + recent 32 + the question + everything after the document",
                "context": "sink 4 + recent 32 (of the context); the question is fed after compression",
            },
            "prefill_chunk": args.prefill_chunk,
            "wall_seconds": time.perf_counter() - started,
        },
        "kvpress": {"status": "not merged"},
        "samples": samples,
    }
    report["summary"] = summarize(samples)
    args.out.write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)
    plot(report, args.out.with_suffix(".png"))
    print_tables(report)


if __name__ == "__main__":
    main()
