"""The `kvferry` command line.

kvferry demo                         start a local cluster, ask the bundled document a question, stop
kvferry up                           coordinator + prefill + decode on this machine, restarted when they
                                     crash (Ctrl-C stops all), the OpenAI-compatible API on :8000
                                     (--http-port); --prefill-device cuda:0 --decode-device cuda:1
                                     --transport auto --auth-token-file FILE ...
kvferry bench                        load generator: TTFT / TPOT / throughput, JSON + PNG (a local
                                     cluster, --target HOST:PORT, --colocated or --compare)
kvferry ask --doc FILE Q1 [Q2 ...]   stream answers about a document through a running cluster (the
                                     document is cached once and every question reuses it)
kvferry stats                        the coordinator's counters and its nodes' page accounting
kvferry coordinator|prefill|decode   run one service (the same flags as python -m <service>)
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvferry.clients import bench
from kvferry.clients.client import DEFAULT_ADDRESS, Client
from kvferry.clients.cluster_options import add_cluster_flags, cluster_options
from kvferry.clients.errors import KvferryRpcError
from kvferry.clients.local_cluster import DEFAULT_PORTS, ClusterError, LocalCluster
from kvferry.clients.supervisor import RestartPolicy, Supervisor
from kvferry.engine.retention import AUTO, DEFAULT_QUALITY_TARGET

BUNDLED_DOCUMENT = Path(__file__).resolve().parent.parent / "engine" / "data" / "marrowick_canal.txt"
BUNDLED_QUESTION = "Who was the chief engineer of the Marrowick Canal?"
DEFAULT_HTTP_PORT = 8000  # the OpenAI-compatible API, on vLLM's default port
SERVICES = {
    "coordinator": "kvferry.coordinator",
    "prefill": "kvferry.prefill_service",
    "decode": "kvferry.decode_service",
}


QUERY_AWARE_METHODS = ("snapkv", "kvcompress")  # their scores need the question: no cached context


def document_context(document: str) -> list[dict[str, str]]:
    """The turns before the question: the document, which a cached context holds."""
    return [{"role": "system", "content": "Answer the question using the document.\n\n" + document}]


def document_messages(document: str, question: str) -> list[dict[str, str]]:
    """The chat a document question becomes: the document, then the question as its own last turn (so
    `protect_last_user_turn` keeps the whole question however hard the document is compressed, and
    the document is the context a cache keeps)."""
    return [*document_context(document), {"role": "user", "content": question}]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _compression(args: argparse.Namespace) -> dict[str, Any]:
    """`ask` and `demo`: compactor at retention auto unless the flags say otherwise; the question is
    its own last user turn (document_messages), which protect_last_user_turn keeps."""
    spec: dict[str, Any] = {"method": args.method or "compactor", "protect_last_user_turn": True}
    if args.keep_tokens is not None:
        spec["keep_tokens"] = args.keep_tokens
    else:
        spec["retention"] = args.retention
    if args.quality_target is not None:
        spec["quality_target"] = args.quality_target
    return spec


def _describe(spec: dict[str, Any]) -> str:
    if spec["method"] == "none":
        return "none (the whole cache)"
    if "keep_tokens" in spec:
        return f"{spec['method']} keeping {spec['keep_tokens']} tokens per head"
    target = (
        f" (quality target {spec.get('quality_target', DEFAULT_QUALITY_TARGET)})"
        if spec["retention"] == AUTO
        else ""
    )
    return f"{spec['method']} at retention {spec['retention']}{target}"


def ask(
    address: str,
    document: str,
    questions: str | Sequence[str],
    compression: dict[str, Any] | None,
    max_new_tokens: int,
    out: Any = None,
    security: dict[str, Any] | None = None,
    cache_context: bool = True,
) -> int:
    """Stream each answer to `out`, then one summary line of what compression kept and shipped.
    With `cache_context` (and a method that may compress a context on its own) the document is a
    cached context: several questions put it once (PutContext) and then send only themselves, each
    prefilled over the document's compressed pages. `security`: Client keywords (token, tls_ca,
    tls_cert, tls_key, tls_server_name)."""
    out = out or sys.stdout  # looked up at call time: callers and tests may swap sys.stdout
    questions = [questions] if isinstance(questions, str) else list(questions)
    caching = cache_context and (compression or {}).get("method") not in QUERY_AWARE_METHODS
    with Client(address, **(security or {})) as client:
        handle = None
        if caching and len(questions) > 1:
            handle = client.put_context(messages=document_context(document), compression=compression)
            cached = f"{handle.cached_tokens:,} tokens cached" if handle.cached else "not cached (too large)"
            out.write(
                f"[document put once: {handle.context_tokens:,} tokens, {cached}, {handle.seconds:.2f} s]\n"
            )
        for i, question in enumerate(questions):
            if len(questions) > 1:
                out.write(f"{'' if i == 0 else chr(10)}Q{i + 1}: {question}\nA{i + 1}: ")
            stats = None
            for chunk in client.stream(
                messages=[{"role": "user", "content": question}]
                if handle
                else document_messages(document, question),
                compression=None if handle else compression,
                context=handle,
                cache_context=caching,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
            ):
                out.write(chunk.text)
                out.flush()
                if chunk.stats is not None:
                    stats = chunk.stats
            out.write("\n")
            if stats is not None:
                out.write(summary(stats) + "\n")
    return 0


def summary(stats: Any) -> str:
    p = stats.prefill
    how = p.compression_method
    if p.HasField("context_nll"):
        how += f", auto chose {p.chosen_retention:.0%} for context NLL {p.context_nll:.2f}"
    kept = f"kept {p.kept_tokens:,} of {p.full_tokens:,} cached tokens ({p.retention:.0%}, {how})"
    shipped = f"shipped {_human_bytes(p.kv_bytes_shipped)} of {_human_bytes(p.kv_bytes_full)} over {p.transport or '-'}"
    tokens = stats.decode.output_tokens if stats.HasField("decode") else 1
    timing = f"TTFT {stats.ttft_seconds:.2f} s, {tokens} tokens in {stats.total_seconds:.2f} s"
    parts = [f"{p.prompt_tokens:,} prompt tokens", kept, shipped]
    if p.context_cache and p.context_cache != "off":
        decode = stats.decode.context_cache if stats.HasField("decode") else "-"
        parts.append(
            f"context {p.context_cache} on prefill, {decode} on decode "
            f"({p.context_tokens:,} tokens cached, {p.prefill_tokens_computed:,} computed)"
        )
    return "[" + "; ".join([*parts, timing]) + "]"


def print_stats(address: str, out: Any = None, security: dict[str, Any] | None = None) -> int:
    out = out or sys.stdout
    with Client(address, timeout=10.0, **(security or {})) as client:
        s = client.stats()
        info = client.info()
    out.write(f"coordinator {address}: up {s.uptime_seconds:.0f} s\n")
    out.write(
        f"  requests: {s.requests_total} total, {s.requests_active} active, {s.requests_failed} failed, "
        f"{s.requests_cancelled} cancelled\n"
    )
    out.write(f"  tokens: {s.prompt_tokens_total:,} prompt, {s.output_tokens_total:,} output\n")
    if s.kv_bytes_full_total:
        share = s.kv_bytes_shipped_total / s.kv_bytes_full_total
        out.write(
            f"  KV shipped: {_human_bytes(s.kv_bytes_shipped_total)} of {_human_bytes(s.kv_bytes_full_total)}"
            f" uncompressed ({share:.0%})\n"
        )
    finished = s.requests_total - s.requests_active - s.requests_failed - s.requests_cancelled
    if finished > 0:
        out.write(f"  mean TTFT: {s.ttft_seconds_sum / finished:.3f} s\n")
    if s.context_hits_total or s.context_misses_total:
        out.write(
            f"  cached contexts: prefill {s.context_hits_total} hits / {s.context_misses_total} misses, "
            f"decode {s.decode_context_hits_total} hits / {s.decode_context_misses_total} misses\n"
        )
    for kind, nodes in (("prefill", info.prefill_nodes), ("decode", info.decode_nodes)):
        for n in nodes:
            if not n.reachable:
                out.write(f"  {kind} {n.address}: UNREACHABLE ({n.error})\n")
                continue
            pool = n.pool
            out.write(
                f"  {kind} {n.address}: load {n.load}, pages {pool.used_pages - pool.cached_pages}/{pool.total_pages}"
                f" used by requests, {pool.available_pages} available "
                f"({_human_bytes(pool.available_pages * pool.bytes_per_page)}), model {n.model.source} [{n.model.dtype}]\n"
            )
            out.write(f"    {context_cache_line(n.context_cache)}\n")
    return 0


def context_cache_line(c: Any) -> str:
    """One node's cache of compressed contexts (ContextCacheInfo), in one line."""
    line = (
        f"context cache: {c.device_entries} in the pool ({_human_bytes(c.device_bytes)} of "
        f"{_human_bytes(c.device_budget_bytes)}), {c.host_entries} in host memory ({_human_bytes(c.host_bytes)} of "
        f"{_human_bytes(c.host_budget_bytes)}); {c.hits} hits, {c.misses} misses, {c.evictions} evictions"
    )
    if c.put_contexts:
        line += f"; {c.put_contexts} put"
    return line


def _start_cluster(
    args: argparse.Namespace,
    ports: dict[str, int] | None,
    log_dir: Path | None,
    coordinator_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> LocalCluster:
    cluster = LocalCluster.from_options(
        cluster_options(args), ports=ports, log_dir=log_dir, coordinator_args=coordinator_args, env=env or {}
    )
    print("starting coordinator, prefill and decode services (each loads the model; ~15-30 s on CPU)...")
    cluster.start()
    start = time.monotonic()
    try:
        cluster.wait_ready(
            timeout=args.ready_timeout,
            progress=lambda line: print(f"  [{time.monotonic() - start:5.1f} s] {line}", flush=True),
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop `up` cleanly, also when started with SIGINT ignored (a background
    job of a non-interactive shell inherits SIG_IGN, and Python then installs no handler of its own)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def _auth_env(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """The services' environment for the bearer token (a file named by --auth-token-file, or
    KVFERRY_AUTH_TOKEN inherited from this environment) and the flags a client then needs."""
    from kvferry.serving.security import read_token

    if args.auth_token_file is None:
        return {}, " --token-file FILE" if os.environ.get("KVFERRY_AUTH_TOKEN") else ""
    path = str(Path(args.auth_token_file).resolve())
    read_token(None, path)  # unreadable or empty: refused here, not by three children
    return {"KVFERRY_AUTH_TOKEN_FILE": path, "KVFERRY_AUTH_TOKEN": ""}, f" --token-file {path}"


def _stamped(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    _stop_on_signals()
    ports = {"coordinator": args.port, "prefill": args.port + 1, "decode": args.port + 2}
    env, token_flag = _auth_env(args)
    http = ["--http-port", str(args.http_port)] if args.http_port else []
    cluster = _start_cluster(args, ports, args.log_dir, [*http, *_policy_args(args)], env)
    print(f"kvferry is up: coordinator {cluster.coordinator_address} (clients connect here)")
    if args.http_port:
        print(f"  OpenAI-compatible API: http://{cluster.host}:{args.http_port}/v1")
    print(f"  prefill {cluster.address('prefill')}, decode {cluster.address('decode')}")
    if token_flag:
        print("  every service requires the bearer token")
    print(
        f"  try: kvferry ask --address {cluster.coordinator_address}{token_flag} --doc FILE 'your question'"
    )
    print("A crashed service is restarted; Ctrl-C stops all three.")
    supervisor = Supervisor(cluster, RestartPolicy(max_restarts=args.max_restarts), report=_stamped)
    try:
        while True:
            supervisor.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...")
    except ClusterError as e:
        print(f"error: {e}; stopping the others", file=sys.stderr)
        cluster.stop()
        return 1
    codes = cluster.stop()
    print("stopped: " + ", ".join(f"{node} exit {code}" for node, code in codes.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    document = BUNDLED_DOCUMENT.read_text()
    with tempfile.TemporaryDirectory(prefix="kvferry-demo-") as logs:
        log_dir = Path(logs)
        try:
            cluster = _start_cluster(args, None, log_dir)
        except ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            for log in sorted(log_dir.glob("*.log")):
                print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-15:]))
            return 1
        try:
            print(f"\ndocument: {BUNDLED_DOCUMENT.name} ({len(document):,} characters)")
            print(f"question: {args.question}")
            compression = _compression(args)
            print(f"compression: {_describe(compression)}\nanswer: ", end="", flush=True)
            return ask(
                cluster.coordinator_address, document, args.question, compression, args.max_new_tokens,
                cache_context=False,  # one question on a fresh cluster: nothing to reuse
            )  # fmt: skip
        finally:
            cluster.stop()


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """Client keywords from --token/--token-file/--tls-* (env KVFERRY_AUTH_TOKEN, KVFERRY_TLS_CA...)."""
    from kvferry.serving.security import read_token

    token = read_token(args.token or os.environ.get("KVFERRY_AUTH_TOKEN") or None, args.token_file)
    return dict(
        token=token,
        tls_ca=args.tls_ca or os.environ.get("KVFERRY_TLS_CA") or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
    )


def cmd_ask(args: argparse.Namespace) -> int:
    document = Path(args.doc).read_text()
    return ask(
        args.address,
        document,
        args.questions,
        _compression(args),
        args.max_new_tokens,
        security=_security(args),
        cache_context=args.cache_context,
    )


def cmd_stats(args: argparse.Namespace) -> int:
    return print_stats(args.address, security=_security(args))


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="coordinator host:port")
    p.add_argument("--token", help="the coordinator's bearer token [env KVFERRY_AUTH_TOKEN]")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--tls-ca", help="PEM CA to verify the coordinator: turns TLS on [env KVFERRY_TLS_CA]")
    p.add_argument("--tls-cert", help="PEM client certificate (when the coordinator requires mTLS)")
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    p.add_argument("--tls-server-name", help="name expected in the coordinator's certificate")


def _retention(text: str) -> float | str:
    """ "auto" or a number; its range is the server's to check (INVALID_ARGUMENT naming the field)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'want a fraction in (0, 1] or "{AUTO}", got {text!r}') from None


def _add_compression_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method", default="compactor",
        help="compression method (compactor, snapkv, kvcompress, streaming, random; none keeps the whole cache)",
    )  # fmt: skip
    p.add_argument(
        "--retention", type=_retention, default=AUTO,
        help='fraction of the prompt KV kept, in (0, 1], or "auto": chosen from the document to keep '
        "--quality-target of the full cache's quality (default: auto)",
    )  # fmt: skip
    p.add_argument(
        "--quality-target", type=float, help="auto: share of full-cache quality to keep (default 0.95)"
    )
    p.add_argument(
        "--keep-tokens", type=int, help="keep this many prompt tokens per KV head instead of a ratio"
    )


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression policy (the coordinator's: for requests that ask for none)")
    g.add_argument("--default-compression", help="method, e.g. compactor (default: none, the whole cache)")
    g.add_argument("--default-retention", help='a fraction in (0, 1] or "auto"')
    g.add_argument("--default-quality-target", help="auto's quality target, in (0, 1]")


def _policy_args(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("default_compression", "default_retention", "default_quality_target"):
        value = getattr(args, name, None)
        if value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    add_cluster_flags(p)
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load")


def cmd_bench(args: argparse.Namespace) -> int:
    return bench.run(args, "kvferry " + shlex.join(args.argv))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kvferry", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="local cluster answers a question about the bundled document")
    _add_engine_flags(demo)
    demo.add_argument("--question", default=BUNDLED_QUESTION)
    _add_compression_flags(demo)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(run=cmd_demo)

    up = sub.add_parser("up", help="start coordinator + prefill + decode here; Ctrl-C stops all")
    _add_engine_flags(up)
    up.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORTS["coordinator"],
        help="coordinator port; +1 prefill, +2 decode",
    )
    up.add_argument(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        help="the coordinator's OpenAI-compatible HTTP API (0: off)",
    )
    up.add_argument("--log-dir", type=Path, help="write each service's log here instead of this terminal")
    up.add_argument(
        "--auth-token-file",
        help="every service requires the bearer token in this file, and sends it to the others "
        "(or set KVFERRY_AUTH_TOKEN); clients pass it with --token-file",
    )
    up.add_argument(
        "--max-restarts",
        type=int,
        default=RestartPolicy.max_restarts,
        help="restarts of a crashed service within 5 minutes before `up` gives up and stops (0: never restart)",
    )
    _add_policy_flags(up)
    up.set_defaults(run=cmd_up)

    ask_p = sub.add_parser("ask", help="ask questions about a document through a running cluster")
    ask_p.add_argument("questions", nargs="+", metavar="question")
    ask_p.add_argument("--doc", required=True, help="text file holding the document")
    ask_p.add_argument(
        "--cache-context",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compress the document once and reuse it for every question (and later asks); not with "
        "snapkv or kvcompress, whose scores need the question",
    )
    _add_client_flags(ask_p)
    _add_compression_flags(ask_p)
    ask_p.add_argument("--max-new-tokens", type=int, default=128)
    ask_p.set_defaults(run=cmd_ask)

    bench_p = sub.add_parser(
        "bench",
        help="load generator: TTFT / TPOT / ITL / throughput p50-p99, KV, JSON + PNG",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_bench_flags(bench_p)
    bench_p.set_defaults(run=cmd_bench)

    stats = sub.add_parser("stats", help="coordinator counters and node page accounting")
    _add_client_flags(stats)
    stats.set_defaults(run=cmd_stats)

    for name in SERVICES:
        p = sub.add_parser(name, help=f"run a {name} service (see kvferry {name} --help)", add_help=False)
        p.set_defaults(run=None)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:  # hand every remaining flag to the service's own parser
        import importlib

        module = importlib.import_module(f"{SERVICES[argv[0]]}.__main__")
        return int(module.main(argv[1:]))
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except KvferryRpcError as e:
        where = f" (field {e.field})" if e.field else ""
        print(f"error: {e.code.name}: {e.details}{where}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # unreadable certificate or token file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`kvferry stats | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere
        return 1


if __name__ == "__main__":
    sys.exit(main())
