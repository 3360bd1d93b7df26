"""Cache-aware routing: requests on the same context go to the nodes that hold it.

The coordinator never tokenizes, so it cannot compute a context's cache handle; it keys a context by
what the request says about it instead: a PutContext handle, or a digest of the explicit context (text
or token ids) or of a conversation's turns before its last user turn, with the compression settings.
Equal keys mean equal cached contexts (the handle is a function of the same things). `ContextRoutes`
remembers, least recently used first out, the prefill and decode nodes that last served each key;
NodePool prefers them while their load stays close to the least loaded node's (`RoutePreference`),
else the request goes by load and the route moves with it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kvferry.v1 import common_pb2

HANDLE_PREFIX = "handle:"


@dataclass
class Route:
    prefill: str  # host:port
    decode: str | None = None  # None until a request on the context reached a decode node


@dataclass(frozen=True)
class RoutePreference:
    """How far a context's nodes may be from the least loaded ones before a request leaves them: a
    prefill node with at most `prefill_slack` more queued requests, a decode node with at least
    `decode_share` of the most available pages."""

    prefill_slack: int = 8
    decode_share: float = 0.25


class ContextRoutes:
    def __init__(self, max_routes: int = 100_000) -> None:
        self.max_routes = max_routes
        self._routes: OrderedDict[str, Route] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def get(self, key: str | None) -> Route | None:
        if key is None:
            return None
        route = self._routes.get(key)
        if route is not None:
            self._routes.move_to_end(key)
        return route

    def record(self, key: str | None, prefill: str, decode: str | None = None) -> None:
        if key is None:
            return
        route = self._routes.get(key)
        if route is None or route.prefill != prefill:
            route = Route(prefill, decode)
        elif decode is not None:
            route.decode = decode
        self._routes[key] = route
        self._routes.move_to_end(key)
        while len(self._routes) > self.max_routes:
            self._routes.popitem(last=False)

    def forget(self, key: str) -> None:
        self._routes.pop(key, None)


def request_key(request: Any, caching: bool) -> str | None:
    """The context key of a GenerateRequest / GenerateUnaryRequest, or None when it has no cached
    context (`caching`: whether it caches, its cache_context or the prefill nodes' default)."""
    if request.HasField("context") and request.context.WhichOneof("source") == "handle":
        return HANDLE_PREFIX + request.context.handle
    cached = request.cache_context if request.HasField("cache_context") else caching
    if not cached:
        return None
    compression = request.compression if request.HasField("compression") else None
    if request.HasField("context"):
        return _content_key(request.context, compression)
    if request.WhichOneof("input") != "messages":
        return None
    turns = list(request.messages.messages)
    users = [i for i, m in enumerate(turns) if m.role == "user"]
    if not users or users[-1] == 0:
        return None  # no turn before the last user turn: no context
    return _digest("chat", common_pb2.ChatMessages(messages=turns[: users[-1]]), compression)


def put_key(request: common_pb2.PutContextRequest) -> str:
    """The context key of a PutContext: the key of requests that send the same context themselves."""
    compression = request.compression if request.HasField("compression") else None
    which = request.WhichOneof("input")
    if which == "messages":
        return _digest("chat", request.messages, compression)
    source = (
        common_pb2.Context(text=request.text)
        if which == "text"
        else common_pb2.Context(token_ids=request.token_ids)
    )
    return _content_key(source, compression)


def _content_key(context: common_pb2.Context, compression: common_pb2.CompressionParams | None) -> str:
    if context.WhichOneof("source") == "text":
        return _digest("text", common_pb2.Context(text=context.text), compression)
    return _digest("ids", common_pb2.Context(token_ids=context.token_ids), compression)


def _digest(kind: str, message: Any, compression: common_pb2.CompressionParams | None) -> str:
    digest = hashlib.sha256(kind.encode())
    digest.update(message.SerializeToString(deterministic=True))
    digest.update(b"|")
    if compression is not None:
        digest.update(compression.SerializeToString(deterministic=True))
    return f"{kind}:{digest.hexdigest()}"
