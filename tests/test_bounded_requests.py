"""Oversized prompts against real processes running the bundled SmolLM2 (a real tokenizer): each is
refused with INVALID_ARGUMENT in well under a second, before it is tokenized (tokenizing a 10 MB prompt
took 7-24 s of CPU), and the prefill service's memory comes back (its RSS went from 3.5 to 9.6 GB over
13 such prompts). The full run, 100 prompts, is `benchmarks/oversized_prompts.py` (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from oversized_prompts import refuse_oversized

from kvferry.clients.local_cluster import LocalCluster

pytestmark = pytest.mark.slow


def test_oversized_prompts_are_refused_at_once_and_their_memory_given_back(tmp_path: Path) -> None:
    engine = ["--device", "cpu", "--kv-cache-bytes", str(64 << 20), "--torch-threads", "1"]
    with LocalCluster(engine_args=engine, log_dir=tmp_path) as cluster:
        cluster.wait_ready(600)
        result = refuse_oversized(cluster, prompts=16, prompt_bytes=10 << 20, warm_up=4)
    assert result["codes"] == ["INVALID_ARGUMENT"]
    assert result["max_seconds"] < 5.0  # 10 MiB travels client -> coordinator -> prefill and is refused
    growth = result["growth_after_warm_up"]
    assert growth["prefill"] < 0.05 and growth["decode"] < 0.05, growth
    assert growth["coordinator"] < 0.5, growth  # a small heap: gRPC's buffers for one such message, no more
