"""Cached contexts through the services (issue 21), on the tiny random llama over real gRPC: the
prefill node computes a context once and prefills only the questions after it; the decode node keeps
the context's pages too, so a hit on both nodes ships just the question's pages (shm and grpc), and
concurrent questions on one document hold its pages once; PutContext / DropContext and handles
(NOT_FOUND once dropped); contexts too large for the cache and a cache full of contexts in use are
served uncached; every greedy answer equals the colocated engine's, and nothing leaks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from builders import TinyModel
from cluster import ClusterSpec, InProcessCluster, scrape_url

from kvferry.clients import Client, ContextHandle, KvferryRpcError
from kvferry.engine import CompressionParams, SamplingParams
from kvferry.engine.llm_engine import LLMEngine
from kvferry.engine.sequence import SequenceStatus

PAGE_SIZE = 4
CHUNK = 64
MAX_MODEL_LEN = 512
LAYERS, KV_HEADS = 2, 2
PAGE_BYTES = 2 * PAGE_SIZE * 16 * 4  # K and V of 4 tokens, head_dim 16, float32
COMPACTOR = {"method": "compactor", "retention": 0.5}


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model("llama")


def spec(tiny: TinyModel, transport: str = "auto", **engine: Any) -> ClusterSpec:
    return ClusterSpec(
        engine=dict(
            model=str(tiny.path),
            device="cpu",
            dtype="float32",
            page_size=PAGE_SIZE,
            prefill_chunk=CHUNK,
            max_model_len=MAX_MODEL_LEN,
            kv_cache_bytes=4 << 20,
            torch_threads=1,
            **engine,
        ),  # fmt: skip
        decode=dict(lease_seconds=10.0, max_chunk_bytes=64 << 10),
        prefill=dict(transport=transport, chunk_bytes=16 << 10, metrics_port=0),
    )


@pytest.fixture(scope="module", params=["shm", "grpc"])
def cluster(request: pytest.FixtureRequest, tiny: TinyModel) -> Iterator[InProcessCluster]:
    c = InProcessCluster(spec(tiny, request.param)).start()
    yield c
    c.stop()


@pytest.fixture
def client(cluster: InProcessCluster) -> Iterator[Client]:
    with Client(cluster.coordinator_address, timeout=60) as c:
        yield c
    cluster.assert_no_leaks()
    clear_caches(cluster)


def clear_caches(cluster: InProcessCluster) -> None:
    """Each test starts with cold caches."""

    async def clear() -> None:
        for worker in (cluster.prefill.engine.worker, cluster.decode.worker):
            await worker.call(lambda e: e.context_cache.clear())

    cluster.run(clear())


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh(
    tiny: TinyModel, context: list[int], question: list[int], n: int, compression: Any = COMPACTOR
) -> list[int]:
    """The request alone on a fresh colocated engine (a miss): what every answer must equal."""
    engine = tiny.engine(page_size=PAGE_SIZE, prefill_chunk=CHUNK, max_model_len=MAX_MODEL_LEN)
    sp = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    params = None if compression is None else CompressionParams(**compression)
    seq = engine.add_request(context + question, sp, params, context_len=len(context), cache_context=True)
    while engine.has_unfinished():
        engine.step()
    assert seq.stats.context_cache == "miss"
    engine.pool.assert_no_leaks()
    return seq.output_token_ids


def ask(client: Client, context: Any, question: list[int], n: int = 8, **options: Any) -> Any:
    options = {"compression": COMPACTOR, **options}
    return client.generate(
        question, context=context, cache_context=True, max_new_tokens=n, temperature=0, ignore_eos=True,
        **options,
    )  # fmt: skip


def own_pages(context_len: int, question: list[int]) -> int:
    """Pages of a request's own tokens after its cached context (the cached part is whole pages)."""
    cached = context_len // PAGE_SIZE * PAGE_SIZE
    return -(-(context_len - cached + len(question)) // PAGE_SIZE) * LAYERS * KV_HEADS


# ---- the golden path --------------------------------------------------------------------------------
def test_a_hit_on_both_nodes_ships_only_the_question(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    context = tokens(150, seed=1, vocab=tiny.vocab_size)  # 148 tokens cached
    questions = [tokens(n, seed=n, vocab=tiny.vocab_size) for n in (7, 30, 70)]  # 70: two chunks
    results = [ask(client, context, q) for q in questions]
    caches = [(r.stats.prefill.context_cache, r.stats.decode.context_cache) for r in results]
    assert caches == [("miss", "miss"), ("hit", "hit"), ("hit", "hit")]
    handle = results[0].stats.prefill.context_handle
    assert len(handle) == 64 and all(r.stats.prefill.context_handle == handle for r in results)
    info = client.info()
    prefill_cache, decode_cache = info.prefill_nodes[0].context_cache, info.decode_nodes[0].context_cache
    assert (prefill_cache.device_entries, decode_cache.device_entries) == (1, 1)
    context_pages = prefill_cache.device_bytes // PAGE_BYTES
    assert decode_cache.device_bytes == prefill_cache.device_bytes
    for r, q in zip(results, questions):
        p = r.stats.prefill
        assert r.token_ids == fresh(tiny, context, q, 8)
        assert p.context_tokens == 148 and p.context_kept_tokens < 148 * LAYERS * KV_HEADS
        hit = p.context_cache == "hit"
        assert p.prefill_tokens_computed == len(context) + len(q) - (148 if hit else 0)
        shipped = own_pages(len(context), q) + (0 if hit else context_pages)
        assert p.kv_bytes_shipped == shipped * PAGE_BYTES == r.stats.decode.kv_bytes_received
        assert p.transport == cluster.spec.prefill["transport"]
    stats = client.stats()
    assert (stats.context_hits_total, stats.context_misses_total) == (2, 1)
    assert (stats.decode_context_hits_total, stats.decode_context_misses_total) == (2, 1)


def test_put_context_then_questions_by_handle(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    context = tokens(100, seed=2, vocab=tiny.vocab_size)
    put = client.put_context(context, compression=COMPACTOR)
    assert put.cached and not put.hit and put.context_tokens == 100 and put.cached_tokens == 100
    assert 0 < put.kept_tokens < 100 * LAYERS * KV_HEADS and put.prefill_node == cluster.address("prefill")
    assert client.put_context(context, compression=COMPACTOR).hit  # the same context again: nothing computed
    questions = [tokens(9, seed=3, vocab=tiny.vocab_size), tokens(20, seed=4, vocab=tiny.vocab_size)]
    results = [ask(client, put, q, compression=None) for q in questions]
    assert [r.stats.prefill.context_cache for r in results] == ["hit", "hit"]  # computed by the put
    assert [r.stats.decode.context_cache for r in results] == ["miss", "hit"]
    for r, q in zip(results, questions):
        assert r.token_ids == fresh(tiny, context, q, 8)
        assert r.stats.prefill.context_handle == put.handle
    by_name = ask(client, ContextHandle(put.handle), questions[0], compression=None)
    assert by_name.token_ids == results[0].token_ids
    with pytest.raises(KvferryRpcError) as err:  # the context's compression is the put's
        ask(client, put, questions[0])
    assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "compression")
    client.drop_context(put)
    with pytest.raises(KvferryRpcError) as err:
        ask(client, put, questions[0], compression=None)
    assert (err.value.code, err.value.field) == (grpc.StatusCode.NOT_FOUND, "context.handle")
    with pytest.raises(KvferryRpcError) as err:
        client.drop_context(put.handle)
    assert (err.value.code, err.value.field) == (grpc.StatusCode.NOT_FOUND, "handle")
    info = client.info()
    assert info.prefill_nodes[0].context_cache.device_entries == 0
    assert info.decode_nodes[0].context_cache.device_entries == 0


def test_auto_retention_is_chosen_once_per_cached_context(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    """retention="auto" keys the cache by its settings, not by a number: the miss chooses the context's
    retention from its NLL, every hit reuses those pages and reports the same choice, and the answers
    equal a fresh engine's."""
    auto = {"method": "compactor", "retention": "auto"}
    context = tokens(150, seed=5, vocab=tiny.vocab_size)
    questions = [tokens(9, seed=6, vocab=tiny.vocab_size), tokens(21, seed=7, vocab=tiny.vocab_size)]
    results = [ask(client, context, q, compression=auto) for q in questions]
    assert [r.stats.prefill.context_cache for r in results] == ["miss", "hit"]
    miss, hit = (r.stats.prefill for r in results)
    assert 0 < miss.chosen_retention <= 1 and hit.chosen_retention == miss.chosen_retention
    assert hit.context_kept_tokens == miss.context_kept_tokens and hit.context_handle == miss.context_handle
    for r, q in zip(results, questions):
        assert r.token_ids == fresh(tiny, context, q, 8, auto)
    # a fixed retention is another cache entry, even at the number auto chose
    fixed = ask(client, context, questions[0], compression={"method": "compactor", "retention": 0.5})
    assert (
        fixed.stats.prefill.context_cache == "miss"
        and fixed.stats.prefill.context_handle != miss.context_handle
    )


def test_the_policy_fills_a_put_and_leaves_requests_on_its_handle_alone(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    from kvferry.serving.compression_policy import CompressionPolicy

    servicer = cluster.hosts["coordinator"].component
    servicer.policy = CompressionPolicy.from_settings("compactor", "0.5", None)
    try:
        context = tokens(100, seed=8, vocab=tiny.vocab_size)
        put = client.put_context(context)  # no compression: the policy's
        kept_per_head = -(-50 // PAGE_SIZE) * PAGE_SIZE  # half, whole pages
        assert put.cached and put.kept_tokens == kept_per_head * LAYERS * KV_HEADS
        question = tokens(9, seed=9, vocab=tiny.vocab_size)
        got = ask(client, put, question, compression=None)  # the policy must not set compression here
        assert got.stats.prefill.context_cache == "hit"
        assert got.token_ids == fresh(tiny, context, question, 8)
        client.drop_context(put)
    finally:
        servicer.policy = CompressionPolicy()


@pytest.mark.parametrize(
    ("call", "code", "field"),
    [
        (dict(compression={"method": "snapkv", "retention": 0.5}), "INVALID_ARGUMENT", "compression.method"),
        (dict(context=[]), "INVALID_ARGUMENT", "prompt"),
        (dict(context=[7] * 600), "INVALID_ARGUMENT", "prompt"),
        (dict(context=ContextHandle("f" * 64)), "NOT_FOUND", "context.handle"),
    ],
)
def test_bad_context_requests_name_the_field(
    tiny: TinyModel, client: Client, call: dict[str, Any], code: str, field: str
) -> None:
    call = {"context": tokens(40, seed=5, vocab=tiny.vocab_size), **call}
    with pytest.raises(KvferryRpcError) as err:
        ask(client, call.pop("context"), [1, 2, 3], **call)
    assert (err.value.code.name, err.value.field) == (code, field)


def test_a_put_with_a_query_aware_method_is_refused(tiny: TinyModel, client: Client) -> None:
    with pytest.raises(KvferryRpcError) as err:
        client.put_context(tokens(40, seed=6, vocab=tiny.vocab_size), compression="snapkv", retention=0.5)
    assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "compression.method")


# ---- sharing on the decode node ---------------------------------------------------------------------
class DecodeHeld:
    """Holds the decode engine's decode steps (its scheduler finds no work) while it still takes
    commands (ReserveKV, commits): requests pile up committed, deterministically."""

    def __init__(self, cluster: InProcessCluster) -> None:
        self.cluster = cluster
        self.open = threading.Event()

    def __enter__(self) -> DecodeHeld:
        def hold(engine: LLMEngine) -> None:
            schedule = engine.scheduler.schedule
            engine.scheduler.schedule = lambda: schedule() if self.open.is_set() else None  # type: ignore[method-assign]
            self._restore = lambda: setattr(engine.scheduler, "schedule", schedule)

        self.cluster.run(self.cluster.decode.worker.call(hold))
        return self

    def read(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return self.cluster.run(self.cluster.decode.worker.call(fn))

    def __exit__(self, *exc: object) -> None:
        self.open.set()
        self.cluster.run(self.cluster.decode.worker.call(lambda e: self._restore()))


def test_concurrent_questions_hold_the_context_once_on_the_decode_node(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    context = tokens(200, seed=7, vocab=tiny.vocab_size)
    questions = [tokens(5 + i, seed=10 + i, vocab=tiny.vocab_size) for i in range(4)]
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = ask(client, context, questions[i], n=6)

    with DecodeHeld(cluster) as held:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while held.read(lambda e: sum(s.status == SequenceStatus.DECODE for s in e.requests.values())) < 4:
            assert time.monotonic() < deadline, "the four requests never all reached the decode batch"
            time.sleep(0.02)

        def accounting(engine: LLMEngine) -> tuple[int, int, int, list[int]]:
            (entry,) = [s.context_entry for s in engine.requests.values()][:1]
            own = sum(s.kv.num_pages_held - entry.num_pages for s in engine.requests.values())  # type: ignore[union-attr]
            return engine.pool.num_used, entry.num_pages, own, engine.pool.holders(entry.page_ids()).tolist()

        used, context_pages, own, holders = held.read(accounting)
        assert used == context_pages + own  # the document's pages once, whatever the number of questions
        assert holders == [5] * context_pages  # the cache and the four requests
    for t in threads:
        t.join(60)
    assert sorted(r.stats.decode.context_cache for r in results.values()) == ["hit", "hit", "hit", "miss"]
    assert sorted(r.stats.prefill.context_cache for r in results.values()) == ["hit", "hit", "hit", "miss"]
    for i, q in enumerate(questions):
        assert results[i].token_ids == fresh(tiny, context, q, 6)


# ---- limits -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_caches(tiny: TinyModel) -> Iterator[InProcessCluster]:
    """Context caches of 40 pages on both nodes: a 64-token context at retention 0.5 (32 pages) fits
    one at a time, a 200-token one (100 pages) never."""
    s = spec(tiny, "shm")
    s.prefill["context_cache_gib"] = s.decode["context_cache_gib"] = 40 * PAGE_BYTES / (1 << 30)
    c = InProcessCluster(s).start()
    yield c
    c.stop()


def test_a_context_larger_than_the_budget_is_served_uncached(
    tiny: TinyModel, small_caches: InProcessCluster
) -> None:
    context = tokens(200, seed=20, vocab=tiny.vocab_size)
    q = tokens(6, seed=21, vocab=tiny.vocab_size)
    with Client(small_caches.coordinator_address, timeout=60) as client:
        for _ in range(2):  # computed again each time, never an error
            r = ask(client, context, q)
            assert r.token_ids == fresh(tiny, context, q, 8)
            assert r.stats.prefill.context_cache == "miss" and r.stats.decode.context_cache == "off"
            assert r.stats.prefill.kv_bytes_shipped == r.stats.prefill.kv_bytes  # the whole KV travelled
        put = client.put_context(context, compression=COMPACTOR)
        assert not put.cached and put.kept_tokens == 0  # the handle still works, uncached
        r = ask(client, put, q, compression=None)
        assert r.token_ids == fresh(tiny, context, q, 8) and r.stats.prefill.context_cache == "miss"
        client.drop_context(put)
    small_caches.assert_no_leaks()


def test_a_decode_cache_full_of_contexts_in_use_receives_new_ones_privately(
    tiny: TinyModel, small_caches: InProcessCluster
) -> None:
    """Two documents of 64 tokens (32 pages each at retention 0.5): the prefill node caches one at a
    time, the decode node holds the first for a request it is decoding and keeps the second's pages
    for its own request alone."""
    docs = [tokens(64, seed=30 + i, vocab=tiny.vocab_size) for i in range(2)]
    q = tokens(5, seed=33, vocab=tiny.vocab_size)
    results: dict[int, Any] = {}
    with Client(small_caches.coordinator_address, timeout=60) as client:

        def one(i: int) -> None:
            results[i] = ask(client, docs[i], q, n=6)

        with DecodeHeld(small_caches) as held:
            first = threading.Thread(target=one, args=(0,))
            first.start()
            deadline = time.monotonic() + 30
            while held.read(lambda e: len(e.requests)) < 1 or held.read(lambda e: e.pool.num_cached) == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            second = threading.Thread(target=one, args=(1,))
            second.start()
            while (
                held.read(lambda e: sum(s.status == SequenceStatus.DECODE for s in e.requests.values())) < 2
            ):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            state = held.read(lambda e: e.context_cache_state())
            assert (state.device_entries, state.pinned_entries) == (1, 1)  # the second was kept privately
        first.join(60)
        second.join(60)
    assert [results[i].stats.decode.context_cache for i in (0, 1)] == ["miss", "miss"]
    for i in (0, 1):
        assert results[i].token_ids == fresh(tiny, docs[i], q, 6)
    small_caches.assert_no_leaks()


def test_a_deadline_during_a_cached_handoff_frees_everything(
    tiny: TinyModel, cluster: InProcessCluster, client: Client
) -> None:
    """The decode engine thread is held while a request on a cached context waits for its ReserveKV:
    the deadline passes there, and the prefill node's pin, the decode node's claim and every page go."""
    context = tokens(120, seed=40, vocab=tiny.vocab_size)
    q = tokens(5, seed=41, vocab=tiny.vocab_size)
    ask(client, context, q)  # cached on both nodes
    with cluster.stalled("decode"), pytest.raises(KvferryRpcError) as err:
        ask(client, context, q, timeout=1.0)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    other = tokens(120, seed=42, vocab=tiny.vocab_size)  # a context the decode node must receive
    with cluster.stalled("decode"), pytest.raises(KvferryRpcError):
        ask(client, other, q, timeout=1.0)
    cluster.assert_no_leaks()  # pins and claims included (ContextCache.assert_idle)
    assert ask(client, other, q).token_ids == fresh(tiny, other, q, 8)


def test_context_cache_metrics(tiny: TinyModel, cluster: InProcessCluster, client: Client) -> None:
    context = tokens(100, seed=50, vocab=tiny.vocab_size)
    for seed in (51, 52):
        ask(client, context, tokens(4, seed=seed, vocab=tiny.vocab_size))
    prefill = scrape_url(f"http://127.0.0.1:{cluster.hosts['prefill'].metrics_port}/metrics")
    assert (
        prefill["kvferry_context_cache_hits_total"] >= 1
        and prefill["kvferry_context_cache_misses_total"] >= 1
    )
    assert prefill['kvferry_context_cache_bytes{tier="device"}'] > 0
    assert prefill['kvferry_context_cache_budget_bytes{tier="device"}'] == (4 << 20) // 4
    assert (
        'kvferry_context_cache_entries{tier="host"}' in prefill
        and "kvferry_context_cache_evictions_total" in prefill
    )
    assert prefill['kvferry_context_pages_shipped_total{decode_cache="hit"}'] >= 1


# ---- routing --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_by_two(tiny: TinyModel) -> Iterator[InProcessCluster]:
    s = spec(tiny, "shm")
    s.nodes = {"prefill": 2, "decode": 2}
    c = InProcessCluster(s).start()
    yield c
    c.stop()


def test_requests_on_a_context_go_to_the_nodes_that_hold_it(
    tiny: TinyModel, two_by_two: InProcessCluster
) -> None:
    docs = [tokens(100, seed=60 + i, vocab=tiny.vocab_size) for i in range(3)]
    with Client(two_by_two.coordinator_address, timeout=60) as client:
        runs = [
            (d, ask(client, docs[d], tokens(4, seed=70 + i, vocab=tiny.vocab_size)))
            for i in range(4)
            for d in range(3)
        ]
        put = client.put_context(tokens(80, seed=80, vocab=tiny.vocab_size), compression=COMPACTOR)
        by_handle = [
            ask(client, put, tokens(4, seed=81 + i, vocab=tiny.vocab_size), compression=None)
            for i in range(3)
        ]
        # a coordinator that forgot where the handle lives finds it on the prefill nodes
        two_by_two.hosts["coordinator"].component.routes.forget("handle:" + put.handle)
        found = ask(client, put, tokens(4, seed=85, vocab=tiny.vocab_size), compression=None)
    for d in range(3):
        served = [r.stats for doc, r in runs if doc == d]
        assert len({(s.prefill_node, s.decode_node) for s in served}) == 1, "one context, one pair of nodes"
        assert [s.prefill.context_cache for s in served] == ["miss", "hit", "hit", "hit"]
        assert [s.decode.context_cache for s in served] == ["miss", "hit", "hit", "hit"]
    assert {r.stats.prefill_node for r in by_handle} == {put.prefill_node}
    assert [r.stats.prefill.context_cache for r in by_handle] == ["hit"] * 3
    assert found.stats.prefill.context_cache == "hit" and found.stats.prefill_node == put.prefill_node
    two_by_two.assert_no_leaks()


def test_the_route_keys_agree_without_tokenizing() -> None:
    from kvferry.clients.requests import GENERATE, build_put_context, build_request
    from kvferry.coordinator.context_routes import put_key, request_key

    doc = [{"role": "system", "content": "Read this."}]
    chat = build_request(GENERATE, None, [*doc, {"role": "user", "content": "q"}], "compactor", 0.5, None, {})
    other = build_request(
        GENERATE, None, [*doc, {"role": "user", "content": "r"}], "compactor", 0.5, None, {}
    )
    assert request_key(chat, caching=False) is None  # caching neither asked for nor the nodes' default
    assert (
        request_key(chat, caching=True)
        == request_key(other, caching=True)
        == put_key(build_put_context(None, doc, "compactor", 0.5, None))
    )
    assert request_key(chat, caching=True) != put_key(build_put_context(None, doc, "compactor", 0.25, None))
    text = build_request(GENERATE, "q", None, None, None, None, {}, context="the doc", cache_context=True)
    assert request_key(text, caching=False) == put_key(build_put_context("the doc", None, None, None, None))
    one_turn = build_request(GENERATE, None, [{"role": "user", "content": "q"}], None, None, None, {})
    assert request_key(one_turn, caching=True) is None  # nothing before the last user turn


def test_a_context_leaves_its_nodes_when_they_are_much_busier() -> None:
    from kvferry.coordinator.context_routes import RoutePreference
    from kvferry.coordinator.nodes import NodePool
    from kvferry.v1 import prefill_pb2

    async def check() -> None:  # the pool's channels belong to a running loop
        pool = NodePool(
            ["p0:1", "p1:1"],
            ["d0:1", "d1:1"],
            1.0,
            preference=RoutePreference(prefill_slack=2, decode_share=0.5),
        )
        try:
            p0, p1 = pool.prefill
            ranked = [
                (p1, prefill_pb2.PrefillInfoResponse(queue_depth=1)),
                (p0, prefill_pb2.PrefillInfoResponse(queue_depth=3)),
            ]
            assert pool.preferred_prefill(ranked, "p0:1") is p0  # within the slack: stays
            ranked[1][1].queue_depth = 4
            assert pool.preferred_prefill(ranked, "p0:1") is p1  # beyond it: by load
            d0, d1 = pool.decode
            assert pool.preferred_decode([(d1, 100), (d0, 60)], "d0:1") is d0
            assert pool.preferred_decode([(d1, 100), (d0, 40)], "d0:1") is d1
            assert pool.preferred_decode([(d1, 100), (d0, 60)], None) is d1
        finally:
            await pool.close()

    asyncio.run(check())


# ---- the command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_cluster(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCluster]:
    """The tiny llama with a byte-level tokenizer and a chat template: text and chats work."""
    from builders import with_byte_tokenizer

    s = spec(tiny, "shm")
    s.engine["model"] = str(with_byte_tokenizer(tiny, tmp_path_factory.mktemp("tiny_chat")))
    c = InProcessCluster(s).start()
    yield c
    c.stop()


def test_ask_puts_the_document_once_for_several_questions(chat_cluster: InProcessCluster) -> None:
    import io

    from kvferry.clients import cli

    out = io.StringIO()
    document = "The Marrowick Canal was built by Eleanor Brandt in 1791. " * 3
    questions = ["Who built the canal?", "When?", "Where?"]
    assert cli.ask(chat_cluster.coordinator_address, document, questions, COMPACTOR, 5, out=out) == 0
    text = out.getvalue()
    assert text.startswith("[document put once: ") and "tokens cached" in text
    summaries = [line for line in text.splitlines() if line.startswith("[") and "prompt tokens" in line]
    assert len(summaries) == 3 and all(f"Q{i + 1}: {q}" in text for i, q in enumerate(questions))
    assert "context hit on prefill, miss on decode" in summaries[0]  # the put computed it
    assert all("context hit on prefill, hit on decode" in s for s in summaries[1:])
    with Client(chat_cluster.coordinator_address, timeout=60) as client:  # sending the whole chat instead
        for i, question in enumerate(questions):
            whole = client.generate(
                messages=cli.document_messages(document, question), compression=COMPACTOR,
                cache_context=True, max_new_tokens=5, temperature=0,
            )  # fmt: skip
            assert f"A{i + 1}: {whole.text}\n" in text
    stats = io.StringIO()
    cli.print_stats(chat_cluster.coordinator_address, out=stats)
    lines = stats.getvalue()
    assert "cached contexts: prefill " in lines and lines.count("context cache: 1 in the pool") == 2
    assert "1 put" in lines
    chat_cluster.assert_no_leaks()
