"""The coordinator's OpenAI-compatible HTTP front, driven by the official `openai` package (sync, async,
streaming) and by curl for the SSE wire format, against a real cluster: a tiny random llama with a
byte-level tokenizer and a chat template, so chat and text prompts work. Its greedy answers equal the
gRPC API's for the same request; errors are OpenAI error objects with the right HTTP status; a client
that hangs up frees its KV; 32 concurrent streams lose nothing; no page is left behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from builders import TinyModel, with_byte_tokenizer
from cluster import ClusterSpec, InProcessCluster, scrape_url

from kvferry.clients import Client, KvferryRpcError
from kvferry.coordinator.openai_api import response_for
from kvferry.engine.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError

TOKEN = "open-sesame"
MAX_MODEL_LEN = 512
CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Which canal did Eleanor Brandt build?"},
]


@pytest.fixture(scope="module")
def chat_model(tiny_model: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_byte_tokenizer(tiny_model("llama"), tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def cluster(chat_model: Path) -> Iterator[InProcessCluster]:
    spec = ClusterSpec(
        engine=dict(
            model=str(chat_model),
            device="cpu",
            dtype="float32",
            page_size=4,
            prefill_chunk=64,
            max_model_len=MAX_MODEL_LEN,
            kv_cache_bytes=8 << 20,
            torch_threads=1,
        ),
        coordinator=dict(http_port=0, auth_token=TOKEN),
    )
    c = InProcessCluster(spec).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def base_url(cluster: InProcessCluster) -> str:
    return f"http://127.0.0.1:{cluster.hosts['coordinator'].http_port}"


@pytest.fixture(scope="module")
def model_id(chat_model: Path) -> str:
    return chat_model.name  # a folder: its name


@pytest.fixture
def client(cluster: InProcessCluster, base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url + "/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c
    cluster.assert_no_leaks()  # every test leaves both pools empty


def grpc_answer(cluster: InProcessCluster, **request: Any) -> Any:
    with Client(cluster.coordinator_address, token=TOKEN, timeout=60) as c:
        return c.generate(**request)


def test_models_health_and_metrics(client: openai.OpenAI, base_url: str, model_id: str) -> None:
    (card,) = client.models.list().data
    assert card.id == model_id and card.owned_by == "kvferry"
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}  # no token needed
    samples = scrape_url(base_url + "/metrics")  # the coordinator's registry, prometheus_client's parser
    assert 'kvferry_requests_total{outcome="ok"}' in samples


def test_chat_completion_equals_the_grpc_api(
    client: openai.OpenAI, cluster: InProcessCluster, model_id: str
) -> None:
    compression = {"method": "snapkv", "retention": 0.5, "protect_last_user_turn": True}
    reply = client.chat.completions.create(
        model=model_id,
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        extra_body={"compression": compression, "ignore_eos": True},
    )
    expected = grpc_answer(
        cluster, messages=CHAT, compression=compression, max_new_tokens=12, temperature=0, ignore_eos=True
    )
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids) == 12
    assert reply.usage.prompt_tokens == expected.stats.prefill.prompt_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    stats = reply.model_extra["kvferry"]
    assert stats["compression_method"] == "snapkv" and 0 < stats["retention"] < 1
    assert 0 < stats["kv_bytes_shipped"] < stats["kv_bytes_full"]
    assert reply.id == "chatcmpl-" + stats["request_id"] and reply.model == model_id


def test_streamed_chat_completion_with_usage(
    client: openai.OpenAI, cluster: InProcessCluster, model_id: str
) -> None:
    stream = client.chat.completions.create(
        model=model_id,
        messages=CHAT,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"retention": 0.5, "ignore_eos": True},
    )
    chunks = list(stream)
    expected = grpc_answer(
        cluster, messages=CHAT, retention=0.5, max_new_tokens=10, temperature=0, ignore_eos=True
    )
    *content, final, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in [*content, final])
    assert text == expected.text
    assert all(c.choices[0].finish_reason is None for c in content)
    assert final.choices[0].finish_reason == "length"
    assert final.model_extra["kvferry"]["compression_method"] == "compactor"  # retention alone: the default
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.prompt_tokens == expected.stats.prefill.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_auto_retention_and_a_question_through_the_http_api(
    client: openai.OpenAI, cluster: InProcessCluster, model_id: str
) -> None:
    """retention "auto" and a question beside the chat, as extra body fields: what the gRPC API answers."""
    document = [CHAT[0], {"role": "user", "content": "Notes: the canal opened in 1841. " * 12}]
    options = dict(retention="auto", compression={"quality_target": 0.05}, question="When did it open?")
    reply = client.chat.completions.create(
        model=model_id, messages=document, max_completion_tokens=6, temperature=0,
        extra_body={**options, "ignore_eos": True},
    )  # fmt: skip
    expected = grpc_answer(
        cluster, messages=document, max_new_tokens=6, temperature=0, ignore_eos=True, **options
    )
    assert reply.choices[0].message.content == expected.text
    stats, p = reply.model_extra["kvferry"], expected.stats.prefill
    assert stats["chosen_retention"] == p.chosen_retention < 1.0
    assert stats["context_nll"] == p.context_nll and 0 < stats["protected_share"] < 0.5


def test_text_and_token_id_completions_sync_and_async(
    client: openai.OpenAI, cluster: InProcessCluster, base_url: str, model_id: str
) -> None:
    ids = [5 + (7 * i) % 250 for i in range(90)]
    expected_ids = grpc_answer(cluster, prompt=ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    expected_text = grpc_answer(cluster, prompt="The canal opened in", max_new_tokens=8, temperature=0)
    got = client.completions.create(
        model=model_id, prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.object == "text_completion" and got.choices[0].text == expected_ids.text
    assert got.usage.prompt_tokens == 90 and got.usage.completion_tokens == 8

    async def run() -> tuple[Any, str]:
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=TOKEN, max_retries=0) as aclient:
            whole = await aclient.completions.create(
                model=model_id, prompt="The canal opened in", max_tokens=8, temperature=0
            )
            streamed = await aclient.completions.create(
                model=model_id, prompt="The canal opened in", max_tokens=8, temperature=0, stream=True
            )
            return whole, "".join([c.choices[0].text async for c in streamed])

    whole, streamed = asyncio.run(run())
    assert whole.choices[0].text == streamed == expected_text.text
    assert whole.choices[0].finish_reason == expected_text.finish_reason


def test_sse_wire_format_with_curl(base_url: str, model_id: str, cluster: InProcessCluster) -> None:
    body = {"model": model_id, "prompt": [3, 1, 4, 1, 5], "max_tokens": 4, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    out = subprocess.run(
        ["curl", "-sS", "-N", "-i", base_url + "/v1/completions", "-H", f"Authorization: Bearer {TOKEN}",
         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    head, _, events = out.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert events.endswith("\n\n")
    blocks = events.strip("\n").split("\n\n")  # each event: one `data:` line, then a blank line
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "kvferry" in chunks[-1]
    expected = grpc_answer(cluster, prompt=[3, 1, 4, 1, 5], max_new_tokens=4, temperature=0, ignore_eos=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    cluster.assert_no_leaks()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"n": 2}, 400, "n"),
        ({"retenton": 0.5}, 400, "retenton"),  # a misspelt extra_body option is refused, not ignored
        ({"logprobs": True}, 400, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"compression": {"method": "nonsense"}}, 400, "compression.method"),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, 400, None),  # past max_model_len
        ({"messages": []}, 400, "messages"),
        ({"model": "gpt-4o"}, 404, "model"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_bad_requests_get_the_openai_error_object(
    base_url: str,
    model_id: str,
    cluster: InProcessCluster,
    body: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    request = {"model": model_id, "messages": CHAT, "max_tokens": 4, **body}
    reply = httpx.post(
        base_url + "/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    cluster.assert_no_leaks()


def test_the_bearer_token_is_the_grpc_apis(base_url: str, model_id: str, cluster: InProcessCluster) -> None:
    wrong = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model=model_id, messages=CHAT, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    assert err.value.body["code"] == "invalid_api_key"
    for auth in ("", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        reply = httpx.post(
            base_url + "/v1/completions",
            json={"model": model_id, "prompt": [1, 2], "max_tokens": 2},
            headers={"Authorization": auth} if auth else {},
        )
        assert reply.status_code == 401, (auth, reply.text)
    reply = httpx.get(base_url + "/v1/models")
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    cluster.assert_no_leaks()


def test_a_passed_deadline_is_504(client: openai.OpenAI, cluster: InProcessCluster, model_id: str) -> None:
    with cluster.stalled("prefill"), pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model=model_id, messages=CHAT, max_tokens=4, extra_body={"timeout": 0.3}
        )
    assert err.value.status_code == 504 and err.value.body["code"] == "deadline_exceeded"


def test_a_client_that_hangs_up_mid_stream_frees_its_pages(
    base_url: str, model_id: str, cluster: InProcessCluster
) -> None:
    before = scrape_url(base_url + "/metrics")['kvferry_requests_total{outcome="cancelled"}']
    body = {
        "model": model_id,
        "prompt": list(range(1, 60)),
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, headers=headers, timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")  # decoding has started: pages are held on decode
    cluster.assert_no_leaks()
    assert scrape_url(base_url + "/metrics")['kvferry_requests_total{outcome="cancelled"}'] == before + 1


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(
    base_url: str, model_id: str, cluster: InProcessCluster
) -> None:
    """Not streamed: the coordinator notices the hang-up while it waits, and cancels the request."""
    before = scrape_url(base_url + "/metrics")['kvferry_requests_total{outcome="cancelled"}']
    body = {"model": model_id, "prompt": list(range(1, 60)), "max_tokens": 50, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with cluster.stalled("prefill"), pytest.raises(httpx.ReadTimeout):  # no answer can come in time
        httpx.post(base_url + "/v1/completions", json=body, headers=headers, timeout=0.5)
    cluster.assert_no_leaks()
    assert scrape_url(base_url + "/metrics")['kvferry_requests_total{outcome="cancelled"}'] == before + 1


def test_32_concurrent_streams_lose_nothing(cluster: InProcessCluster, base_url: str, model_id: str) -> None:
    prompts = [[1 + (i * 31 + j * 7) % 250 for j in range(20 + 3 * i)] for i in range(32)]
    with Client(cluster.coordinator_address, token=TOKEN, timeout=120) as c:
        expected = [c.generate(p, max_new_tokens=16, temperature=0, ignore_eos=True).text for p in prompts]

    async def one(aclient: openai.AsyncOpenAI, prompt: list[int]) -> tuple[str, str | None]:
        stream = await aclient.completions.create(
            model=model_id, prompt=prompt, max_tokens=16, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, finish = [], None
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    async def run() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=base_url + "/v1", api_key=TOKEN, max_retries=0, timeout=120
        ) as a:
            return await asyncio.gather(*(one(a, p) for p in prompts))

    got = asyncio.run(run())
    assert [t for t, _ in got] == expected
    assert all(f == "length" for _, f in got)
    cluster.assert_no_leaks()


def test_grpc_statuses_map_to_http_statuses() -> None:
    """Where the services refuse for lack of room or nodes: 429 (retry later) or 400 (can never fit),
    503 when no node answers; each with Retry-After where a retry can help."""
    full = response_for(ResourceExhaustedError("pool full", retryable=True))
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert json.loads(full.body)["error"]["type"] == "rate_limit_error"
    never = response_for(ResourceExhaustedError("larger than the pool", field="max_tokens", retryable=False))
    assert never.status_code == 400 and json.loads(never.body)["error"]["param"] == "max_tokens"
    down = response_for(UnavailableError("no decode service answers"))
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    assert response_for(InvalidArgumentError("x", field="stop")).status_code == 400
    assert response_for(RuntimeError("bug")).status_code == 500


def test_grpc_client_still_works_beside_http(cluster: InProcessCluster) -> None:
    with Client(cluster.coordinator_address, timeout=30) as c, pytest.raises(KvferryRpcError) as err:
        c.generate([1, 2, 3], max_new_tokens=2)  # the same token guards both APIs
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_cached_context_through_the_openai_api(
    client: openai.OpenAI, cluster: InProcessCluster, model_id: str
) -> None:
    """cache_context as an extra body field: the second question on the document finds it cached on
    both nodes, reports the reused prompt tokens as OpenAI's cached_tokens, and answers as the gRPC
    API does; a context given as text and a put context's handle work the same way."""
    document = "The Marrowick Canal was built by Eleanor Brandt. " * 4
    extra = {
        "cache_context": True,
        "compression": {"method": "compactor", "retention": 0.5},
        "ignore_eos": True,
    }
    replies = []
    for question in ("Who built it?", "When?"):
        messages = [{"role": "system", "content": document}, {"role": "user", "content": question}]
        reply = client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=6, temperature=0, extra_body=extra
        )
        expected = grpc_answer(
            cluster, messages=messages, compression=extra["compression"], cache_context=True,
            max_new_tokens=6, temperature=0, ignore_eos=True,
        )  # fmt: skip
        assert reply.choices[0].message.content == expected.text
        replies.append(reply)
    first, second = (r.model_extra["kvferry"] for r in replies)
    assert first["context_cache"] == "miss" and second["context_cache"] == "hit"
    assert second["decode_context_cache"] == "hit" and second["context_handle"] == first["context_handle"]
    assert second["context_tokens"] > 0
    cached = replies[1].usage.prompt_tokens_details.cached_tokens
    assert (
        cached
        == second["context_tokens"]
        == replies[1].usage.prompt_tokens - second["prefill_tokens_computed"]
    )
    text = client.completions.create(
        model=model_id, prompt=" Who?", max_tokens=4, temperature=0, extra_body={**extra, "context": document}
    )
    assert text.model_extra["kvferry"]["context_cache"] == "miss"
    with Client(cluster.coordinator_address, token=TOKEN, timeout=60) as c:
        put = c.put_context(document, compression=extra["compression"])
    by_handle = client.completions.create(
        model=model_id, prompt=" Who?", max_tokens=4, temperature=0,
        extra_body={"context_handle": put.handle, "ignore_eos": True},
    )  # fmt: skip
    assert by_handle.model_extra["kvferry"]["context_cache"] == "hit"
    with pytest.raises(openai.BadRequestError) as err:  # both at once
        client.completions.create(
            model=model_id,
            prompt="x",
            max_tokens=2,
            extra_body={"context": "a", "context_handle": put.handle},
        )
    assert err.value.body["param"] == "context"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(
            model=model_id, prompt="x", max_tokens=2, extra_body={"context_handle": "0" * 64}
        )
