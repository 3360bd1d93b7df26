"""cuda_ipc and nccl between two real processes (tests/transfer_roles.py): pages of random bits verified
bit for bit, on one GPU (IPC) and across two GPUs (IPC through peer access, NCCL); aborted reservations
free pages on both sides; a killed peer fails the other side's transfer within its timeout.

GPU machine only (`-m gpu`); CI runs `-m "not gpu"`. The pytest process itself never touches CUDA.
"""

from __future__ import annotations

import time

import pytest
import torch
from transfer_roles import run_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

TIMEOUT = 3.0  # transfer timeout of the surviving side in the killed-peer tests
SLACK = 6.0  # abort + drain + process scheduling on top of it


def _cfgs(transport: str, decode_dev: int, prefill_dev: int, scenario: str, **extra) -> tuple[dict, dict]:
    common = {"transport": transport, "timeout": extra.pop("timeout", 20.0), **extra}
    return (
        {**common, "device": decode_dev},
        {**common, "device": prefill_dev, "scenario": scenario},
    )


def _check_transfers(got: dict) -> None:
    decode, prefill = got["decode"], got["prefill"]
    assert [v[0] for v in decode["verified"]] == ["contiguous", "scattered", "empty", "one-page"]
    assert all(exact and poison for _, _, exact, poison in decode["verified"]), decode["verified"]
    assert decode["leak_free"] and prefill["leak_free"]
    assert prefill["decode_after_release"] == (0, 0, 0)


def test_cuda_ipc_one_gpu():
    got = run_pair(*_cfgs("cuda_ipc", 0, 0, "transfers"))
    _check_transfers(got)


@two_gpus
def test_cuda_ipc_across_gpus():
    got = run_pair(*_cfgs("cuda_ipc", 0, 1, "transfers"))
    _check_transfers(got)


@two_gpus
def test_nccl_across_gpus():
    got = run_pair(*_cfgs("nccl", 0, 1, "transfers", chunk_bytes=4 << 20))  # 1500 pages: 3 chunks
    _check_transfers(got)


@two_gpus
@pytest.mark.parametrize(
    "transport, check_peer",
    [("nccl", True), ("nccl", False), ("cuda_ipc", True)],
    ids=["nccl-store-check", "nccl-deadline", "cuda_ipc"],
)
def test_killed_decode_fails_the_prefill_side_in_time(transport: str, check_peer: bool):
    """nccl-store-check: the decode node's store went with its process, the send fails at once
    (PeerUnreachableError); nccl-deadline: without that check the send is stuck on the dead peer until
    its deadline aborts it (TransferTimeoutError). Either way UNAVAILABLE within the timeout, drained."""
    decode_cfg, prefill_cfg = _cfgs(transport, 0, 1, "decode_dies", timeout=TIMEOUT, check_peer=check_peer)
    got = run_pair(decode_cfg, prefill_cfg, expect=("prefill",))
    prefill = got["prefill"]
    assert prefill["failed_after"] < TIMEOUT + SLACK, prefill
    assert prefill["gpu_ok_after_failure"] and prefill["leak_free"] and prefill["drained"], prefill
    if transport == "nccl":
        assert prefill["unavailable"], prefill["failure"]
        if check_peer:  # found by the store check, not the deadline
            assert prefill["failure_type"] == "PeerUnreachableError", prefill["failure"]
            assert prefill["failed_after"] < TIMEOUT, prefill


@two_gpus
@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_killed_prefill_frees_the_decode_reservation(transport: str):
    decode_cfg, prefill_cfg = _cfgs(transport, 0, 1, "prefill_dies", timeout=TIMEOUT, lease_seconds=TIMEOUT)
    started = time.monotonic()
    got = run_pair(decode_cfg, prefill_cfg, expect=("decode",))
    decode = got["decode"]
    assert decode["leak_free"], decode
    if transport == "nccl":  # the receive fails by its own deadline (UNAVAILABLE) and frees the pages
        (rid, error, drained), *_ = decode["failures"]
        assert rid == "orphan" and drained, decode["failures"]
        assert error.startswith(("TransferTimeoutError", "PeerUnreachableError")), error
        assert decode["failed_after"] < TIMEOUT + SLACK
        assert decode["gpu_ok_after_failure"]
    else:
        assert decode["freed_by_lease"] == 1
    assert time.monotonic() - started < 120
