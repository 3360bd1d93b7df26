"""The two-process transfer roles of tests/test_transfer_gpu.py run on CPU over the `shm` transport (the
CPU counterpart of cuda_ipc: same export / write / commit protocol): transfers verified bit for bit with
a poison check, aborted reservations and leak checks on both pools, a killed decode failing the writer
in time, a killed writer's reservation freed by its lease. Keeps the roles' own logic tested without a
GPU; the cuda_ipc and nccl halves run with `-m gpu`."""

from __future__ import annotations

import time

import pytest
from transfer_roles import run_pair

pytestmark = pytest.mark.slow  # real processes (spawned, each importing torch)

TIMEOUT = 3.0
SLACK = 6.0


def _cfgs(scenario: str, **extra) -> tuple[dict, dict]:
    common = {"transport": "shm", "device": "cpu", "timeout": extra.pop("timeout", 20.0), **extra}
    return common, {**common, "scenario": scenario}


def test_shm_transfers_between_two_processes():
    got = run_pair(*_cfgs("transfers"))
    decode, prefill = got["decode"], got["prefill"]
    assert [v[0] for v in decode["verified"]] == ["contiguous", "scattered", "empty", "one-page"]
    assert all(exact and poison for _, _, exact, poison in decode["verified"]), decode["verified"]
    assert decode["leak_free"] and prefill["leak_free"]
    assert prefill["decode_after_release"] == (0, 0, 0)


def test_shm_killed_decode_fails_the_writer_in_time():
    got = run_pair(*_cfgs("decode_dies", timeout=TIMEOUT), expect=("prefill",))
    prefill = got["prefill"]
    assert prefill["failed_after"] < TIMEOUT + SLACK, prefill
    assert prefill["gpu_ok_after_failure"] and prefill["leak_free"] and prefill["drained"]


def test_shm_killed_writer_frees_the_reservation_by_lease():
    started = time.monotonic()
    got = run_pair(*_cfgs("prefill_dies", timeout=TIMEOUT, lease_seconds=TIMEOUT), expect=("decode",))
    assert got["decode"]["leak_free"] and got["decode"]["freed_by_lease"] == 1, got["decode"]
    assert time.monotonic() - started < 60
