"""A real cluster inside the test process: decode, prefill and coordinator gRPC servers on free ports,
served by one asyncio loop on a background thread. Tests talk to it over real gRPC with the public
clients; `assert_no_leaks()` inspects the engines' pools on their own engine threads. One node of each
role by default; `ClusterSpec.nodes` asks for more (hosts "prefill", "prefill-1", ..., "decode-1", ...)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from kvferry.clients.local_cluster import LocalCluster
from kvferry.coordinator import server as coordinator_server
from kvferry.coordinator.settings import CoordinatorSettings
from kvferry.decode_service import server as decode_server
from kvferry.decode_service.settings import DecodeSettings
from kvferry.prefill_service import server as prefill_server
from kvferry.prefill_service.settings import PrefillSettings
from kvferry.serving.server import ServiceHost

T = TypeVar("T")


@dataclass
class ClusterSpec:
    """Engine options shared by both engines, and per-service overrides."""

    engine: dict[str, Any] = field(default_factory=dict)  # EngineSettings fields
    decode: dict[str, Any] = field(default_factory=dict)  # DecodeSettings fields (lease_seconds...)
    prefill: dict[str, Any] = field(default_factory=dict)  # PrefillSettings fields
    server: dict[str, Any] = field(default_factory=dict)  # ServerSettings fields of all three (TLS...)
    coordinator: dict[str, Any] = field(default_factory=dict)  # CoordinatorSettings fields (auth...)
    nodes: dict[str, int] = field(default_factory=lambda: {"prefill": 1, "decode": 1})  # per role


class InProcessCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cluster-loop", daemon=True)
        self.hosts: dict[str, ServiceHost] = {}

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> InProcessCluster:
        self._thread.start()
        self.run(self._start(), timeout)
        return self

    async def _start(self) -> None:
        server = dict(host="127.0.0.1", port=0, grace_seconds=1.0, log_level="WARNING", **self.spec.server)
        common = dict(**server, **self.spec.engine)
        builds = {
            "decode": lambda: decode_server.build(DecodeSettings(**{**common, **self.spec.decode})),
            "prefill": lambda: prefill_server.build(PrefillSettings(**{**common, **self.spec.prefill})),
        }
        for role in ("decode", "prefill"):
            for i in range(self.spec.nodes[role]):
                host = self.hosts[role if i == 0 else f"{role}-{i}"] = builds[role]()
                await host.start()
        await asyncio.gather(*(host.warmed for host in self.hosts.values()))  # type: ignore[arg-type]
        coordinator = coordinator_server.build(
            CoordinatorSettings(
                **{
                    **server,
                    "prefill_addresses": [self.address(n) for n in self.names("prefill")],
                    "decode_addresses": [self.address(n) for n in self.names("decode")],
                    **self.spec.coordinator,
                }
            )
        )
        self.hosts["coordinator"] = coordinator
        await coordinator.start()
        await coordinator.warmed  # type: ignore[misc]

    def names(self, role: str) -> list[str]:
        """The hosts of one role ("prefill" or "decode"), the first one named after the role."""
        return [n for n in self.hosts if n == role or n.startswith(role + "-")]

    def stop(self) -> None:
        async def stop_all() -> None:
            for name in ["coordinator", *self.names("prefill"), *self.names("decode")]:
                if name in self.hosts:
                    await self.hosts[name].stop()

        try:
            self.run(stop_all(), 60.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10.0)

    # ---- access ---------------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the cluster's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.hosts[name].port}"

    @property
    def coordinator_address(self) -> str:
        return self.address("coordinator")

    @property
    def decode(self) -> Any:  # decode_service.decode_engine.DecodeEngine
        return self.hosts["decode"].component

    @property
    def prefill(self) -> Any:  # prefill_service.pipeline.PrefillPipeline
        return self.hosts["prefill"].component

    @contextmanager
    def stalled(self, node: str, limit: float = 60.0) -> Iterator[None]:
        """Hold `node`'s engine thread ("prefill" or "decode") in a command until the block ends (or
        `limit` seconds pass): no step runs meanwhile, so a deadline or cancel inside the block lands
        while its request is still in that engine, however fast the machine is."""
        worker = self.prefill.engine.worker if node == "prefill" else self.decode.worker
        release, holding = threading.Event(), threading.Event()

        def hold(_engine: Any) -> None:
            holding.set()
            release.wait(limit)

        worker.submit(hold)
        if not holding.wait(limit):
            raise TimeoutError(f"the {node} engine thread never took the stall command")
        try:
            yield
        finally:
            release.set()

    def workers(self) -> dict[str, Any]:
        """Each engine host's engine worker (serving.engine_worker.EngineWorker), by host name."""
        out = {}
        for name in [*self.names("prefill"), *self.names("decode")]:
            component = self.hosts[name].component
            out[name] = component.engine.worker if name.startswith("prefill") else component.worker
        return out

    def pool_state(self) -> dict[str, tuple[int, int]]:
        """(pages in use, pages reserved) of each engine's pool, read on its engine thread; pages in use
        leave out those the context cache holds (KVPool.assert_no_leaks tells them apart exactly)."""

        async def read() -> dict[str, tuple[int, int]]:
            state = {}
            for name, worker in self.workers().items():
                state[name] = await worker.call(
                    lambda e: (e.pool.num_used - e.pool.num_cached, e.pool.num_reserved)
                )
            return state

        return self.run(read())

    def reservations(self) -> int:
        return sum(len(self.hosts[n].component.reservations) for n in self.names("decode"))

    def wait_idle(self, timeout: float = 20.0) -> dict[str, tuple[int, int]]:
        """Poll until both pools hold nothing and no reservation is left (frees can trail a reply by a
        step or a lease sweep); returns the last state seen."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.pool_state()
            idle = all(v == (0, 0) for v in state.values()) and self.reservations() == 0
            if idle or time.monotonic() > deadline:
                return state
            time.sleep(0.05)

    def assert_no_leaks(self, timeout: float = 20.0) -> None:
        state = self.wait_idle(timeout)
        assert all(v == (0, 0) for v in state.values()), f"pages still held (used, reserved): {state}"
        assert self.reservations() == 0, "a decode reservation outlived its request"

        async def check() -> None:
            for worker in self.workers().values():
                await worker.call(lambda e: e.pool.assert_no_leaks())
                await worker.call(lambda e: e.context_cache.assert_idle())

        self.run(check())


def tiny_engine(model: Any, **overrides: Any) -> dict[str, Any]:
    """EngineSettings fields for a tiny test model on CPU: small pages and chunks, one thread."""
    settings = dict(
        model=str(model), device="cpu", dtype="float32", page_size=4, prefill_chunk=64, max_model_len=512,
        kv_cache_bytes=2 << 20, torch_threads=1,
    )  # fmt: skip
    return {**settings, **overrides}


def with_overrides(spec: ClusterSpec, **decode: Any) -> ClusterSpec:
    return replace(spec, decode={**spec.decode, **decode})


def scrape_url(url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples, parsed by prometheus_client's own parser, as
    {'name{label="value",...}': value} with the labels in alphabetical order."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version="), reply.headers["Content-Type"]
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


@contextmanager
def process_cluster(model: Path, log_dir: Path, lease_seconds: float) -> Iterator[LocalCluster]:
    """The three services as processes on a tiny CPU model (4-token pages, 64-token chunks, 512
    positions), the decode node's lease `lease_seconds`: what the kill -9 tests take down."""
    engine = ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--page-size", "4",
              "--prefill-chunk", "64", "--max-model-len", "512", "--torch-threads", "1", "--log-level", "INFO"]  # fmt: skip
    c = LocalCluster(
        engine_args=engine,
        decode_args=["--kv-cache-bytes", str(8 << 20), "--lease-seconds", str(lease_seconds)],
        prefill_args=["--kv-cache-bytes", str(4 << 20)],
        coordinator_args=["--info-timeout-seconds", "1"],
        log_dir=log_dir,
    )
    c.start()
    try:
        c.wait_ready(timeout=180)
        yield c
    finally:
        c.stop()
