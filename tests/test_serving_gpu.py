"""On a GPU: coordinator -> prefill -> grpc transport -> decode gives the colocated engine's greedy
tokens exactly, on a random-weight model (load_format dummy, fixed seed) with head_dim 128 and bf16,
at retention 1.0 and 0.5; no page is left behind. Run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cluster import ClusterSpec, InProcessCluster

from clients import Client
from engine import CompressionParams, SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("gpu_model")
    LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=8192,
    ).save_pretrained(path)  # fmt: skip
    return path


ENGINE = dict(device="cuda", dtype="bfloat16", load_format="dummy", kv_cache_bytes=2 << 30, page_size=16)


@pytest.fixture(scope="module")
def gpu_cluster(model_dir: Path) -> Iterator[InProcessCluster]:
    cluster = InProcessCluster(ClusterSpec(engine=dict(model=str(model_dir), **ENGINE))).start()
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("retention", [1.0, 0.5])
def test_gpu_disaggregated_equals_colocated(
    model_dir: Path, gpu_cluster: InProcessCluster, retention: float
) -> None:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 32000, (n,), generator=gen).tolist() for n in (300, 1500, 3000)]
    spec = None if retention == 1.0 else {"method": "compactor", "retention": retention}
    colocated = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE))
    sp = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    with Client(gpu_cluster.coordinator_address, timeout=300) as client:
        for p in prompts:  # one at a time on both sides: the same batch shapes, the same kernels
            seq = colocated.add_request(p, sp, None if spec is None else CompressionParams(**spec))
            while colocated.has_unfinished():
                colocated.step()
            got = client.generate(
                p, compression=spec, temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True
            )
            assert got.token_ids == seq.output_token_ids
            assert len(set(got.token_ids)) > 1  # sharp random weights: not a constant output
    colocated.pool.assert_no_leaks()
    gpu_cluster.assert_no_leaks()
