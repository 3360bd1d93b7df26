"""The two processes of tests/test_transfer_gpu.py: a decode role (pool owner) and a prefill role (page
sender), talking over a multiprocessing Pipe that stands in for the gRPC control plane (ReserveKV,
commit, Abort). Each role reports one dict to the result queue: ok, error, and what it measured.

Pages are random bits (bf16 NaN patterns included) drawn on the CPU from a seed, so the decode role can
regenerate what it should have received and compare bit for bit; pool pages nobody reserved keep a
poison pattern that must survive every transfer.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import uuid
from typing import Any

import torch

PAGE_SIZE, HEAD_DIM, DTYPE = 16, 128, torch.bfloat16  # Llama-3.1-8B pages: 8 KiB
POISON = -12345  # int16 pattern of unreserved decode pages


def make_pages(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << 15), 1 << 15, (n, 2, PAGE_SIZE, HEAD_DIM), dtype=torch.int16, generator=g)
    return bits.view(DTYPE)


def _report(results: Any, role: str, body) -> None:  # noqa: ANN001
    out: dict[str, Any] = {"role": role, "ok": False}
    try:
        body(out)
        out["ok"] = out.get("ok_override", True)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the test
        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    results.put(out)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _device(cfg: dict) -> torch.device:
    """An int is a CUDA index; "cpu" runs the roles on CPU (the shm transport)."""
    device = cfg["device"]
    if isinstance(device, int):
        torch.cuda.set_device(device)
        return torch.device("cuda", device)
    return torch.device(device)


def run_pair(decode_cfg: dict, prefill_cfg: dict, expect: tuple[str, ...] = ("decode", "prefill")) -> dict:
    """Spawn both roles, collect their reports, assert the expected ones reported ok."""
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    results = ctx.Queue()
    procs = {
        "decode": ctx.Process(target=decode_main, args=(a, results, decode_cfg)),
        "prefill": ctx.Process(target=prefill_main, args=(b, results, prefill_cfg)),
    }
    for p in procs.values():
        p.start()
    a.close()
    b.close()
    got: dict[str, dict] = {}
    end = time.monotonic() + 90
    while len(got) < len(expect) and time.monotonic() < end:
        try:
            out = results.get(timeout=1.0)
            got[out["role"]] = out
            if not out["ok"]:  # the other role ends by lease or EOF; don't wait the full time
                end = min(end, time.monotonic() + 20)
        except queue.Empty:
            continue
    for p in procs.values():
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    for role in expect:
        assert role in got, f"{role} role reported nothing (crashed or hung); got {list(got)}"
        assert got[role]["ok"], f"{role} role failed:\n{got[role].get('error')}"
    return got


# ---- decode role ------------------------------------------------------------------------------------
def decode_main(conn, results, cfg: dict) -> None:  # noqa: ANN001
    _report(results, "decode", lambda out: _decode(conn, cfg, out))


def _decode(conn, cfg: dict, out: dict) -> None:  # noqa: ANN001
    from kvferry.engine.errors import UnavailableError
    from kvferry.engine.kv_pool import KVPool
    from kvferry.kvtransfer.cuda_ipc import export_pool
    from kvferry.kvtransfer.device_util import pool_checksum
    from kvferry.kvtransfer.nccl import NcclHub

    device = _device(cfg)
    pool = KVPool(cfg.get("num_pages", 8192), PAGE_SIZE, HEAD_DIM, DTYPE, device)
    reservations: dict[str, tuple[torch.Tensor, float]] = {}  # rid -> (page ids, lease deadline)
    lease = cfg.get("lease_seconds", 10.0)
    timeout = cfg.get("timeout", 10.0)
    hub = shared = None
    if cfg["transport"] == "cuda_ipc":
        pool.kv.view(torch.int16).fill_(POISON)
        conn.send(("export", export_pool(pool.kv)))
    elif cfg["transport"] == "shm":  # the CPU counterpart of cuda_ipc: the pool moves into /dev/shm
        from kvferry.kvtransfer.shm import SharedPool

        shared = SharedPool(pool.kv, uuid.uuid4().hex)
        pool.kv = shared.kv
        pool.kv.view(torch.int16).fill_(POISON)
        conn.send(("export", shared.export))
    else:
        pool.kv.view(torch.int16).fill_(POISON)
        hub = NcclHub(device, timeout=timeout, chunk_bytes=cfg.get("chunk_bytes", 4 << 20))
    out["verified"] = []
    out["failures"] = []
    out["freed_by_lease"] = 0

    def free(rid: str) -> None:
        ids, _ = reservations.pop(rid)
        pool.free(ids.tolist())

    def verify(rid: str, seed: int) -> bool:
        ids, _ = reservations[rid]
        want = make_pages(seed, ids.numel()).to(device)
        got = pool.kv[ids.to(device)]
        exact = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        held = torch.zeros(pool.num_pages, dtype=torch.bool)
        for other, _ in reservations.values():
            held[other] = True
        untouched = pool.kv[(~held).nonzero().flatten().to(device)]
        poison_ok = bool((untouched.view(torch.int16) == POISON).all())
        out["verified"].append((rid, ids.numel(), exact, poison_ok))
        return exact and poison_ok

    peer_gone = False
    while True:
        now = time.monotonic()
        for rid in [r for r, (_, deadline) in reservations.items() if deadline < now]:
            free(rid)
            out["freed_by_lease"] += 1
        if peer_gone:
            if not reservations:
                break
            time.sleep(0.05)
            continue
        if not conn.poll(0.05):
            continue
        try:
            msg = conn.recv()
        except EOFError:
            peer_gone = True
            continue
        kind = msg[0]
        if kind == "nccl_open":
            offer = hub.offer()
            conn.send(("offer", offer))
            hub.accept(offer)
        elif kind == "reserve":  # ReserveKV: pages set aside under a lease, nothing moves yet
            _, rid, n, scattered, seed = msg
            ids = torch.tensor(pool.allocate(n), dtype=torch.int64)
            if scattered:
                ids = ids[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
            reservations[rid] = (ids, time.monotonic() + lease)
            conn.send(("reserved", rid, ids.tolist()))
        elif kind == "receive":  # nccl: the commit call, during which the pages arrive
            _, rid, seed = msg
            ids, _ = reservations[rid]
            pair = next(iter(hub.pairs.values()))
            started = time.monotonic()
            try:
                seconds = pair.recv_pages(pool.kv, ids, timeout=timeout)
            except UnavailableError as e:  # TransferTimeoutError or PeerUnreachableError
                drained = getattr(e, "drained", True)
                out["failures"].append((rid, f"{type(e).__name__}: {e}", drained))
                out["failed_after"] = time.monotonic() - started
                if drained:
                    free(rid)
                hub.close_all()
                torch.ones(4, device=device).sum().item()  # the GPU still works
                out["gpu_ok_after_failure"] = True
                peer_gone = True
                continue
            ok = verify(rid, seed)
            reservations[rid] = (ids, time.monotonic() + lease)  # committed: waits for its Decode call
            conn.send(("committed", rid, ok, seconds))
        elif kind == "commit":  # cuda_ipc / shm: the writer's bytes are in place when this arrives
            _, rid, seed, checksum, die_before_reply = msg
            if die_before_reply:
                _die()
            ids, _ = reservations[rid]
            ok = verify(rid, seed) and pool_checksum(pool.kv, ids) == checksum
            reservations[rid] = (ids, time.monotonic() + lease)  # committed: waits for its Decode call
            conn.send(("committed", rid, ok, 0.0))
        elif kind in ("abort", "release"):
            free(msg[1])
            conn.send(({"abort": "aborted", "release": "released"}[kind], msg[1]))
        elif kind == "stats":
            conn.send(("stats", pool.num_used, pool.num_reserved, len(reservations)))
        elif kind == "die":
            _die()
        elif kind == "close":
            break
    if hub is not None:
        hub.close_all()
    if shared is not None:
        shared.close()
    out["num_used"] = pool.num_used
    out["num_reserved"] = pool.num_reserved
    if not reservations:
        pool.assert_no_leaks()
    out["leak_free"] = pool.num_used == 0 and pool.num_reserved == 0


# ---- prefill role -----------------------------------------------------------------------------------
def prefill_main(conn, results, cfg: dict) -> None:  # noqa: ANN001
    _report(results, "prefill", lambda out: _prefill(conn, cfg, out))


class _Held:
    """The prefill side's copy of one request's KV: pages of its own pool, gathered in travel order."""

    def __init__(self, pool, seed: int, n: int, device: torch.device) -> None:  # noqa: ANN001
        self.pool = pool
        self.ids = pool.allocate(n)
        if n:
            pool.kv[torch.tensor(self.ids, device=device)] = make_pages(seed, n).to(device)
        self.pages = pool.kv[torch.tensor(self.ids, dtype=torch.int64, device=device)]

    def free(self) -> None:
        self.pool.free(self.ids)
        self.ids = []


def _prefill(conn, cfg: dict, out: dict) -> None:  # noqa: ANN001
    from kvferry.engine.errors import UnavailableError
    from kvferry.engine.kv_pool import KVPool
    from kvferry.kvtransfer.cuda_ipc import IpcPeers
    from kvferry.kvtransfer.device_util import encode_runs, page_checksum
    from kvferry.kvtransfer.nccl import NcclPeers
    from kvferry.kvtransfer.shm import ShmPeers

    device = _device(cfg)
    pool = KVPool(cfg.get("num_pages", 4096), PAGE_SIZE, HEAD_DIM, DTYPE, device)
    scenario = cfg["scenario"]
    timeout = cfg.get("timeout", 10.0)
    transport = cfg["transport"]
    out["transfers"] = []

    def ask(msg: tuple, wait: float = 60.0) -> tuple:
        conn.send(msg)
        if not conn.poll(wait):
            raise TimeoutError(f"no reply to {msg[0]} within {wait} s")
        return conn.recv()

    direct = transport in ("cuda_ipc", "shm")  # the writer writes the pool, then commits
    if direct:
        _, export = conn.recv()
        peers = IpcPeers(device) if transport == "cuda_ipc" else ShmPeers()
        mapped = peers.map(export)
        node = export.node_id
    else:
        peers = NcclPeers(device, timeout=timeout)
        conn.send(("nccl_open",))
        _, offer = conn.recv()
        pair = peers.connect(offer)
        pair.check_peer = cfg.get("check_peer", True)  # off: a dead peer is only found by the deadline
        node = offer.decode_node_id

    def transfer(rid: str, n: int, scattered: bool, seed: int, die_before_reply: bool = False) -> None:
        held = _Held(pool, seed, n, device)
        try:
            kind, _, ids = ask(("reserve", rid, n, scattered, seed))
            assert kind == "reserved"
            if direct:
                page_ids = torch.tensor(ids, dtype=torch.int64)
                if transport == "cuda_ipc" and not scattered:  # the reservation's runs: no ids at all
                    seconds = peers.map(export).write(held.pages, runs=encode_runs(page_ids))
                else:  # CPU ids (cut into runs on the host, or scattered through pinned memory)
                    seconds = peers.map(export).write(held.pages, page_ids)
                reply = ask(("commit", rid, seed, page_checksum(held.pages), die_before_reply), wait=timeout)
            else:
                conn.send(("receive", rid, seed))
                seconds = peers.get(node).send_pages(held.pages, timeout=timeout)
                if not conn.poll(timeout):
                    raise TimeoutError(f"{rid}: no commit within {timeout} s")
                reply = conn.recv()
            assert reply[0] == "committed" and reply[2], f"{rid}: decode reported {reply}"
            out["transfers"].append((rid, n, scattered, seconds))
        finally:
            held.free()  # committed or failed: the prefill side never keeps the pages

    if scenario == "transfers":
        transfer("contiguous", 1500, False, 1)
        transfer("scattered", 2000, True, 2)
        transfer("empty", 0, False, 3)
        transfer("one-page", 1, True, 4)
        # an aborted reservation frees its pages on both sides
        held = _Held(pool, 5, 700, device)
        assert ask(("reserve", "aborted", 700, False, 5))[0] == "reserved"
        assert ask(("abort", "aborted"))[0] == "aborted"
        held.free()
        _, used, reserved, live = ask(("stats",))
        out["decode_used_before_release"] = used
        for rid in ("contiguous", "scattered", "empty", "one-page"):
            assert ask(("release", rid))[0] == "released"
        _, used, reserved, live = ask(("stats",))
        out["decode_after_release"] = (used, reserved, live)
        assert (used, reserved, live) == (0, 0, 0), (used, reserved, live)
        if direct:
            assert peers.map(export) is mapped and peers.opened == 1  # mapped once, reused
        else:
            assert peers.get(node) is pair and peers.opened == 1 and pair.transfers == 4
        conn.send(("close",))
    elif scenario == "decode_dies":
        transfer("before", 600, True, 11)
        assert ask(("release", "before"))[0] == "released"
        started = time.monotonic()
        failure: BaseException | None = None
        try:
            if direct:  # decode dies after the write, before acknowledging the commit
                transfer("lost", 800, False, 12, die_before_reply=True)
            else:  # decode dies before the pages move
                conn.send(("die",))
                time.sleep(0.5)
                held = _Held(pool, 12, 3000, device)
                try:
                    peers.get(node).send_pages(held.pages, timeout=timeout)
                finally:
                    held.free()
        # nccl: the transport's own UNAVAILABLE errors; cuda_ipc: the Pipe standing in for the commit RPC
        except (UnavailableError, TimeoutError, EOFError, ConnectionError) as e:
            failure = e
        assert failure is not None, "the transfer to a dead decode node succeeded"
        out["failed_after"] = time.monotonic() - started
        out["failure"] = f"{type(failure).__name__}: {failure}"
        out["failure_type"] = type(failure).__name__
        out["unavailable"] = isinstance(failure, UnavailableError)
        out["drained"] = getattr(failure, "drained", True)
        peers.close(node)
        torch.ones(4, device=device).sum().item()
        out["gpu_ok_after_failure"] = True
    elif scenario == "prefill_dies":
        _Held(pool, 21, 900, device)
        assert ask(("reserve", "orphan", 900, False, 21))[0] == "reserved"
        if transport == "nccl":
            conn.send(("receive", "orphan", 21))  # the decode end now waits for pages that never come
        time.sleep(0.2)
        _die()  # after ReserveKV, before any page moves
    pool.assert_no_leaks()
    out["leak_free"] = True
    peers.close_all()
