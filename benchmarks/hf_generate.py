"""Baseline: Hugging Face transformers `generate` on the same GPU, model shape and requests (one at a
time, what a user would pick at small scale). Prints and writes TTFT / TPOT / throughput as JSON.

    python benchmarks/hf_generate.py --config benchmarks/configs/llama-3.1-8b --input-len 8192 --output-len 256
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="folder with config.json (random weights)")
    p.add_argument("--input-len", type=int, default=8192)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.config)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    rng = random.Random(0)
    runs = []
    for i in range(args.num_requests + 1):  # the first one warms up
        ids = torch.tensor(
            [[rng.randrange(1, config.vocab_size) for _ in range(args.input_len)]], device="cuda"
        )
        mask = torch.ones_like(ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.output_len,
            min_new_tokens=args.output_len,
            do_sample=False,
        )
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        if i:
            runs.append({"ttft_s": ttft, "tpot_s": (total - ttft) / (args.output_len - 1), "e2e_s": total})
    result = {
        "device": torch.cuda.get_device_name(0),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "tpot_s": statistics.median(r["tpot_s"] for r in runs),
        "output_throughput_tok_s": args.output_len / statistics.median(r["e2e_s"] for r in runs),
        "runs": runs,
        "transformers": __import__("transformers").__version__,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
