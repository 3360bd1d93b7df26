"""Keeps a started LocalCluster up (`kvferry up`): a node that exits is started again on its port after a
backoff delay that doubles with each crash (1 s, 2 s, 4 s ... capped at 30 s), and the supervisor gives up,
with a message naming the node, its exit code and its log, when a node crashes more than `max_restarts`
times within `window_seconds`. A restarted decode node reclaims its dead predecessor's shared-memory
pool file when it starts (kvtransfer.shm sweeps files of processes that are gone); the coordinator finds
restarted nodes again by itself (its channels reconnect within 2 s).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvferry.clients.local_cluster import ClusterError, LocalCluster
from kvferry.serving.healthcheck import is_serving


@dataclass
class RestartPolicy:
    max_restarts: int = 5  # restarts of one node within window_seconds; one more crash gives up
    window_seconds: float = 300.0
    first_delay: float = 1.0  # seconds before the first restart; doubles with each crash in the window
    max_delay: float = 30.0


@dataclass
class _NodeState:
    crashes: deque[float] = field(default_factory=deque)  # times of the crashes inside the window
    restart_at: float | None = None  # a restart is due then
    restarted: bool = False  # started again and not yet reported SERVING


class Supervisor:
    """Call `poll()` regularly (every ~0.5 s) once the cluster is ready; it raises ClusterError when it
    gives up. `report` gets one line per event (crash, restart, serving again)."""

    def __init__(
        self,
        cluster: LocalCluster,
        policy: RestartPolicy | None = None,
        report: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.policy = policy or RestartPolicy()
        self.report = report
        self.clock = clock
        self.nodes = {node: _NodeState() for node in cluster.processes}
        self.restarts = 0  # over the supervisor's life, all nodes

    def poll(self) -> None:
        now = self.clock()
        for node, state in self.nodes.items():
            if state.restart_at is not None:
                if now >= state.restart_at:
                    state.restart_at = None
                    state.restarted = True
                    self.restarts += 1
                    self.cluster.start_node(node)
                    self.report(f"{node}: restarted on {self.cluster.address(node)}")
                continue
            code = self.cluster.processes[node].poll()
            if code is not None:
                self._crashed(node, state, code, now)
            elif state.restarted and is_serving(
                self.cluster.address(node), timeout=0.2, credentials=self.cluster.health_credentials
            ):
                state.restarted = False
                self.report(f"{node}: serving again")

    def _crashed(self, node: str, state: _NodeState, code: int, now: float) -> None:
        policy = self.policy
        state.crashes.append(now)
        while state.crashes and state.crashes[0] < now - policy.window_seconds:
            state.crashes.popleft()
        log = self.cluster.log_path(node)
        where = f" (log: {log})" if log is not None else ""
        if len(state.crashes) > policy.max_restarts:
            raise ClusterError(
                f"the {node} service exited with code {code}{where}, its {len(state.crashes)}th exit within "
                f"{policy.window_seconds:.0f} s; not restarting it again"
            )
        delay = min(policy.first_delay * 2 ** (len(state.crashes) - 1), policy.max_delay)
        state.restart_at = now + delay
        self.report(
            f"{node}: exited with code {code}{where}; restarting in {delay:.0f} s (restart "
            f"{len(state.crashes)} of {policy.max_restarts} allowed within {policy.window_seconds:.0f} s)"
        )
