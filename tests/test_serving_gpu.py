"""On GPUs: coordinator -> prefill -> transport -> decode gives the colocated engine's greedy tokens
exactly, on a random-weight model (load_format dummy, fixed seed) with head_dim 128 and bf16, at
retention 1.0 and 0.5; no page is left behind. In one process (grpc: CUDA IPC needs two processes),
and as three processes over cuda_ipc on one GPU, cuda_ipc across two GPUs and nccl across two GPUs.
Run with `pytest -m gpu` on a GPU machine (the two-GPU cases skip on one GPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cluster import ClusterSpec, InProcessCluster

from kvferry.clients import Client
from kvferry.clients.local_cluster import LocalCluster
from kvferry.engine import CompressionParams, SamplingParams
from kvferry.engine.config import EngineConfig
from kvferry.engine.llm_engine import LLMEngine
from kvferry.v1 import decode_pb2, decode_pb2_grpc

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


DEVICE_TRANSPORTS = [("cuda_ipc", 0, 0), ("cuda_ipc", 0, 1), ("nccl", 0, 1), ("auto", 0, 1)]


@pytest.mark.parametrize("transport, prefill_gpu, decode_gpu", DEVICE_TRANSPORTS)
def test_gpu_processes_over_device_transports_equal_colocated(
    model_dir: Path, tmp_path: Path, transport: str, prefill_gpu: int, decode_gpu: int
) -> None:
    if torch.cuda.device_count() <= max(prefill_gpu, decode_gpu):
        pytest.skip("needs two GPUs")
    import grpc

    common = [
        "--model", str(model_dir), "--load-format", "dummy", "--dtype", "bfloat16",
        "--kv-cache-bytes", str(2 << 30), "--page-size", "16",
    ]  # fmt: skip
    cluster = LocalCluster(
        common,
        decode_args=["--device", f"cuda:{decode_gpu}"],
        prefill_args=["--device", f"cuda:{prefill_gpu}", "--transport", transport],
        log_dir=tmp_path,
        env={"NCCL_NVLS_ENABLE": "0"},
    )
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, 32000, (n,), generator=gen).tolist() for n in (200, 2000, 5000)
    ]  # 5000: three chunks, an early reservation
    colocated = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE))
    sp = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    expected_transport = "cuda_ipc" if transport == "auto" else transport  # auto: peer access on one host
    with cluster:
        cluster.wait_ready(timeout=600)
        with Client(cluster.coordinator_address, timeout=300) as client:
            for retention in (1.0, 0.5):
                spec = None if retention == 1.0 else {"method": "compactor", "retention": retention}
                for p in prompts:
                    seq = colocated.add_request(p, sp, None if spec is None else CompressionParams(**spec))
                    while colocated.has_unfinished():
                        colocated.step()
                    got = client.generate(
                        p, compression=spec, temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True
                    )
                    assert got.token_ids == seq.output_token_ids, (transport, retention, len(p))
                    s = got.stats
                    assert s.prefill.transport == expected_transport
                    assert s.prefill.kv_bytes_shipped == s.prefill.kv_bytes == s.decode.kv_bytes_received > 0
        with grpc.insecure_channel(cluster.address("decode")) as channel:
            pool = (
                decode_pb2_grpc.DecodeServiceStub(channel)
                .Info(decode_pb2.DecodeInfoRequest(), timeout=30)
                .pool
            )
        assert (pool.used_pages, pool.reserved_pages) == (0, 0)
    colocated.pool.assert_no_leaks()
