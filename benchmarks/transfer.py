"""KV transfer benchmark: cuda_ipc (one GPU, two GPUs) and nccl (two GPUs) between two real processes.

Llama-3.1-8B-shape requests (32 layers x 8 KV heads, head_dim 128, bf16, page_size 16: 8 KiB pages, 128 KiB
of KV per token) at 8K / 32K / 128K context x retention {1.0, 0.5, 0.25}: bytes moved, transfer time and
GB/s (payload bytes / time) against raw ceilings measured in the same run (one device-to-device copy of
the same size for IPC: same GPU, or peer copy across GPUs; one NCCL send/recv of a contiguous buffer of
the same size for NCCL), for contiguous and scattered destination pages. Then the handoff (prefill
finished -> decode ready) of a 32K request at retention 0.5, and for nccl a layer-wise overlap
experiment. Control messages go over a multiprocessing Pipe standing in for gRPC.

    python -m benchmarks.transfer --out docs/benchmarks            # on the GPU machine
    python -m benchmarks.transfer --quick --out $OUT/bench          # <= 6 min on nvidia-h200-x2
    python -m benchmarks.transfer --modes alloc                     # the pool allocator only (CPU)
    python -m benchmarks.transfer --render docs/benchmarks/transfer.json   # redo PNG + MD from JSON

The JSON (and MD) are rewritten after every row of every mode, so a run cut short by a time limit keeps
everything measured before it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

LAYERS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
PAGE_BYTES = 2 * PAGE_SIZE * HEAD_DIM * 2
CONTEXTS = (8192, 32768, 131072)
RETENTIONS = (1.0, 0.5, 0.25)
DATE = "2026-11-23"
QUICK_CONTEXTS = (8192, 32768)
HANDOFF_CONTEXT, HANDOFF_RETENTION = 32768, 0.5


def request_pages(context: int, retention: float) -> int:
    kept = round(retention * context)
    return LAYERS * KV_HEADS * math.ceil(kept / PAGE_SIZE)


def manifest_bytes(context: int, retention: float, num_pages: int) -> int:
    from kvferry.v1 import kv_pb2

    kept = round(retention * context)
    m = kv_pb2.KVManifest(
        model_fingerprint="f" * 64, dtype="bfloat16", codec="none", page_size=PAGE_SIZE, num_layers=LAYERS,
        num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, head_lens=[kept] * (LAYERS * KV_HEADS),
        num_pages=num_pages, byte_count=num_pages * PAGE_BYTES, checksum_algorithm="sum64",
        checksum=(1 << 64) - 1,
    )  # fmt: skip
    return m.ByteSize()


# ---- decode role ------------------------------------------------------------------------------------
def decode_main(conn, cfg: dict) -> None:  # noqa: ANN001
    try:
        _decode(conn, cfg)
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


def _decode(conn, cfg: dict) -> None:  # noqa: ANN001
    from kvferry.engine.kv_pool import KVPool
    from kvferry.kvtransfer.cuda_ipc import export_pool
    from kvferry.kvtransfer.device_util import encode_runs, pool_checksum
    from kvferry.kvtransfer.nccl import NcclHub

    device = torch.device("cuda", cfg["device"])
    torch.cuda.set_device(device)
    pool = KVPool(cfg["num_pages"], PAGE_SIZE, HEAD_DIM, DTYPE, device)
    hub = NcclHub(device, timeout=60.0) if cfg["transport"] == "nccl" else None
    ids = torch.empty(0, dtype=torch.int64)
    raw: torch.Tensor | None = None
    held: torch.Tensor | list[int] = []
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "export":
            conn.send(("export", export_pool(pool.kv)))
        elif kind == "nccl_open":
            offer = hub.offer()
            conn.send(("offer", offer))
            hub.accept(offer)
        elif kind == "ids":  # destination pages for the throughput runs (no allocator involved)
            _, n, scattered, seed = msg
            if scattered:
                g = torch.Generator().manual_seed(seed)
                ids = torch.randperm(pool.num_pages, generator=g)[:n].contiguous()
            else:
                ids = torch.arange(n, dtype=torch.int64)
            conn.send(("ids", ids.numpy().tobytes()))
        elif kind == "raw_alloc":
            raw = None
            torch.cuda.empty_cache()
            raw = torch.empty(msg[1], dtype=torch.uint8, device=device)
            conn.send(("ok",))
        elif kind in ("recv_pages", "recv_raw", "recv_layers"):
            pair = next(iter(hub.pairs.values()))
            if kind == "recv_pages":
                pendings = [pair.start_recv_pages(pool.kv, ids)]
            elif kind == "recv_raw":
                pendings = [pair.start_recv_tensor(raw[: msg[1]])]
            else:
                per = ids.numel() // msg[1]
                pendings = [
                    pair.start_recv_pages(pool.kv, ids[i * per : (i + 1) * per]) for i in range(msg[1])
                ]
            conn.send(("posted",))
            for p in pendings:
                p.wait(60.0)
            conn.send(("done", time.perf_counter()))
        elif kind == "checksum":
            conn.send(("checksum", pool_checksum(pool.kv, ids)))
        elif kind == "reserve":  # the handoff: ReserveKV through the engine's pool allocator
            _, n, use_allocator = msg
            t0 = time.perf_counter()
            ids = pool.allocate_ids(n) if use_allocator else torch.arange(n)
            held = ids if use_allocator else []
            # cuda_ipc needs the destination: page runs [first, length, ...] (one run in a fresh pool)
            runs = encode_runs(ids) if cfg["transport"] == "cuda_ipc" else []
            conn.send(("reserved", runs, time.perf_counter() - t0))
        elif kind == "commit":  # cuda_ipc: pages are in place; optionally verify the checksum
            _, checksum = msg
            ok = checksum is None or pool_checksum(pool.kv, ids) == checksum
            conn.send(("committed", time.perf_counter(), ok))
        elif kind == "receive":  # nccl: the pages arrive during the commit call
            _, checksum = msg
            pair = next(iter(hub.pairs.values()))
            pair.recv_pages(pool.kv, ids, timeout=60.0)
            ok = checksum is None or pool_checksum(pool.kv, ids) == checksum
            conn.send(("committed", time.perf_counter(), ok))
        elif kind == "release":
            pool.free(held)
            held = []
            conn.send(("released",))
        elif kind == "close":
            if hub is not None:
                hub.close_all()
            conn.send(("closed",))
            return


# ---- prefill role (drives the run) ------------------------------------------------------------------
def prefill_main(conn, results, cfg: dict) -> None:  # noqa: ANN001
    """Drives the mode; every result goes to `results` as soon as it is measured ("row", "handoff",
    "overlap"), then ("done", everything), so the parent can save partial results."""
    out: dict = {"mode": cfg["mode"], "rows": [], "handoff": {}, "overlap": None}
    try:
        _prefill(conn, cfg, out, lambda kind, value: results.put((kind, value)))
    except BaseException:  # noqa: BLE001
        out["error"] = traceback.format_exc()
    results.put(("done", out))


def _ask(conn, msg: tuple) -> tuple:  # noqa: ANN001
    conn.send(msg)
    reply = conn.recv()
    if reply[0] == "error":
        raise RuntimeError(f"decode role failed:\n{reply[1]}")
    return reply


def _prefill(conn, cfg: dict, out: dict, report) -> None:  # noqa: ANN001
    from kvferry.kvtransfer.cuda_ipc import IpcPeers
    from kvferry.kvtransfer.device_util import page_checksum
    from kvferry.kvtransfer.nccl import NcclPeers

    device = torch.device("cuda", cfg["device"])
    decode_device = torch.device("cuda", cfg["decode_device"])
    torch.cuda.set_device(device)
    transport, reps = cfg["transport"], cfg["reps"]
    out["device_name"] = torch.cuda.get_device_name(device)
    if transport == "cuda_ipc":
        _, export = _ask(conn, ("export",))
        mapped = IpcPeers(device).map(export)
        pair = None
    else:
        peers = NcclPeers(device, timeout=60.0)
        conn.send(("nccl_open",))
        _, offer = conn.recv()
        pair = peers.connect(offer)
        mapped = None
        _ask(conn, ("raw_alloc", request_pages(max(cfg["contexts"]), 1.0) * PAGE_BYTES))

    def ids_for(n: int, scattered: bool) -> torch.Tensor:
        _, data = _ask(conn, ("ids", n, scattered, n))
        return (
            torch.frombuffer(bytearray(data), dtype=torch.int64) if n else torch.empty(0, dtype=torch.int64)
        )

    def nccl_timed(kind: str, tensor: torch.Tensor, nbytes: int = 0) -> float:
        _ask(conn, (kind, nbytes) if kind == "recv_raw" else (kind,))
        t0 = time.perf_counter()
        pending = pair.start_send_pages(tensor) if kind == "recv_pages" else pair.start_send_tensor(tensor)
        pending.wait(60.0)
        _, t1 = conn.recv()
        return t1 - t0

    def raw_copy(src: torch.Tensor, dst: torch.Tensor) -> float:
        torch.cuda.synchronize(device)
        torch.cuda.synchronize(dst.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        torch.cuda.synchronize(dst.device)
        return time.perf_counter() - t0

    for context in cfg["contexts"]:
        for retention in cfg["retentions"]:
            n = request_pages(context, retention)
            nbytes = n * PAGE_BYTES
            gen = torch.Generator(device=device).manual_seed(n)
            pages = torch.randint(
                -(1 << 15),
                1 << 15,
                (n, 2, PAGE_SIZE, HEAD_DIM),
                dtype=torch.int16,
                device=device,
                generator=gen,
            ).view(DTYPE)
            want = page_checksum(pages)
            row = {
                "context": context, "retention": retention, "num_pages": n, "payload_bytes": nbytes,
                "uncompressed_bytes": request_pages(context, 1.0) * PAGE_BYTES,
                "manifest_bytes": manifest_bytes(context, retention, n),
            }  # fmt: skip
            for layout in ("contiguous", "scattered"):
                ids = ids_for(n, layout == "scattered")
                times = []
                for _ in range(reps + 1):
                    if transport == "cuda_ipc":
                        times.append(mapped.write(pages, ids))
                    else:
                        times.append(nccl_timed("recv_pages", pages))
                times = times[1:]
                _, got = _ask(conn, ("checksum",))
                row[f"{layout}_s"] = statistics.median(times)
                row[f"{layout}_s_all"] = times
                row[f"{layout}_verified"] = got == want
            raw_times = []
            if transport == "cuda_ipc":
                dst = torch.empty_like(pages, device=decode_device)
                for _ in range(reps + 1):
                    raw_times.append(raw_copy(pages, dst))
                del dst
            else:
                flat = pages.view(-1).view(torch.uint8)
                for _ in range(reps + 1):
                    raw_times.append(nccl_timed("recv_raw", flat, nbytes))
            row["raw_s"] = statistics.median(raw_times[1:])
            row["raw_s_all"] = raw_times[1:]
            out["rows"].append(row)
            report("row", row)
            print(_row_line(cfg["mode"], row), flush=True)
            del pages
            torch.cuda.empty_cache()

    out["handoff"] = _handoff(conn, cfg, pair, mapped, reps)
    report("handoff", out["handoff"])
    if transport == "nccl" and cfg.get("overlap", True):
        try:
            out["overlap"] = _overlap(conn, pair, device, reps)
        except Exception:  # noqa: BLE001 - reported, not fatal
            out["overlap"] = {"error": traceback.format_exc()}
        report("overlap", out["overlap"])
    _ask(conn, ("close",))


def _handoff(conn, cfg: dict, pair, mapped, reps: int) -> dict:  # noqa: ANN001
    """Prefill finished (pages gathered, synced) -> decode ready (pages in place, commit processed)."""
    from kvferry.kvtransfer.device_util import page_checksum

    device = torch.device("cuda", cfg["device"])
    n = request_pages(HANDOFF_CONTEXT, HANDOFF_RETENTION)
    pages = torch.randint(-(1 << 15), 1 << 15, (n, 2, PAGE_SIZE, HEAD_DIM), dtype=torch.int16, device=device)
    pages = pages.view(DTYPE)
    torch.cuda.synchronize(device)
    result = {
        "context": HANDOFF_CONTEXT, "retention": HANDOFF_RETENTION, "num_pages": n,
        "payload_bytes": n * PAGE_BYTES,
    }  # fmt: skip
    for name, use_allocator, verify in (
        ("transport_only", False, False),
        ("with_pool_allocator", True, False),
        ("with_allocator_and_checksum", True, True),
    ):
        times, reserve_times = [], []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            checksum = page_checksum(pages) if verify else None
            _, runs, reserve_s = _ask(conn, ("reserve", n, use_allocator))
            reserve_times.append(reserve_s)
            if cfg["transport"] == "cuda_ipc":
                mapped.write(pages, runs=runs)  # the reservation's runs: no id upload, no sync before
                _, t_ready, ok = _ask(conn, ("commit", checksum))
            else:
                conn.send(("receive", checksum))
                pair.send_pages(pages, timeout=60.0)
                _, t_ready, ok = conn.recv()
            assert ok, f"handoff {name}: checksum mismatch"
            times.append(t_ready - t0)
            _ask(conn, ("release",))
        result[f"{name}_s"] = statistics.median(times[1:])
        result[f"{name}_s_all"] = times[1:]
        result[f"{name}_reserve_s"] = statistics.median(reserve_times[1:])  # decode side: allocate + runs
    return result


def _overlap(conn, pair, device: torch.device, reps: int) -> dict:  # noqa: ANN001
    """Layer-wise shipping while later layers still compute (a matmul per layer stands in for the
    layer's prefill), against computing all layers first and shipping after; 32K at retention 0.5."""
    n = request_pages(32768, 0.5)
    per = n // LAYERS
    pages = torch.randint(-(1 << 15), 1 << 15, (n, 2, PAGE_SIZE, HEAD_DIM), dtype=torch.int16, device=device)
    pages = pages.view(DTYPE)
    _ask(conn, ("ids", n, False, n))
    x = torch.randn(32768, 4096, device=device, dtype=DTYPE)
    w = torch.randn(4096, 14336, device=device, dtype=DTYPE)

    def layer() -> None:
        torch.matmul(x, w)

    for _ in range(3):
        layer()
    torch.cuda.synchronize(device)
    res: dict[str, list[float]] = {"sequential_tail": [], "sequential_total": [], "sequential_compute": []}
    res.update({"overlap_tail": [], "overlap_total": [], "overlap_compute": []})
    for _ in range(reps + 1):
        # sequential: all layers, then one transfer
        _ask(conn, ("recv_pages",))
        t0 = time.perf_counter()
        for _ in range(LAYERS):
            layer()
        torch.cuda.synchronize(device)
        t_end = time.perf_counter()
        pair.start_send_pages(pages).wait(60.0)
        _, t1 = conn.recv()
        res["sequential_tail"].append(t1 - t_end)
        res["sequential_total"].append(t1 - t0)
        res["sequential_compute"].append(t_end - t0)
        # overlapped: each layer's pages leave as soon as that layer is computed
        _ask(conn, ("recv_layers", LAYERS))
        t0 = time.perf_counter()
        pendings = []
        for i in range(LAYERS):
            layer()
            pendings.append(pair.start_send_pages(pages[i * per : (i + 1) * per]))
        torch.cuda.current_stream(device).synchronize()
        t_end = time.perf_counter()
        for p in pendings:
            p.wait(60.0)
        _, t1 = conn.recv()
        res["overlap_tail"].append(t1 - t_end)
        res["overlap_total"].append(t1 - t0)
        res["overlap_compute"].append(t_end - t0)
    return {k: statistics.median(v[1:]) for k, v in res.items()} | {"layers": LAYERS, "pages_per_layer": per}


def _row_line(mode: str, row: dict) -> str:
    gb = row["payload_bytes"] / 1e9
    return (
        f"{mode:10s} ctx {row['context']:6d} r {row['retention']:.2f} {gb * 1e3:9.1f} MB  "
        f"contig {gb / row['contiguous_s']:6.1f} GB/s  scattered {gb / row['scattered_s']:6.1f} GB/s  "
        f"raw {gb / row['raw_s']:6.1f} GB/s  verified {row['contiguous_verified'] and row['scattered_verified']}"
    )


# ---- orchestration ----------------------------------------------------------------------------------
MODES = {  # name: (transport, decode GPU, prefill GPU)
    "ipc-1gpu": ("cuda_ipc", 0, 0),
    "ipc-2gpu": ("cuda_ipc", 0, 1),
    "nccl-2gpu": ("nccl", 0, 1),
}
ALL_MODES = ("alloc", *MODES)  # alloc: the pool allocator on the host (no GPU)


def run_mode(
    mode: str,
    contexts: tuple[int, ...],
    reps: int,
    timeout: float = 240.0,
    retentions: tuple[float, ...] = RETENTIONS,
    on_update=None,  # noqa: ANN001 - called with the partial result after every message
) -> dict:
    transport, decode_dev, prefill_dev = MODES[mode]
    max_pages = max(request_pages(c, 1.0) for c in contexts)
    max_pages = max(max_pages, request_pages(HANDOFF_CONTEXT, HANDOFF_RETENTION))
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    results = ctx.Queue()
    common = {
        "transport": transport, "mode": mode, "contexts": contexts, "reps": reps, "retentions": retentions,
    }  # fmt: skip
    decode = ctx.Process(
        target=decode_main,
        args=(a, {**common, "device": decode_dev, "num_pages": max_pages + max_pages // 50}),
    )
    prefill = ctx.Process(
        target=prefill_main, args=(b, results, {**common, "device": prefill_dev, "decode_device": decode_dev})
    )
    decode.start()
    prefill.start()
    partial: dict = {"mode": mode, "rows": [], "handoff": {}, "overlap": None}
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                partial["error"] = f"{mode}: no result within {timeout:.0f} s (partial results kept)"
                return partial
            try:
                kind, value = results.get(timeout=min(left, 5.0))
            except queue.Empty:
                if not prefill.is_alive():
                    partial["error"] = f"{mode}: the prefill role died (exit code {prefill.exitcode})"
                    return partial
                continue
            if kind == "done":
                return value
            if kind == "row":
                partial["rows"].append(value)
            else:
                partial[kind] = value
            if on_update is not None:
                on_update(partial)
    finally:
        for p in (prefill, decode):
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def allocator_bench(num_pages: int = 0, reps: int = 7) -> dict:
    """The decode side's share of ReserveKV and release on the host: KVPool.allocate_ids + encode_runs
    and KVPool.free of a 32K@0.5 request (262,144 pages), plus the list API (allocate / free of a list),
    medians in seconds. No GPU: the pool's tensor is one element per page."""
    from kvferry.engine.kv_pool import KVPool
    from kvferry.kvtransfer.device_util import encode_runs

    n = num_pages or request_pages(HANDOFF_CONTEXT, HANDOFF_RETENTION)
    pool = KVPool(n + n // 50, PAGE_SIZE, 1, DTYPE, "cpu")
    times: dict[str, list[float]] = {
        k: [] for k in ("allocate_ids", "encode_runs", "free_ids", "allocate", "free")
    }
    for _ in range(reps):
        t0 = time.perf_counter()
        ids = pool.allocate_ids(n)
        t1 = time.perf_counter()
        encode_runs(ids)
        t2 = time.perf_counter()
        pool.free(ids)
        t3 = time.perf_counter()
        pages = pool.allocate(n)
        t4 = time.perf_counter()
        pool.free(pages)
        t5 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[k].append(dt)
    pool.assert_no_leaks()
    return {"num_pages": n, "reps": reps, "cpu_threads": torch.get_num_threads()} | {
        f"{k}_s": statistics.median(v) for k, v in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--reps", type=int, default=None, help="repetitions after one warm-up (5; --quick 3)")
    parser.add_argument(
        "--modes", default=None, help=f"comma list of {', '.join(ALL_MODES)} (default: all the GPUs allow)"
    )
    parser.add_argument(
        "--contexts", default=None, help="comma list (default 8192,32768,131072; --quick 8K,32K)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="8K and 32K contexts, 3 reps, 100 s per mode: <= 6 min on 2 GPUs"
    )
    parser.add_argument(
        "--mode-timeout", type=float, default=None, help="seconds per mode (240; --quick 100)"
    )
    parser.add_argument("--render", help="only redo the PNG and MD from this JSON")
    args = parser.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        render(data, Path(args.render).parent)
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    mode_timeout = args.mode_timeout if args.mode_timeout is not None else (100.0 if args.quick else 240.0)
    default_contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    contexts = tuple(int(c) for c in args.contexts.split(",")) if args.contexts else default_contexts
    gpus = torch.cuda.device_count()
    wanted = args.modes.split(",") if args.modes else ["alloc", *MODES]
    unknown = [m for m in wanted if m not in ALL_MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(ALL_MODES)}")
    modes = [m for m in wanted if m == "alloc" or max(MODES[m][1:]) < gpus]
    skipped = [m for m in wanted if m not in modes]
    if skipped:
        print(f"skipped (not enough GPUs: {gpus}): {', '.join(skipped)}", flush=True)
    command = "NCCL_NVLS_ENABLE=0 python -m benchmarks.transfer " + " ".join(sys.argv[1:])
    data = {
        "date": DATE,
        "command": command.strip(),
        "device": torch.cuda.get_device_name(0) if gpus else "none",
        "gpus": gpus,
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpus else None,
        "shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page_size": PAGE_SIZE,
                  "dtype": "bfloat16", "page_bytes": PAGE_BYTES},
        "quick": args.quick,
        "reps": reps,
        "modes": {},
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "transfer.json").write_text(json.dumps(data, indent=1))
        try:
            render(data, out)
        except Exception:  # noqa: BLE001 - a report glitch must not lose the JSON
            traceback.print_exc()

    for mode in modes:  # saved after every row and every mode: a later hang or kill loses nothing before it
        started = time.perf_counter()
        if mode == "alloc":
            data["allocator"] = allocator_bench()
            a = data["allocator"]
            print(
                f"alloc {a['num_pages']} pages (32K@0.5): allocate_ids {1e3 * a['allocate_ids_s']:.2f} ms, "
                f"encode_runs {1e3 * a['encode_runs_s']:.2f} ms, free {1e3 * a['free_ids_s']:.2f} ms; "
                f"list API allocate {1e3 * a['allocate_s']:.2f} ms, free {1e3 * a['free_s']:.2f} ms",
                flush=True,
            )
            save()
            continue

        def update(partial: dict, mode: str = mode) -> None:
            data["modes"][mode] = partial
            save()

        try:
            data["modes"][mode] = run_mode(mode, contexts, reps, mode_timeout, on_update=update)
        except Exception:  # noqa: BLE001 - record it, go on
            data["modes"][mode] = {
                **data["modes"].get(mode, {"mode": mode, "rows": []}),
                "error": traceback.format_exc(),
            }
        data["modes"][mode]["wall_s"] = time.perf_counter() - started
        if "error" in data["modes"][mode]:
            print(f"{mode} FAILED:\n{data['modes'][mode]['error']}", flush=True)
        h = data["modes"][mode].get("handoff") or {}
        if h:
            print(
                f"{mode} handoff 32K@0.5: transport only {1e3 * h['transport_only_s']:.2f} ms, with allocator "
                f"{1e3 * h['with_pool_allocator_s']:.2f} ms (reserve {1e3 * h['with_pool_allocator_reserve_s']:.2f} ms),"
                f" + checksum {1e3 * h['with_allocator_and_checksum_s']:.2f} ms",
                flush=True,
            )
        save()


# ---- report -----------------------------------------------------------------------------------------
def render(data: dict, out: Path) -> None:
    lines = [
        "# KV transfer benchmark (cuda_ipc, nccl)",
        "",
        f"Device: {data['gpus']} x {data['device']} (the `nvidia-h200-x2` kind: two H200 over NVLink), "
        f"torch {data['torch']}, NCCL {data['nccl']}. Date: {data['date']}.",
        "",
        f"Command: `{data['command']}`",
        "",
        *([f"Provenance: {data['source']}", ""] if data.get("source") else []),
        "Llama-3.1-8B shape: 32 layers x 8 KV heads, head_dim 128, bf16, page_size 16 (8 KiB pages, 128 KiB of KV "
        "per token). Every head keeps round(retention x context) tokens. GB/s = payload bytes / time (bytes "
        "moved once; a copy's read + write would count twice). Times are medians of the repetitions after one "
        "warm-up. Raw ceilings are measured in the same run: a device-to-device `copy_` of the same size "
        "(cuda_ipc: same GPU, or GPU1 -> GPU0 peer copy) and one NCCL send/recv of one contiguous buffer of "
        "the same size (nccl). `contiguous` / `scattered` = destination page ids consecutive (fresh pool) or "
        "a random permutation of the pool. Every configuration's pages were verified on the decode side "
        "(position-weighted 64-bit word sum of the pool pages == the sender's).",
        "",
    ]
    for mode, res in data["modes"].items():
        lines += [f"## {mode}", ""]
        if "error" in res:
            lines += ["Failed:", "", "```", res["error"][-3000:], "```", ""]
            if not res.get("rows"):
                continue
        lines += [
            "| context | retention | pages | MB moved | moved / (r x full) | manifest share | contiguous GB/s | "
            "scattered GB/s | raw GB/s | contiguous % raw | scattered % raw | verified |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in res["rows"]:
            gb = row["payload_bytes"] / 1e9
            share = row["manifest_bytes"] / row["payload_bytes"]
            ratio = row["payload_bytes"] / (row["retention"] * row["uncompressed_bytes"])
            c, s, r = gb / row["contiguous_s"], gb / row["scattered_s"], gb / row["raw_s"]
            ok = row["contiguous_verified"] and row["scattered_verified"]
            lines.append(
                f"| {row['context']} | {row['retention']} | {row['num_pages']} | {gb * 1e3:.1f} | {ratio:.4f} | "
                f"{share:.2e} | {c:.1f} | {s:.1f} | {r:.1f} | {100 * c / r:.0f}% | {100 * s / r:.0f}% | {ok} |"
            )
        h = res.get("handoff") or {}
        if h:
            lines += [
                "",
                f"Handoff, 32K context at retention 0.5 ({h['payload_bytes'] / 1e6:.0f} MB), prefill finished -> "
                "decode ready (control messages over a local Pipe, not gRPC):",
                "",
                f"- transport only (destination ids known): {1e3 * h['transport_only_s']:.2f} ms",
                f"- with the engine's pool allocator (KVPool.allocate_ids of {h['num_pages']} pages): "
                f"{1e3 * h['with_pool_allocator_s']:.2f} ms"
                + (
                    f" (of which the decode side's reserve, allocate + page runs: "
                    f"{1e3 * h['with_pool_allocator_reserve_s']:.2f} ms)"
                    if "with_pool_allocator_reserve_s" in h
                    else ""
                ),
                f"- plus sum64 checksum on both ends: {1e3 * h['with_allocator_and_checksum_s']:.2f} ms",
            ]
        o = res.get("overlap")
        if o and "error" not in o:
            lines += [
                "",
                f"Layer-wise overlap (32K at 0.5; {o['layers']} layers, a [32768x4096]x[4096x14336] bf16 matmul "
                "stands in for each layer's prefill; the overlapped run sends each layer's pages right after "
                "its matmul):",
                "",
                "| | compute (ms) | tail after compute (ms) | total (ms) |",
                "|---|---|---|---|",
                f"| ship after prefill | {1e3 * o['sequential_compute']:.1f} | {1e3 * o['sequential_tail']:.2f} | "
                f"{1e3 * o['sequential_total']:.1f} |",
                f"| layer-wise | {1e3 * o['overlap_compute']:.1f} | {1e3 * o['overlap_tail']:.2f} | "
                f"{1e3 * o['overlap_total']:.1f} |",
            ]
        elif o:
            lines += ["", "Layer-wise overlap failed:", "", "```", o["error"][-2000:], "```"]
        lines.append("")
    a = data.get("allocator")
    if a:
        lines += [
            "## Pool allocator (host, no GPU)",
            "",
            f"{a['num_pages']} pages (a 32K request at retention 0.5), median of {a['reps']}: "
            f"`KVPool.allocate_ids` {1e3 * a['allocate_ids_s']:.2f} ms, `encode_runs` {1e3 * a['encode_runs_s']:.2f} ms, "
            f"`free` of the id tensor {1e3 * a['free_ids_s']:.2f} ms; with Python lists (`allocate` / `free`): "
            f"{1e3 * a['allocate_s']:.2f} / {1e3 * a['free_s']:.2f} ms.",
            "",
        ]
    lines += _targets(data)
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    _plot(data, out / "transfer.png")


def _targets(data: dict) -> list[str]:
    lines = ["## Targets", ""]
    for mode, res in data["modes"].items():
        rows = [r for r in res.get("rows", []) if r["payload_bytes"] >= 64 << 20]
        if rows:
            worst_c = min(r["raw_s"] / r["contiguous_s"] for r in rows)
            worst_s = min(r["raw_s"] / r["scattered_s"] for r in rows)
            lines.append(
                f"- {mode}: >= 80% of raw for transfers >= 64 MB: worst contiguous {100 * worst_c:.0f}%, "
                f"worst scattered {100 * worst_s:.0f}% -> {'met' if min(worst_c, worst_s) >= 0.8 else 'NOT met'}"
            )
        h = res.get("handoff") or {}
        if h:
            t = h["with_pool_allocator_s"]
            lines.append(
                f"- {mode}: handoff 32K@0.5 <= 10 ms: {1e3 * t:.2f} ms with the pool allocator "
                f"({1e3 * h['transport_only_s']:.2f} ms transport only) -> {'met' if t <= 0.010 else 'NOT met'}"
            )
    return [*lines, ""]


def _plot(data: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not any(res.get("rows") for res in data["modes"].values()):
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"ipc-1gpu": "tab:blue", "ipc-2gpu": "tab:green", "nccl-2gpu": "tab:red"}
    for mode, res in data["modes"].items():
        rows = sorted(res.get("rows", []), key=lambda r: r["payload_bytes"])
        if not rows:
            continue
        mb = [r["payload_bytes"] / 1e6 for r in rows]
        col = colors.get(mode)
        ax.plot(
            mb, [r["payload_bytes"] / 1e9 / r["raw_s"] for r in rows], "--", color=col, label=f"{mode} raw"
        )
        ax.plot(mb, [r["payload_bytes"] / 1e9 / r["contiguous_s"] for r in rows], "o-", color=col,
                label=f"{mode} contiguous")  # fmt: skip
        ax.plot(mb, [r["payload_bytes"] / 1e9 / r["scattered_s"] for r in rows], "x:", color=col,
                label=f"{mode} scattered")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload (MB)")
    ax.set_ylabel("GB/s (payload / time)")
    ax.set_title(f"KV transfer, Llama-3.1-8B shape, {data['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
