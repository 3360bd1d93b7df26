"""`kvferry bench --workload docqa`: many questions on a few documents, through the services, with the
cache of compressed contexts off and on.

M documents (random token ids, lengths from --input-len) get M x N questions in all
(--questions-per-document N, lengths from --question-len), each asking about a document drawn by Zipf
popularity (document k with probability proportional to 1 / k^s, --zipf s; s = 0 gives every document
exactly N questions), in random order, at fixed concurrency or Poisson arrivals (--rate). Every
request sends its document as `context` and its question as the prompt; --context-caches runs the
same requests once per setting:

  off    no cache: every request prefills its document (whole KV)
  1      cached uncompressed: a document is prefilled once per node, later questions prefill only
         themselves and share its pages (on the decode node too, where only the question's pages travel)
  0.5    cached, the document compressed by --method at retention 0.5 (any fraction)
  auto   cached, retention chosen from the document (engine/retention.py), once per document

Reported per setting: TTFT p50/p99, throughput, prefill and decode cache hits, prompt tokens computed,
and documents cached per GiB (the prefill node's cache bytes over its entries, after the run). After
each setting the contexts it cached are dropped (DropContext), so the next starts cold; the nodes'
caches must then be empty. The context cache budget (--engine-args "--context-cache-gib G") should
hold the M documents, else evictions show in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from pathlib import Path
from typing import Any

from kvferry.clients.load import (
    Request,
    _client_kwargs,
    _draw,
    bench_options,
    coordinator_address,
    length_range,
    parse_length,
    run_cluster,
    warmup_workload,
)

GIB = float(1 << 30)


def add_docqa_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("docqa workload (--workload docqa; documents' lengths: --input-len)")
    g.add_argument("--documents", type=int, default=8, help="documents M")
    g.add_argument(
        "--questions-per-document", type=int, default=16, help="questions N per document (M x N in all)"
    )
    g.add_argument(
        "--question-len", type=parse_length, default=(32, 64), help="question tokens: N or a range"
    )
    g.add_argument(
        "--zipf", type=float, default=1.0, help="popularity exponent s (0: every document N questions)"
    )
    g.add_argument(
        "--context-caches", default="off,1,0.5,auto",
        help="comma list: off (no cache), a retention of the cached document (1: uncompressed), auto",
    )  # fmt: skip


def parse_caches(text: str) -> list[str]:
    caches = [c.strip().lower() for c in text.split(",") if c.strip()]
    for c in caches:
        if c in ("off", "auto"):
            continue
        try:
            ok = 0 < float(c) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"--context-caches: {c!r} is not off, auto or a retention in (0, 1]")
    if not caches:
        raise ValueError("--context-caches: name at least one setting")
    return caches


def make_docqa(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[Request], list[int]]:
    """The documents, the requests (each a question about one, its document as context) and the
    document each request asks about."""
    rng = random.Random(args.seed)
    lo, hi = length_range(args, "input")
    docs = [
        [rng.randrange(1, vocab) for _ in range(_draw(rng, lo, hi, args.input_dist))]
        for _ in range(args.documents)
    ]
    total = args.documents * args.questions_per_document
    if args.zipf == 0:
        picks = [d for d in range(args.documents) for _ in range(args.questions_per_document)]
        rng.shuffle(picks)
    else:
        weights = [1.0 / (k + 1) ** args.zipf for k in range(args.documents)]
        picks = rng.choices(range(args.documents), weights, k=total)
    (q_lo, q_hi), (o_lo, o_hi) = args.question_len, length_range(args, "output")
    work = [
        Request(
            [rng.randrange(1, vocab) for _ in range(rng.randint(q_lo, q_hi))],
            _draw(rng, o_lo, o_hi, args.output_dist),
            docs[d],
        )
        for d in picks
    ]
    return docs, work, picks


def _cache_state(info: Any, role: str) -> dict[str, int]:
    nodes = [n for n in getattr(info, f"{role}_nodes") if n.reachable]
    fields = ("device_entries", "host_entries", "device_bytes", "host_bytes", "hits", "misses", "evictions")
    return {f: sum(getattr(n.context_cache, f) for n in nodes) for f in fields}


async def run_setting(
    args: argparse.Namespace, address: str, work: list[Request], cache: str
) -> dict[str, Any]:
    """One --context-caches setting over `work`; the contexts it cached are dropped afterwards."""
    from kvferry.clients import AsyncClient, KvferryRpcError

    retention: float | str = 1.0 if cache in ("off", "1") else cache if cache == "auto" else float(cache)
    async with AsyncClient(address, timeout=60, **_client_kwargs(args)) as client:
        before = await client.info()
    result, records = await run_cluster(
        args, address, work, retention, cache_context=cache != "off", label=f"docqa cache={cache}"
    )
    async with AsyncClient(address, timeout=60, **_client_kwargs(args)) as client:
        info = await client.info()
        for handle in sorted({r.context_handle for r in records if r.context_handle}):
            with contextlib.suppress(KvferryRpcError):  # already evicted everywhere: NOT_FOUND
                await client.drop_context(handle)
        after = await client.info()
    prefill = _cache_state(info, "prefill")
    entries = prefill["device_entries"] + prefill["host_entries"]
    cache_bytes = prefill["device_bytes"] + prefill["host_bytes"]
    per_doc = cache_bytes / entries if entries else None
    first = _cache_state(before, "prefill")
    return {
        "mode": "disaggregated",
        "retention": retention,
        "context_cache_setting": cache,
        **result,
        "documents_cached": entries,
        "cache_bytes": cache_bytes,
        "bytes_per_document": per_doc,
        "documents_per_gib": GIB / per_doc if per_doc else None,
        "prefill_evictions": prefill["evictions"] - first["evictions"],
        "decode_cache": _cache_state(info, "decode"),
        "cached_pages_after_drop": sum(
            n.pool.cached_pages for n in [*after.prefill_nodes, *after.decode_nodes]
        ),
    }


def describe(args: argparse.Namespace) -> str:
    (a, b), (q, r), (c, d) = length_range(args, "input"), args.question_len, length_range(args, "output")
    load = f"rate {args.request_rate}/s" if args.request_rate else f"concurrency {args.concurrency}"
    return (
        f"docqa: {args.documents} docs of {a}-{b} tokens x {args.questions_per_document} questions of {q}-{r} "
        f"(zipf {args.zipf}), out {c}-{d}, {load}"
    )


def line(r: dict[str, Any]) -> str:
    nan = float("nan")
    hits = r["context_cache"]
    per_gib = r["documents_per_gib"]
    return (
        f"cache={r['context_cache_setting']:<5} TTFT p50 {r['ttft_s'].get('p50', nan):.3f}s "
        f"p99 {r['ttft_s'].get('p99', nan):.3f}s  {r['request_throughput_req_s']:.2f} req/s "
        f"{r['output_throughput_tok_s']:.1f} tok/s  hits prefill {hits['prefill']['hit']} decode "
        f"{hits['decode']['hit']}  computed {r['prefill_tokens_computed']:,} tokens  "
        f"docs/GiB {'-' if per_gib is None else f'{per_gib:.1f}'}  failed {r['failed']}"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """TTFT p50/p99, request throughput and documents cached per GiB, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [f"cache {r['context_cache_setting']}" for r in runs]
    x = list(range(len(runs)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for k, q in enumerate(("p50", "p99")):
        axes[0].bar([i + (k - 0.5) * 0.38 for i in x], [r["ttft_s"].get(q, 0) for r in runs], 0.38, label=q)
    axes[0].set_title("TTFT (s)")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [r["request_throughput_req_s"] for r in runs], color="tab:green")
    axes[1].set_title("throughput (requests / s)")
    axes[2].bar(x, [r["documents_per_gib"] or 0 for r in runs], color="tab:purple")
    axes[2].set_title("documents cached per GiB (prefill node)")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.tick_params(axis="x", labelsize=8)
    meta = results["meta"]
    fig.suptitle(f"kvferry docqa - {meta['device']} - {meta['date']} - {meta['workload']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, command: str, meta: dict[str, Any]) -> int:
    """The docqa benchmark (bench.run hands it over); <out>.json / .png are rewritten after every
    setting, so a run cut short keeps what finished."""
    from kvferry.clients import Client

    if args.colocated or args.compare:
        raise ValueError("--workload docqa runs through the services: drop --colocated / --compare")
    caches = parse_caches(args.context_caches)
    results: dict[str, Any] = {"meta": {**meta, "workload": describe(args)}, "runs": []}
    failed = 0
    with coordinator_address(args, bench_options(args)) as address:
        with Client(address, timeout=30, **_client_kwargs(args)) as c:
            model = c.info().decode_nodes[0].model
        longest = length_range(args, "input")[1] + args.question_len[1] + length_range(args, "output")[1]
        if longest > model.max_model_len:
            raise ValueError(
                f"the longest request ({longest} positions) exceeds max_model_len {model.max_model_len}"
            )
        _, work, picks = make_docqa(args, model.vocab_size)
        results["meta"]["questions_per_document"] = [picks.count(d) for d in range(args.documents)]
        for cache in caches:
            if args.warmup:
                asyncio.run(
                    run_cluster(args, address, warmup_workload(args, model.vocab_size), 1.0, quiet=True)
                )
            result = asyncio.run(run_setting(args, address, work, cache))
            results["runs"].append(result)
            failed += result["failed"]
            print(line(result), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
                plot(results, args.out.with_suffix(".png"))
    if args.out:
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    if failed:
        print(f"{failed} requests failed (see 'errors' in the JSON)", file=sys.stderr)
    return 1 if failed else 0
