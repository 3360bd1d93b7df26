"""Which transport moves a request's pages: automatic, or named by settings / the request.

auto: same host (and shared memory namespace) with the decode pool's GPU reachable from ours (the same
GPU, or peer access) -> `cuda_ipc`; both ends on CPU on one host -> `shm`; two GPUs that cannot map
each other's memory (another host) -> `nccl`; anything else -> `grpc`. A named transport is honoured or refused with the reason, never swapped
silently for another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvferry.engine.errors import FailedPreconditionError, InvalidArgumentError

AUTO = "auto"
TRANSPORT_NAMES = ("grpc", "cuda_ipc", "nccl", "shm")
DIRECT_WRITE = ("cuda_ipc", "shm")  # the writer maps the decode pool and writes pages into it
DIRECT_TRANSPORTS = (*DIRECT_WRITE, "nccl")  # pages move device to device, gRPC carries the commit
CPU_TRANSPORTS = ("grpc", "shm")
GPU_TRANSPORTS = ("grpc", "cuda_ipc", "nccl")
# Decode nodes serving from this very process (in-process clusters): CUDA cannot open an IPC handle in
# the process that exported it, so cuda_ipc to them is unavailable (shm works: a file maps twice).
IN_PROCESS_NODES: set[str] = set()


@dataclass(frozen=True)
class NodeInfo:
    """What one end says about itself (the decode side in its pool export / Info reply)."""

    host_id: str  # kvtransfer.device_util.host_id()
    device_type: str  # "cuda" or "cpu"
    device_uuid: str = ""  # the KV pool's GPU
    transports: tuple[str, ...] = ("grpc",)  # what this node can serve


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str


# (our GPU uuid, their GPU uuid) -> True / False, or None when their GPU is not visible from here
PeerAccess = Callable[[str, str], "bool | None"]


def cuda_peer_access(mine: str, theirs: str) -> bool | None:
    """Whether our GPU can write the other's memory (torch's view; None when it is not visible)."""
    import torch

    from kvferry.kvtransfer.device_util import local_device_index

    a, b = local_device_index(mine), local_device_index(theirs)
    if a is None or b is None:
        return None
    return a == b or bool(torch.cuda.can_device_access_peer(a, b))


def local_node(device: str, transports: tuple[str, ...] = TRANSPORT_NAMES) -> NodeInfo:
    """This process's NodeInfo for a torch device string ("cpu", "cuda", "cuda:1"): the transports of
    `transports` its device can serve."""
    import torch

    from kvferry.kvtransfer.device_util import device_uuid, host_id

    dev = torch.device(device)
    if dev.type != "cuda":
        return NodeInfo(host_id(), dev.type, "", tuple(t for t in transports if t in CPU_TRANSPORTS))
    return NodeInfo(host_id(), "cuda", device_uuid(dev), tuple(t for t in transports if t in GPU_TRANSPORTS))


def parse_transports(text: str) -> tuple[str, ...]:
    """A `transports` setting ("auto" or a comma list such as "grpc,shm") as names; grpc is always in."""
    names = (
        TRANSPORT_NAMES
        if text.strip() in ("", AUTO)
        else tuple(n.strip() for n in text.split(",") if n.strip())
    )
    unknown = [n for n in names if n not in TRANSPORT_NAMES]
    if unknown:
        raise ValueError(f"transports: unknown {unknown}; use {AUTO} or names from {TRANSPORT_NAMES}")
    return ("grpc", *(n for n in names if n != "grpc"))


def choose_transport(
    local: NodeInfo, peer: NodeInfo, requested: str = AUTO, peer_access: PeerAccess = cuda_peer_access
) -> Choice:
    """The transport from `local` (prefill) to `peer` (decode); see the module doc for the rules."""
    requested = requested or AUTO
    if requested != AUTO and requested not in TRANSPORT_NAMES:
        raise InvalidArgumentError(
            f"transport: unknown transport {requested!r}; use {AUTO} or one of {TRANSPORT_NAMES}",
            field="transport",
        )
    ipc_why = _ipc_unavailable(local, peer, peer_access)
    shm_why = _shm_unavailable(local, peer)
    nccl_why = _nccl_unavailable(local, peer)
    if requested == AUTO:
        if ipc_why is None:
            return Choice("cuda_ipc", "same host, the decode pool's GPU is reachable")
        if shm_why is None:
            return Choice("shm", "same host, both on CPU")
        if nccl_why is None:
            return Choice("nccl", f"cuda_ipc not possible ({ipc_why})")
        return Choice("grpc", f"no direct transport: cuda_ipc: {ipc_why}; shm: {shm_why}; nccl: {nccl_why}")
    why = {"grpc": None, "cuda_ipc": ipc_why, "shm": shm_why, "nccl": nccl_why}[requested]
    if requested == "grpc" and "grpc" not in peer.transports:
        why = "the decode node does not serve grpc"
    if why is not None:
        raise FailedPreconditionError(f"transport: {requested} cannot be used here: {why}", field="transport")
    return Choice(requested, "requested")


def _ipc_unavailable(local: NodeInfo, peer: NodeInfo, peer_access: PeerAccess) -> str | None:
    if "cuda_ipc" not in peer.transports:
        return "the decode node does not serve cuda_ipc"
    if local.device_type != "cuda" or peer.device_type != "cuda":
        return "both ends need a CUDA device"
    if local.host_id != peer.host_id:
        return "different hosts (or IPC namespaces)"
    if local.device_uuid == peer.device_uuid:
        return None
    access = peer_access(local.device_uuid, peer.device_uuid)
    if access is None:
        return "the decode GPU is not visible from this process"
    if not access:
        return "no peer access between the two GPUs"
    return None


def _shm_unavailable(local: NodeInfo, peer: NodeInfo) -> str | None:
    if "shm" not in peer.transports or "shm" not in local.transports:
        return "an end does not serve shm"
    if local.device_type != "cpu" or peer.device_type != "cpu":
        return "both ends need a CPU pool"
    if local.host_id != peer.host_id:
        return "different hosts (or IPC namespaces)"
    return None


def _nccl_unavailable(local: NodeInfo, peer: NodeInfo) -> str | None:
    if "nccl" not in peer.transports or "nccl" not in local.transports:
        return "an end does not serve nccl"
    if local.device_type != "cuda" or peer.device_type != "cuda":
        return "both ends need a CUDA device"
    if local.device_uuid == peer.device_uuid:
        return "NCCL cannot pair two ranks on one GPU"
    return None
