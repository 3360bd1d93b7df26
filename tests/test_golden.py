"""The golden test on the real model: SmolLM2 chats through coordinator -> prefill -> grpc transport ->
decode give exactly the colocated engine's greedy tokens (compressed and not), the bundled document
question is answered, and no page is left behind on either node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster import ClusterSpec, InProcessCluster

from clients import Client
from clients.cli import BUNDLED_DOCUMENT, BUNDLED_QUESTION, document_messages
from engine import LLM, CompressionParams, SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 32
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    document_messages(BUNDLED_DOCUMENT.read_text(), BUNDLED_QUESTION),
]


@pytest.fixture(scope="module")
def smollm2_cluster() -> Iterator[InProcessCluster]:
    engine = dict(device="cpu", dtype="float32", kv_cache_bytes=256 << 20, prefill_chunk=512)
    cluster = InProcessCluster(ClusterSpec(engine=engine)).start()
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("retention", [None, 0.5])
def test_smollm2_disaggregated_equals_colocated(
    smollm2: LLM, smollm2_cluster: InProcessCluster, retention: float | None
) -> None:
    spec = (
        None
        if retention is None
        else {"method": "compactor", "retention": retention, "protect_last_user_turn": True}
    )
    compression = None if spec is None else CompressionParams(**spec)
    expected = smollm2.generate_chat(
        CHATS, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS), compression=compression
    )
    with Client(smollm2_cluster.coordinator_address, timeout=300) as client:
        for chat, want in zip(CHATS, expected):
            got = client.generate(messages=chat, compression=spec, temperature=0.0, max_new_tokens=NEW_TOKENS)
            assert got.token_ids == want.token_ids
            assert got.text == want.text
            assert got.stats.prefill.prompt_tokens == want.stats.prompt_tokens
    assert "Eleanor Brandt" in expected[2].text
    if retention is not None:
        assert got.stats.prefill.kv_bytes_shipped <= 0.55 * got.stats.prefill.kv_bytes_full
    smollm2_cluster.assert_no_leaks()
