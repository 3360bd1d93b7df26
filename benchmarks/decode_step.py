"""Decode-step latency (TPOT) of the engine with decode steps replayed from CUDA graphs vs eager.

A dummy-weight model (load_format="dummy", bf16) decodes B requests of a fixed context together;
each timed `engine.step()` is one decode step of the whole batch (inputs, model, sampling), so its
wall time is the time per output token. For the graph engine the replay alone (GPU time of the
step) is timed too; the rest of its step is host work. The first differing token of each request
is checked to be a near-tie of the eager logits (bf16). The Hugging Face transformers `generate`
baseline comes from benchmarks/hf_generate.py in its own process.

    python3 benchmarks/decode_step.py --out docs/benchmarks --batch-sizes 1,8,32
    python3 benchmarks/hf_generate.py --config benchmarks/configs/llama-3.1-8b --input-len 1024 \\
        --output-len 64 --num-requests 2 --out docs/benchmarks/decode_step_hf_generate_1024.json
    python3 benchmarks/decode_step.py --plot docs/benchmarks/decode_step.json \\
        --hf-json docs/benchmarks/decode_step_hf_generate_1024.json   # the PNG from the two JSONs
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvferry.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from kvferry.engine.loader import LoadedModel, load_model  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "llama-3.1-8b"


def decode_run(
    loaded: LoadedModel, args: argparse.Namespace, batch: int, enforce_eager: bool
) -> dict[str, Any]:
    """Step times of `args.steps` decode steps of `batch` requests (after prefill and warm-up)."""
    engine = LLMEngine(
        EngineConfig(
            model=str(args.config),
            load_format="dummy",
            dtype="bfloat16",
            page_size=16,
            prefill_chunk=2048,
            max_model_len=args.max_model_len,
            kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
            max_num_seqs=max(batch, 1),
            enforce_eager=enforce_eager,
            layer_kernels=args.layer_kernels,
            fused_projections=args.fused_projections,
        ),
        loaded=loaded,
    )
    step_logits: list[torch.Tensor] = []  # [B, V] of every decode step, kept on the GPU
    decode = engine.runner.decode

    def recording_decode(seqs: list[Any]) -> torch.Tensor:
        logits = decode(seqs)
        step_logits.append(logits.clone())  # ~10 us a step at B=32 (16 MB on the device)
        return logits

    engine.runner.decode = recording_decode  # type: ignore[method-assign]
    rng = random.Random(batch)
    vocab = loaded.config.vocab_size
    total_new = args.warmup + args.steps + 1
    sp = SamplingParams(temperature=0.0, max_new_tokens=total_new, ignore_eos=True)
    seqs = [engine.add_request([rng.randrange(vocab) for _ in range(args.context)], sp) for _ in range(batch)]
    while any(not s.output_token_ids for s in seqs):  # prefill every request (first token each)
        engine.step()
    for _ in range(args.warmup):  # graph capture (lazily, at the first step of a bucket) and warm-up
        engine.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        stepped = engine.step()
        times.append(time.perf_counter() - t0)  # sampling reads the tokens back: the step is done
        assert len(stepped) == batch
    result: dict[str, Any] = {
        "batch": batch,
        "mode": "eager" if enforce_eager else "cuda_graphs",
        "tpot_ms": 1e3 * statistics.median(times),
        "tpot_mean_ms": 1e3 * statistics.mean(times),
        "tpot_p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
        "tokens_per_s": batch / statistics.median(times),
    }
    graphs = engine.runner.graphs
    if graphs is not None:
        n = graphs.bucket_for(batch)
        graph = graphs.graphs[n]
        replays = []
        for _ in range(args.steps):  # the same inputs again: only the GPU time of one step
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            replays.append(time.perf_counter() - t0)
        result["replay_ms"] = 1e3 * statistics.median(replays)
        result["host_ms"] = result["tpot_ms"] - result["replay_ms"]
        result["buckets_captured"] = sorted(graphs.graphs)
    result["tokens"] = [s.output_token_ids[: args.warmup + args.steps + 1] for s in seqs]
    result["logits"] = step_logits
    for s in seqs:
        engine.abort(s.request_id)
    engine.pool.assert_no_leaks()
    del engine
    torch.cuda.empty_cache()
    return result


def hf_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """transformers `generate` at batch 1, same shape and context: TPOT from 1 vs N new tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.config)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, config.vocab_size, (1, args.context), device="cuda")
    mask = torch.ones_like(ids)

    def timed(new: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(8)  # warm-up
    new = args.steps + 1
    tpot = (timed(new) - timed(1)) / (new - 1)
    import transformers

    return {
        "batch": 1,
        "mode": "hf_generate",
        "tpot_ms": 1e3 * tpot,
        "transformers": transformers.__version__,
    }


def compare_tokens(eager: dict[str, Any], graphs: dict[str, Any]) -> dict[str, Any]:
    """Where graph and eager tokens part (bf16 rounds differently in padded matmuls and other split
    counts): for each request the first differing token, and whether the eager logits were a
    near-tie there (top-2 gap < 2x the largest graph-vs-eager logit difference of that row). After
    that token a request follows another history, so later tokens are not compared."""
    same = total = diverged = near_ties = 0
    first_steps: list[int] = []
    diffs: list[float] = []  # largest |graph - eager| logit of each row while histories agree
    for row, (a, b) in enumerate(zip(eager["tokens"], graphs["tokens"])):
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
        first = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)
        last = len(a) if first is None else first
        for t in range(1, last + 1):  # token t comes from decode step t - 1
            if t - 1 < len(eager["logits"]):
                e, g = eager["logits"][t - 1][row].float(), graphs["logits"][t - 1][row].float()
                diff = (g - e).abs().max().item()
                if t == first:
                    top2 = e.topk(2).values
                    near_ties += (top2[0] - top2[1]).item() < 2 * diff
                else:
                    diffs.append(diff)
        if first is not None:
            diverged += 1
            first_steps.append(first)
    return {
        "token_agreement": same / total,
        "requests": len(eager["tokens"]),
        "diverged": diverged,
        "divergences_at_near_ties": near_ties,
        "first_divergence_token_median": statistics.median(first_steps) if first_steps else None,
        "logit_max_abs_diff_median": statistics.median(diffs) if diffs else None,
        "logit_max_abs_diff_max": max(diffs) if diffs else None,
    }


def plot(result: dict[str, Any], path: Path, hf: dict[str, Any] | None = None) -> None:
    """Bars of TPOT per batch size; `hf` (benchmarks/hf_generate.py's JSON) draws the baseline line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    batches = sorted({r["batch"] for r in rows if r["mode"] != "hf_generate"})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for k, (mode, color) in enumerate([("eager", "tab:gray"), ("cuda_graphs", "tab:blue")]):
        tpot = [next(r["tpot_ms"] for r in rows if r["batch"] == b and r["mode"] == mode) for b in batches]
        xs = [i + (k - 0.5) * width for i in range(len(batches))]
        bars = ax.bar(xs, tpot, width, label=mode.replace("_", " "), color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if hf is not None:
        label = f"HF generate, batch 1 ({hf['tpot_s'] * 1e3:.1f} ms, benchmarks/hf_generate.py)"
        ax.axhline(hf["tpot_s"] * 1e3, color="tab:red", ls="--", lw=1, label=label)
    top = max(r["tpot_ms"] for r in rows if r["mode"] != "hf_generate")
    ax.set_ylim(0, 1.4 * max(top, hf["tpot_s"] * 1e3 if hf else 0))  # room for the legend
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("TPOT (ms per decode step)")
    ax.set_title(
        f"{result['model']} (dummy weights, bf16), context {result['context']}\n{result['device']}, {result['date']}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_decode_run_arguments(p: argparse.ArgumentParser, batch_sizes: str, steps: int) -> None:
    """The flags decode_run reads (shared with benchmarks/fused_projections.py)."""
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="folder with config.json")
    p.add_argument("--batch-sizes", default=batch_sizes)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens of every decoded request")
    p.add_argument("--steps", type=int, default=steps, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=8192, help="sets the graphs' page-table width")
    p.add_argument("--kv-cache-gib", type=float, default=8)


def report_header(args: argparse.Namespace) -> dict[str, Any]:
    """What a report records first: its command, date, GPU, torch, the model and the prompt length."""
    return {
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": args.date,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": args.config.name,
        "context": args.context,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_run_arguments(p, batch_sizes="1,8,32", steps=64)
    p.add_argument(
        "--layer-kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="RMSNorm, RoPE and the SwiGLU gate as Triton kernels (the engine's default) or eager ops",
    )
    p.add_argument(
        "--fused-projections",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="q/k/v and gate/up each as one matmul (the engine's default) or one matmul per projection",
    )
    p.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also time transformers generate at batch 1 in this process, after the engines (measured "
        "55-86 ms there vs 25.3 ms in a fresh process: prefer benchmarks/hf_generate.py and --hf-json)",
    )
    p.add_argument(
        "--hf-json", type=Path, help="with --plot: benchmarks/hf_generate.py's JSON for the baseline"
    )
    p.add_argument("--out", type=Path, help="folder for decode_step.json and decode_step.png")
    p.add_argument("--plot", type=Path, help="only draw the PNG next to an existing JSON")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    args = p.parse_args(argv)
    if args.plot:
        hf = json.loads(args.hf_json.read_text()) if args.hf_json else None
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"), hf)
        return 0
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    loaded = load_model(str(args.config), torch.bfloat16, torch.device("cuda"), "dummy")
    rows = []
    agreement = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        eager = decode_run(loaded, args, batch, enforce_eager=True)
        graphs = decode_run(loaded, args, batch, enforce_eager=False)
        agreement[batch] = compare_tokens(eager, graphs)
        print(json.dumps({"batch": batch, **agreement[batch]}), flush=True)
        for r in (eager, graphs):
            r.pop("tokens")
            r.pop("logits")
            rows.append(r)
            print(json.dumps(r), flush=True)
        print(f"batch {batch}: graphs {eager['tpot_ms'] / graphs['tpot_ms']:.2f}x faster", flush=True)
    del loaded
    torch.cuda.empty_cache()
    if args.hf_baseline:
        rows.append(hf_baseline(args))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        **report_header(args),
        "timed_steps": args.steps,
        "max_model_len": args.max_model_len,
        "layer_kernels": args.layer_kernels,
        "fused_projections": args.fused_projections,
        "graphs_vs_eager_tokens": agreement,
        "results": rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_step.json").write_text(json.dumps(result, indent=1))
        try:
            plot(result, args.out / "decode_step.png")
        except ImportError:
            print("matplotlib missing: run with --plot on the JSON to draw the PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
