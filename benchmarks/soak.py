"""Soak: many clients for minutes against a local CPU cluster (coordinator, prefill and decode as real
processes), counting what was served, refused, cancelled and lost, the pages left afterwards, latency,
and each service's RSS over time.

Each client sends requests back to back. A request is a token-id, text or chat prompt of 16 to 1024
tokens with 4 to 64 output tokens (greedy, eos ignored: the answer must have exactly that many), half
of them compressed (compactor, snapkv or streaming at a random retention), half streamed. 5% are
cancelled: half once their first tokens arrived, half while they wait for them (prefill, transfer). 1%
are bad input (a token id past the vocabulary, max_new_tokens past max_model_len, an infinite
temperature, an unknown compression method, a span past the prompt, an out-of-range knob, an unknown
chat role, a prompt too long to tokenize), which must come back INVALID_ARGUMENT. Lost: a good request
that failed or came back short, a bad one answered otherwise, a cancel that failed. After the run both
pools must be empty and decode must hold no reservation.

The model: a small random-weight llama (4 layers, hidden 256; `--load-format dummy`) with the bundled
SmolLM2's tokenizer and chat template, so text and chat prompts are tokenized for real at a CPU cost that
lets 64 clients be served (SmolLM2 itself prefills ~70 tokens/s on one shared core); `--model` runs
another.

    python benchmarks/soak.py --duration 600 --clients 64 --out docs/benchmarks/soak

Writes NAME.json and NAME.png; tests/test_soak.py runs 60 seconds of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from kvferry.clients import AsyncClient, Client, KvferryRpcError
from kvferry.clients.local_cluster import LocalCluster
from kvferry.v1 import decode_pb2, decode_pb2_grpc

SERVICES = ("coordinator", "prefill", "decode")
MAX_MODEL_LEN = 2048
SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": MAX_MODEL_LEN,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
WORDS = ["the", "canal", "engineer", "built", "seven", "locks", "along", "river", "valley", "before", "winter",
         "when", "stone", "arrived", "late"]  # fmt: skip


@dataclass
class SoakConfig:
    duration: float = 600.0  # seconds of load
    clients: int = 64
    cancel_share: float = 0.05
    bad_share: float = 0.01
    compressed_share: float = 0.5
    input_tokens: tuple[int, int] = (16, 1024)
    output_tokens: tuple[int, int] = (4, 64)
    sample_seconds: float = 5.0  # RSS sampling period
    warm_up_share: float = 0.2  # RSS growth is measured from the end of this share of the run
    seed: int = 0
    request_timeout: float = 300.0


def small_model_folder(folder: Path) -> Path:
    """A config-only llama (random weights through --load-format dummy) with SmolLM2's tokenizer."""
    from kvferry.engine.loader.default_model import default_model_path
    from kvferry.engine.loader.gguf_cache import gguf_tokenizer

    tokenizer = gguf_tokenizer(Path(default_model_path()))
    config = {**SMALL_LLAMA, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(folder))
    return folder


def engine_args(model: Path | str, load_format: str) -> list[str]:
    return ["--model", str(model), "--load-format", load_format, "--device", "cpu", "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--prefill-chunk", "256", "--torch-threads", "1"]  # fmt: skip


# ---- requests -------------------------------------------------------------------------------------
def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def good_request(rng: random.Random, config: SoakConfig, vocab: int) -> dict[str, Any]:
    n = rng.randint(*config.input_tokens)
    kind = rng.choice(["ids", "text", "chat"])
    kwargs: dict[str, Any] = dict(
        max_new_tokens=rng.randint(*config.output_tokens), temperature=0, ignore_eos=True
    )
    if kind == "ids":
        kwargs["prompt"] = [rng.randrange(1, vocab) for _ in range(n)]
    elif kind == "text":
        kwargs["prompt"] = _text(rng, n)  # about one token a word
    else:
        kwargs["messages"] = [
            {"role": "system", "content": "Answer from the notes."},
            {"role": "user", "content": _text(rng, max(n - 30, 1))},
        ]
    if rng.random() < config.compressed_share:
        method = rng.choice(["compactor", "snapkv", "streaming"])
        kwargs["compression"] = {"method": method, "retention": rng.choice([0.25, 0.5, 0.75])}
        if kind == "chat":
            kwargs["compression"]["protect_last_user_turn"] = True
    return kwargs


def bad_request(rng: random.Random, vocab: int) -> tuple[str, dict[str, Any]]:
    """One of the kinds of bad input, as (name, generate keywords); each must be INVALID_ARGUMENT."""
    base: dict[str, Any] = dict(prompt=[rng.randrange(1, vocab) for _ in range(32)], max_new_tokens=8)
    kinds: dict[str, dict[str, Any]] = {
        "token id past the vocabulary": {**base, "prompt": [1, vocab + 5]},
        "max_new_tokens past max_model_len": {**base, "max_new_tokens": 10**9},
        "infinite temperature": {**base, "temperature": float("inf")},
        "unknown compression method": {**base, "compression": {"method": "zip"}},
        "span past the prompt": {**base, "compression": {"method": "streaming", "protected_spans": [(4, 2**31)]}},
        "knob out of range": {**base, "compression": {"method": "snapkv", "window": 10**12}},
        "unknown chat role": {"messages": [{"role": "hacker", "content": "x"}], "max_new_tokens": 8},
        "text too long to tokenize": {"prompt": "x" * (MAX_MODEL_LEN * 200), "max_new_tokens": 8},
    }  # fmt: skip
    name = rng.choice(sorted(kinds))
    return name, kinds[name]


@dataclass
class Outcomes:
    served: int = 0
    cancelled: int = 0
    refused: int = 0  # bad input answered INVALID_ARGUMENT
    lost: int = 0
    latencies: list[float] | None = None  # end to end, served requests
    ttfts: list[float] | None = None
    lost_examples: list[str] | None = None
    bad_kinds: Counter[str] | None = None

    def __post_init__(self) -> None:
        self.latencies, self.ttfts, self.lost_examples, self.bad_kinds = [], [], [], Counter()

    def lose(self, what: str) -> None:
        self.lost += 1
        if len(self.lost_examples) < 20:  # type: ignore[arg-type]
            self.lost_examples.append(what)  # type: ignore[union-attr]


async def _serve_one(client: AsyncClient, kwargs: dict[str, Any], out: Outcomes, streamed: bool) -> None:
    want = kwargs["max_new_tokens"]
    start = time.perf_counter()
    try:
        if streamed:
            got, stats = 0, None
            async for chunk in client.stream(**kwargs):
                got += len(chunk.token_ids)
                stats = chunk.stats or stats
        else:
            result = await client.generate(**kwargs)
            got, stats = len(result.token_ids), result.stats
    except KvferryRpcError as e:
        out.lose(f"{e.code.name}: {e.details[:160]}")
        return
    if got != want:
        out.lose(f"{got} tokens of {want}")
        return
    out.served += 1
    out.latencies.append(time.perf_counter() - start)  # type: ignore[union-attr]
    if stats is not None:
        out.ttfts.append(stats.ttft_seconds)  # type: ignore[union-attr]


async def _cancel_one(client: AsyncClient, kwargs: dict[str, Any], rng: random.Random, out: Outcomes) -> None:
    try:
        if rng.random() < 0.5:  # once tokens arrived: close the stream
            chunks = 0
            async for _ in client.stream(**kwargs):
                chunks += 1
                if chunks >= rng.randint(1, 3):
                    break
        else:  # while it waits for its first token (prefill, transfer)
            task = asyncio.ensure_future(_drain(client.stream(**kwargs)))
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    except KvferryRpcError as e:
        out.lose(f"cancelled request failed: {e.code.name}: {e.details[:160]}")
        return
    out.cancelled += 1


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def _client(
    address: str, index: int, config: SoakConfig, vocab: int, stop_at: float, out: Outcomes
) -> None:
    rng = random.Random(config.seed * 100_003 + index)
    async with AsyncClient(address, timeout=config.request_timeout) as client:
        while time.monotonic() < stop_at:
            draw = rng.random()
            if draw < config.bad_share:
                name, kwargs = bad_request(rng, vocab)
                out.bad_kinds[name] += 1  # type: ignore[index]
                try:
                    await client.generate(**kwargs)
                    out.lose(f"bad input served: {name}")
                except KvferryRpcError as e:
                    if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                        out.refused += 1
                    else:
                        out.lose(f"bad input ({name}) answered {e.code.name}: {e.details[:160]}")
            elif draw < config.bad_share + config.cancel_share:
                await _cancel_one(client, good_request(rng, config, vocab), rng, out)
            else:
                await _serve_one(client, good_request(rng, config, vocab), out, streamed=rng.random() < 0.5)


# ---- the run --------------------------------------------------------------------------------------
def rss_mib(cluster: LocalCluster) -> dict[str, float]:
    return {n: psutil.Process(cluster.processes[n].pid).memory_info().rss / 2**20 for n in SERVICES}


async def _sample_rss(cluster: LocalCluster, config: SoakConfig, start: float, stop_at: float,
                      out: Outcomes, samples: list[dict[str, Any]]) -> None:  # fmt: skip
    while True:
        samples.append({"t": time.monotonic() - start, "served": out.served, "rss_mib": rss_mib(cluster)})
        if time.monotonic() >= stop_at:
            return
        await asyncio.sleep(min(config.sample_seconds, max(0.0, stop_at - time.monotonic())))


def pages_left(cluster: LocalCluster, wait: float) -> dict[str, int]:
    """Pages used and reserved on each engine and decode's reservations, once they reach zero or after
    `wait` seconds (frees trail the last answers by a step, aborts by a lease)."""
    deadline = time.monotonic() + wait
    stub = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(cluster.address("decode")))
    with Client(cluster.coordinator_address, timeout=10) as client:
        while True:
            info = client.info()
            left = {"reservations": stub.Info(decode_pb2.DecodeInfoRequest(), timeout=10).reservations}
            for kind, nodes in (("prefill", info.prefill_nodes), ("decode", info.decode_nodes)):
                (node,) = nodes
                left[f"{kind}_used"] = node.pool.used_pages
                left[f"{kind}_reserved"] = node.pool.reserved_pages
            if not any(left.values()) or time.monotonic() > deadline:
                return left


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_soak(cluster: LocalCluster, config: SoakConfig) -> dict[str, Any]:
    """Load a ready cluster for config.duration seconds; the figures (see the module docstring)."""
    with Client(cluster.coordinator_address, timeout=10) as client:
        vocab = client.info().decode_nodes[0].model.vocab_size
    out = Outcomes()
    samples: list[dict[str, Any]] = []

    async def load() -> None:
        start = time.monotonic()
        stop_at = start + config.duration
        sampler = asyncio.ensure_future(_sample_rss(cluster, config, start, stop_at, out, samples))
        await asyncio.gather(*(_client(cluster.coordinator_address, i, config, vocab, stop_at, out)
                               for i in range(config.clients)))  # fmt: skip
        await sampler

    started = time.monotonic()
    asyncio.run(load())
    elapsed = time.monotonic() - started
    left = pages_left(cluster, wait=60.0)
    samples.append({"t": elapsed, "served": out.served, "rss_mib": rss_mib(cluster)})
    alive = {n: cluster.processes[n].poll() is None for n in SERVICES}
    return {
        "config": asdict(config),
        "seconds": elapsed,
        "requests": out.served + out.cancelled + out.refused + out.lost,
        "served": out.served,
        "cancelled": out.cancelled,
        "refused_bad_input": out.refused,
        "bad_input_kinds": dict(out.bad_kinds),  # type: ignore[arg-type]
        "lost": out.lost,
        "lost_examples": out.lost_examples,
        "pages_left": left,
        "pages_leaked": left["prefill_used"] + left["prefill_reserved"] + left["decode_used"] + left["decode_reserved"],
        "services_alive": alive,
        "latency_seconds": {"p50": _percentile(out.latencies, 50), "p99": _percentile(out.latencies, 99)},  # type: ignore[arg-type]
        "ttft_seconds": {"p50": _percentile(out.ttfts, 50), "p99": _percentile(out.ttfts, 99)},  # type: ignore[arg-type]
        **rss_figures(samples, config),
        "samples": samples,
    }  # fmt: skip


def rss_figures(samples: list[dict[str, Any]], config: SoakConfig) -> dict[str, Any]:
    """RSS growth of each service from the end of the warm-up to the last sample under load, the highest
    sample in between (relative to the same start), and the change once the load is over (the last
    sample, taken after the pages were checked)."""
    warm = next(s for s in samples if s["t"] >= config.warm_up_share * config.duration)
    loaded = [s for s in samples if warm["t"] <= s["t"] <= config.duration]
    start = warm["rss_mib"]

    def relative(rss: dict[str, float]) -> dict[str, float]:
        return {n: rss[n] / start[n] - 1 for n in SERVICES}

    return {
        "warm_up_seconds": warm["t"],
        "rss_growth_after_warm_up": relative(loaded[-1]["rss_mib"]),
        "rss_peak_growth_after_warm_up": relative(
            {n: max(s["rss_mib"][n] for s in loaded) for n in SERVICES}
        ),
        "rss_change_after_the_load": relative(samples[-1]["rss_mib"]),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    ts = [s["t"] / 60 for s in samples]
    fig, (rss, rate) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for node in SERVICES:
        rss.plot(ts, [s["rss_mib"][node] for s in samples], label=node)
    rss.axvline(result["warm_up_seconds"] / 60, color="grey", linestyle=":", label="end of warm-up")
    rss.set_ylabel("RSS (MiB)")
    rss.set_yscale("log")
    rss.legend(fontsize=8)
    c = result["config"]
    rss.set_title(
        f"Soak: {c['clients']} clients, {result['requests']:,} requests, {result['lost']} lost, "
        f"{result['pages_leaked']} pages leaked"
    )
    served = [s["served"] for s in samples]
    rates = [(b - a) / max(tb - ta, 1e-9) / 60 for a, b, ta, tb in zip(served, served[1:], ts, ts[1:])]
    rate.plot(ts[1:], rates)
    rate.set_ylabel("requests served / s")
    rate.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument(
        "--model", help="model folder or .gguf (default: the small llama with SmolLM2's tokenizer)"
    )
    p.add_argument("--load-format", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.png")
    args = p.parse_args(argv)
    config = SoakConfig(duration=args.duration, clients=args.clients, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="kvferry-soak-") as tmp:
        if args.model is None:
            model, load_format = small_model_folder(Path(tmp) / "model"), "dummy"
        else:
            model, load_format = args.model, args.load_format
        cluster = LocalCluster(
            engine_args=engine_args(model, load_format),
            prefill_args=["--kv-cache-bytes", str(128 << 20)],
            decode_args=["--kv-cache-bytes", str(256 << 20)],
            log_dir=Path(tmp) / "logs",
        )
        with cluster:
            cluster.wait_ready(600)
            result = run_soak(cluster, config)
    result["command"] = "python benchmarks/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result["date"] = datetime.date.today().isoformat()
    result["machine"] = (
        f"{platform.machine()}, {psutil.cpu_count()} CPUs shared with other work, {platform.platform()}"
    )
    print(summary(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        plot(result, args.out.with_suffix(".png"))
    return 0 if result["lost"] == 0 and result["pages_leaked"] == 0 else 1


def summary(result: dict[str, Any]) -> str:
    lat, ttft = result["latency_seconds"], result["ttft_seconds"]
    growth = ", ".join(f"{n} {100 * g:+.1f}%" for n, g in result["rss_growth_after_warm_up"].items())
    return (
        f"{result['requests']:,} requests in {result['seconds']:.0f} s: {result['served']:,} served, "
        f"{result['cancelled']} cancelled, {result['refused_bad_input']} bad input refused, {result['lost']} lost; "
        f"{result['pages_leaked']} pages leaked; latency p50 {lat['p50']:.2f} s p99 {lat['p99']:.2f} s, "
        f"TTFT p50 {ttft['p50']:.2f} s p99 {ttft['p99']:.2f} s; RSS after warm-up: {growth}"
    )


if __name__ == "__main__":
    sys.exit(main())
