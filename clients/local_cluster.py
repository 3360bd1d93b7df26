"""A coordinator, a prefill and a decode service as child processes on this machine (`kvferry up`).

Each service is its own process, started exactly as a user would (`python -m decode_service ...`), so
the cluster behaves like a deployed one: real gRPC between processes, KV shipped over the transport
the prefill service picks (auto by default: cuda_ipc between GPUs of this host, shm between CPU
engines; `ClusterOptions.transport` names one). `wait_ready` polls the standard health service until every node reports SERVING.
On Linux each child arms a parent-death signal (SIGTERM) first thing (serving/parent_death.py), so the
services stop with the process that started them even when it is killed with SIGKILL: the kernel sends
the signal when the starting *thread* exits, so start nodes from a thread that outlives them (the main
thread does). `clients/supervisor.py` restarts nodes that crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvferry.clients.cluster_options import ClusterOptions
from kvferry.serving.healthcheck import is_serving
from kvferry.serving.parent_death import parent_environment

DEFAULT_PORTS = {"coordinator": 50051, "prefill": 50052, "decode": 50053}
MODULES = {
    "coordinator": "kvferry.coordinator",
    "prefill": "kvferry.prefill_service",
    "decode": "kvferry.decode_service",
}


class ClusterError(RuntimeError):
    """A node exited or did not become ready."""


def log_tail(path: Path, lines: int = 12) -> str:
    """The last lines of a node's log, for an error message (a CI machine's temporary files are gone
    by the time anyone reads them)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "; its last lines:\n" + "\n".join(f"  {line}" for line in tail) if tail else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """`engine_args` go to both engine services (e.g. ["--model", path, "--device", "cpu"]);
    `ports` maps node name -> port (None: pick free ports)."""

    engine_args: Sequence[str] = ()
    ports: dict[str, int] | None = None
    decode_args: Sequence[str] = ()  # extra flags for the decode service only (e.g. its KV budget)
    prefill_args: Sequence[str] = ()  # extra flags for the prefill service only
    coordinator_args: Sequence[str] = ()  # extra flags for the coordinator only (e.g. its auth token)
    host: str = "127.0.0.1"
    log_dir: Path | None = None  # each node's output goes to <log_dir>/<node>.log; None: inherit ours
    env: dict[str, str] = field(default_factory=dict)
    # When the nodes serve TLS (KVFERRY_TLS_* in `env`): how the health checks connect (mTLS: cert + key)
    health_credentials: Any = None  # grpc.ChannelCredentials
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: ClusterOptions, **kwargs: Any) -> LocalCluster:
        """A cluster whose prefill and decode services get `options` (per-service device, KV budget,
        transport...); `kwargs`: the other fields (ports, log_dir, env...)."""
        return cls(prefill_args=options.prefill_argv(), decode_args=options.decode_argv(), **kwargs)

    def __post_init__(self) -> None:
        if self.ports is None:
            self.ports = {name: free_port() for name in DEFAULT_PORTS}

    def address(self, node: str) -> str:
        assert self.ports is not None
        return f"{self.host}:{self.ports[node]}"

    @property
    def coordinator_address(self) -> str:
        return self.address("coordinator")

    def start(self) -> None:
        """Start the three processes (returns at once; see wait_ready)."""
        for node in ("decode", "prefill", "coordinator"):
            self.start_node(node)

    def command(self, node: str) -> list[str]:
        """The command line that starts `node` ("coordinator", "prefill" or "decode")."""
        args = {
            "decode": [*self.engine_args, *self.decode_args],
            "prefill": [*self.engine_args, *self.prefill_args],
            "coordinator": [
                "--prefill-addresses",
                self.address("prefill"),
                "--decode-addresses",
                self.address("decode"),
                *self.coordinator_args,
            ],
        }
        assert self.ports is not None
        return [
            sys.executable,
            "-P",  # the working directory never shadows an installed package (a checkout's kernels/)
            "-m",
            MODULES[node],
            "--host",
            self.host,
            "--port",
            str(self.ports[node]),
            *args[node],
        ]

    def start_node(self, node: str) -> None:
        """Start (or restart, after kill) one node on its port; returns at once (see wait_ready)."""
        env = {**os.environ, **self.env, **parent_environment()}
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            mode = "ab" if node in self.processes else "wb"  # a restarted node appends to its log
            output = open(self.log_dir / f"{node}.log", mode)  # noqa: SIM115 - the child owns it
        self.processes[node] = subprocess.Popen(
            self.command(node),
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
        if output is not None:
            output.close()

    def kill(self, node: str, sig: int = signal.SIGKILL) -> int:
        """Signal one node (SIGKILL by default: a crash) and wait for it to exit; its exit code."""
        process = self.processes[node]
        if process.poll() is None:
            process.send_signal(sig)
        return process.wait(30)

    def wait_ready(
        self,
        timeout: float = 600.0,
        progress: Callable[[str], None] | None = None,
        nodes: Sequence[str] | None = None,
    ) -> None:
        """Block until every node's (or `nodes`') health service says SERVING; ClusterError if one
        exits first."""
        deadline = time.monotonic() + timeout
        pending = set(self.processes if nodes is None else nodes)
        while pending:
            for node in sorted(pending):
                self._check_alive(node)
                if is_serving(self.address(node), timeout=1.0, credentials=self.health_credentials):
                    pending.discard(node)
                    if progress is not None:
                        progress(f"{node} ready on {self.address(node)}")
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"{', '.join(sorted(pending))} not ready after {timeout:.0f} s")
            if pending:
                time.sleep(0.25)

    def log_path(self, node: str) -> Path | None:
        return None if self.log_dir is None else self.log_dir / f"{node}.log"

    def _check_alive(self, node: str) -> None:
        code = self.processes[node].poll()
        if code is not None:
            log = self.log_path(node)
            where = f"; see {log}{log_tail(log)}" if log is not None else " (its messages are above)"
            raise ClusterError(f"the {node} service exited with code {code}{where}")

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM every node (graceful shutdown), SIGKILL what is left after `timeout`; exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = {}
        for node, process in self.processes.items():
            try:
                codes[node] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                codes[node] = process.wait()
        return codes

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
