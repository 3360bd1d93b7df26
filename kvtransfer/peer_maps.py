"""The writer side's mappings of decode pools (cuda_ipc, shm): one per decode node, opened on first
use and reused; a node that exports again (it restarted) has its stale mapping closed and replaced."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar


class Mapping(Protocol):
    export: Any  # what the decode node's ExportKV said; it has a node_id

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


M = TypeVar("M", bound=Mapping)


class PeerMaps(Generic[M]):
    def __init__(self, open_map: Callable[[Any], M]) -> None:
        self._open = open_map
        self._maps: dict[str, M] = {}
        self._lock = threading.Lock()
        self.opened = 0  # mappings ever opened (a test checks reuse)

    def map(self, export: Any) -> M:
        with self._lock:
            mapped = self._maps.get(export.node_id)
            if mapped is not None and not mapped.closed and mapped.export == export:
                return mapped
            if mapped is not None:  # the node restarted or re-exported: drop the stale mapping
                mapped.close()
            mapped = self._open(export)
            self._maps[export.node_id] = mapped
            self.opened += 1
            return mapped

    def get(self, node_id: str) -> M | None:
        return self._maps.get(node_id)

    def close(self, node_id: str) -> bool:
        """Forget a decode node (it went away or failed a transfer); True when it was mapped."""
        with self._lock:
            mapped = self._maps.pop(node_id, None)
        if mapped is None:
            return False
        mapped.close()
        return True

    def close_all(self) -> None:
        for node_id in list(self._maps):
            self.close(node_id)

    def __len__(self) -> int:
        return len(self._maps)
