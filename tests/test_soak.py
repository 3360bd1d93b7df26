"""The soak of benchmarks/soak.py for 60 seconds: 64 clients against real coordinator, prefill and decode
processes (a small random-weight llama with SmolLM2's tokenizer), mixed prompt lengths and kinds,
compression on and off, 5% cancelled and 1% bad input. Nothing is lost, every bad input is refused with
INVALID_ARGUMENT, no page or reservation is left and every service keeps running. The 10-minute run and
its figures are in docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from soak import SoakConfig, engine_args, run_soak, small_model_folder, summary

from kvferry.clients.local_cluster import LocalCluster

pytestmark = pytest.mark.slow


def test_sixty_second_soak_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    config = SoakConfig(duration=60.0, clients=64, seed=19, sample_seconds=2.0)
    cluster = LocalCluster(
        engine_args=engine_args(small_model_folder(tmp_path / "model"), "dummy"),
        prefill_args=["--kv-cache-bytes", str(128 << 20)],
        decode_args=["--kv-cache-bytes", str(256 << 20)],
        log_dir=tmp_path / "logs",
    )
    with cluster:
        cluster.wait_ready(300)
        result = run_soak(cluster, config)
    print("\nsoak: " + summary(result))
    assert result["lost"] == 0, result["lost_examples"]
    assert result["pages_leaked"] == 0 and result["pages_left"]["reservations"] == 0, result["pages_left"]
    assert all(result["services_alive"].values()), result["services_alive"]
    assert result["served"] >= 64  # on average every client was served at least once
    assert result["cancelled"] + result["refused_bad_input"] > 0  # the other paths ran too
    # a minute is short for a flat line; the 10-minute run holds growth under 10%
    assert all(g < 0.25 for g in result["rss_growth_after_warm_up"].values()), result[
        "rss_growth_after_warm_up"
    ]
