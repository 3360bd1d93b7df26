"""Which transport moves a request's pages: automatic, or named by settings / the request.

auto: either end on CPU -> `grpc`; same host (and shared memory namespace) with the decode pool's GPU
reachable from ours (the same GPU, or peer access) -> `cuda_ipc`; another GPU or host -> `nccl`;
anything else -> `grpc`. A named transport is honoured or refused with the reason, never swapped
silently for another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import InvalidArgumentError
from serving.errors import FailedPreconditionError

AUTO = "auto"
TRANSPORT_NAMES = ("grpc", "cuda_ipc", "nccl")


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

    from kvtransfer.device_util import local_device_index

    a, b = local_device_index(mine), local_device_index(theirs)
    if a is None or b is None:
        return None
    return a == b or bool(torch.cuda.can_device_access_peer(a, b))


def local_node(device: str, transports: tuple[str, ...] = TRANSPORT_NAMES) -> NodeInfo:
    """This process's NodeInfo for a torch device string ("cpu", "cuda", "cuda:1")."""
    import torch

    from kvtransfer.device_util import device_uuid, host_id

    dev = torch.device(device)
    if dev.type != "cuda":
        return NodeInfo(host_id(), dev.type, "", ("grpc",))
    return NodeInfo(host_id(), "cuda", device_uuid(dev), transports)


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
    nccl_why = _nccl_unavailable(local, peer)
    if requested == AUTO:
        if ipc_why is None:
            return Choice("cuda_ipc", "same host, the decode pool's GPU is reachable")
        if nccl_why is None:
            return Choice("nccl", f"cuda_ipc not possible ({ipc_why})")
        return Choice("grpc", f"no device transport: cuda_ipc: {ipc_why}; nccl: {nccl_why}")
    why = {"grpc": None, "cuda_ipc": ipc_why, "nccl": nccl_why}[requested]
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


def _nccl_unavailable(local: NodeInfo, peer: NodeInfo) -> str | None:
    if "nccl" not in peer.transports or "nccl" not in local.transports:
        return "an end does not serve nccl"
    if local.device_type != "cuda" or peer.device_type != "cuda":
        return "both ends need a CUDA device"
    if local.device_uuid == peer.device_uuid:
        return "NCCL cannot pair two ranks on one GPU"
    return None
