"""The golden test on the real model, with every service its own process on 127.0.0.1: SmolLM2 chats
(one over 2K tokens) through coordinator -> prefill -> grpc transport -> decode give exactly the
colocated engine's greedy tokens, compressed and not (at a ratio, at retention auto, with keep_tokens,
and with the question given beside a document-only user turn); the bytes shipped are the kept pages plus
a small manifest; and afterwards both services report zero used and zero reserved pages. With a cached
context (the document), a hit gives exactly the tokens of a miss on a fresh cache, colocated and
disaggregated, sent whole or by a PutContext handle, at a ratio and at retention auto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import long_document

from kvferry.clients import Client
from kvferry.clients.cli import BUNDLED_DOCUMENT, BUNDLED_QUESTION, document_context, document_messages
from kvferry.clients.local_cluster import LocalCluster
from kvferry.engine import LLM, CompressionParams, SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 32
NEEDLE = "The access code of the north gate is 5093."
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    document_messages(BUNDLED_DOCUMENT.read_text(), BUNDLED_QUESTION),
    document_messages(long_document(90, NEEDLE, seed=7), "What is the access code of the north gate?"),
]


@pytest.fixture(scope="module")
def smollm2_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("logs")
    engine = [
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--kv-cache-bytes",
        str(256 << 20),
        "--context-cache-gib",
        "0.125",  # the bundled document uncompressed (83 MB) fits
        "--torch-threads",
        "1",
    ]
    cluster = LocalCluster(engine, log_dir=Path(logs))
    cluster.start()
    try:
        cluster.wait_ready(timeout=300)
        yield cluster
    finally:
        codes = cluster.stop()
    assert codes == {"decode": 0, "prefill": 0, "coordinator": 0}, codes


@pytest.mark.parametrize("retention", [None, 0.5])
def test_smollm2_disaggregated_equals_colocated(
    smollm2: LLM, smollm2_processes: LocalCluster, retention: float | None
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
    assert expected[2].stats.prompt_tokens >= 2000
    with Client(smollm2_processes.coordinator_address, timeout=300) as client:
        page_bytes = client.info().decode_nodes[0].pool.bytes_per_page
        for chat, want in zip(CHATS, expected):
            got = client.generate(messages=chat, compression=spec, temperature=0.0, max_new_tokens=NEW_TOKENS)
            assert got.token_ids == want.token_ids
            assert got.text == want.text
            p = got.stats.prefill
            assert p.prompt_tokens == want.stats.prompt_tokens
            assert p.kv_bytes_shipped == p.kv_pages * page_bytes
            assert 0 < p.manifest_bytes < 0.01 * p.kv_bytes_shipped
            if retention is None:
                assert p.kv_bytes_shipped == p.kv_bytes_full
            elif p.prompt_tokens > 1000:  # page rounding and protected tokens add a little
                assert 0.45 * p.kv_bytes_full <= p.kv_bytes_shipped <= 0.55 * p.kv_bytes_full
        info = client.info()
    assert "Eleanor Brandt" in expected[1].text and "5093" in expected[2].text
    for node in [*info.prefill_nodes, *info.decode_nodes]:
        assert (node.pool.used_pages, node.pool.reserved_pages) == (0, 0), node


@pytest.mark.parametrize("retention", [None, 0.5, "auto"])
def test_smollm2_a_cached_context_hit_equals_a_miss(
    smollm2: LLM, smollm2_processes: LocalCluster, retention: float | str | None
) -> None:
    document = BUNDLED_DOCUMENT.read_text()
    questions = [BUNDLED_QUESTION, "What did the canal carry?", "When did the canal open?"]
    chats = [document_messages(document, q) for q in questions]
    spec = None if retention is None else {"method": "compactor", "retention": retention}
    compression = None if spec is None else CompressionParams(**spec)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    cache = smollm2.engine.context_cache
    misses = []
    for chat in chats:  # each question alone on an empty cache: a miss
        cache.clear()
        [out] = smollm2.generate_chat([chat], sampling, compression=compression, cache_context=True)
        assert out.stats.context_cache == "miss"
        misses.append(out.token_ids)
    cache.clear()
    hits = smollm2.generate_chat(chats, sampling, compression=compression, cache_context=True)
    assert [o.stats.context_cache for o in hits] == ["miss", "hit", "hit"]
    assert [o.token_ids for o in hits] == misses
    cache.clear()
    assert "Eleanor Brandt" in smollm2.engine.decode_text(misses[0])
    with Client(smollm2_processes.coordinator_address, timeout=300) as client:
        for i, chat in enumerate(chats):
            got = client.generate(
                messages=chat,
                compression=spec,
                cache_context=True,
                temperature=0.0,
                max_new_tokens=NEW_TOKENS,
            )
            assert got.token_ids == misses[i], f"question {i} sent whole"
            if i:
                assert (got.stats.prefill.context_cache, got.stats.decode.context_cache) == ("hit", "hit")
                assert got.stats.prefill.kv_bytes_shipped < 0.05 * got.stats.prefill.kv_bytes
        handle = client.put_context(messages=document_context(document), compression=spec)
        assert handle.cached and handle.hit  # the same context the questions cached
        for i, question in enumerate(questions):
            got = client.generate(
                messages=[{"role": "user", "content": question}], context=handle, temperature=0.0,
                max_new_tokens=NEW_TOKENS,
            )  # fmt: skip
            assert got.token_ids == misses[i], f"question {i} by handle"
            assert got.stats.prefill.context_cache == "hit"
        client.drop_context(handle)
        info = client.info()
    for node in [*info.prefill_nodes, *info.decode_nodes]:
        pool = node.pool
        assert (pool.used_pages - pool.cached_pages, pool.reserved_pages) == (0, 0), node


OPTIONS = {
    "auto": ({"method": "compactor", "retention": "auto", "protect_last_user_turn": True}, None),
    "keep_tokens": ({"method": "snapkv", "keep_tokens": 400, "protect_last_user_turn": True}, None),
    # the usual layout: the document alone in the user turn, the question beside it (always kept)
    "question": ({"method": "compactor", "retention": 0.25}, BUNDLED_QUESTION),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_smollm2_budget_and_question_options_disaggregated_equal_colocated(
    smollm2: LLM, smollm2_processes: LocalCluster, option: str
) -> None:
    spec, question = OPTIONS[option]
    documents = [BUNDLED_DOCUMENT.read_text(), long_document(90, NEEDLE, seed=7)]
    chats = CHATS[1:] if question is None else [[{"role": "user", "content": d}] for d in documents]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS // 2)
    expected = smollm2.generate_chat(
        chats, sampling, compression=CompressionParams(**spec), question=question
    )
    with Client(smollm2_processes.coordinator_address, timeout=300) as client:
        for chat, want in zip(chats, expected):
            got = client.generate(
                messages=chat,
                compression=spec,
                question=question,
                temperature=0.0,
                max_new_tokens=NEW_TOKENS // 2,
            )
            assert got.token_ids == want.token_ids and got.text == want.text
            p, s = got.stats.prefill, want.stats
            assert (p.prompt_tokens, p.kept_tokens, p.protected_tokens) == (
                s.prompt_tokens, s.kept_tokens, s.protected_tokens,
            )  # fmt: skip
            assert p.chosen_retention == pytest.approx(s.chosen_retention) and s.chosen_retention < 1.0
            if option == "auto":
                assert p.context_nll == pytest.approx(s.context_nll)
            if option == "question":
                assert p.protected_share < 0.05  # the question, not the document
        info = client.info()
    if option == "auto":  # the bundled prose reads at ~3 nats: auto keeps most of it
        assert "Eleanor Brandt" in expected[0].text
    for node in [*info.prefill_nodes, *info.decode_nodes]:
        assert (node.pool.used_pages, node.pool.reserved_pages) == (0, 0), node
