"""`kvferry up` starts three real processes with the default model (its --transport flag reaching the
prefill service, its compression policy the coordinator), `kvferry ask` answers a question about a
document through them (at retention auto by default) and reports what compression kept and how it was
shipped, `kvferry stats` shows the requests, and Ctrl-C (SIGINT) stops every process cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvferry.clients import Client
from kvferry.clients.cli import BUNDLED_DOCUMENT, BUNDLED_QUESTION
from kvferry.clients.local_cluster import free_port

pytestmark = pytest.mark.slow
KVFERRY = [sys.executable, "-P", "-m", "kvferry.clients.cli"]


def test_up_ask_stats_and_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    while any(_taken(p) for p in (port + 1, port + 2)):
        port = free_port()
    http_port = free_port()
    logs = tmp_path / "logs"
    up = subprocess.Popen(
        [
            *KVFERRY,
            "up",
            "--port",
            str(port),
            "--log-dir",
            str(logs),
            "--http-port",
            str(http_port),
            "--kv-cache-bytes",
            str(256 << 20),
            "--torch-threads",
            "1",
            "--transport",
            "grpc",  # auto would pick shm here (tests/test_bench.py runs that); this checks the flag
            "--default-compression",
            "streaming",  # the coordinator's policy, for requests that ask for no compression
            "--default-retention",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        lines = []
        deadline = time.monotonic() + 300
        while not any("kvferry is up" in line for line in lines):
            assert up.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(up.stdout.readline())  # type: ignore[union-attr]
        assert address in lines[-1]
        openai_line = up.stdout.readline()  # type: ignore[union-attr]
        assert f"OpenAI-compatible API: http://127.0.0.1:{http_port}/v1" in openai_line

        ask = subprocess.run(
            [*KVFERRY, "ask", "--address", address, "--doc", str(BUNDLED_DOCUMENT), "--retention", "0.5",
             "--max-new-tokens", "24", BUNDLED_QUESTION],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert ask.returncode == 0, ask.stderr
        assert "Eleanor Brandt" in ask.stdout
        # the document (a cached context) kept at 50%, the question's tokens after it whole
        assert re.search(r"\(5[01]%, compactor\)", ask.stdout) and "over grpc" in ask.stdout

        bad = subprocess.run(
            [*KVFERRY, "ask", "--address", address, "--doc", str(BUNDLED_DOCUMENT), "--retention", "2", "Q?"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 2
        assert "INVALID_ARGUMENT" in bad.stderr and "compression.retention" in bad.stderr

        auto = subprocess.run(  # ask's default: compactor at retention auto
            [*KVFERRY, "ask", "--address", address, "--doc", str(BUNDLED_DOCUMENT), "--max-new-tokens", "2",
             BUNDLED_QUESTION],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert auto.returncode == 0, auto.stderr
        assert "compactor, auto chose" in auto.stdout and "for context NLL" in auto.stdout

        with Client(address, timeout=120) as client:  # a request naming no compression gets the policy
            p = client.generate("The river was calm that morning. " * 20, max_new_tokens=2).stats.prefill
        assert (p.compression_method, p.chosen_retention) == ("streaming", 0.5)

        stats = subprocess.run(
            [*KVFERRY, "stats", "--address", address], capture_output=True, text=True, timeout=60
        )
        assert stats.returncode == 0, stats.stderr
        assert "requests: 4 total, 0 active, 1 failed" in stats.stdout
        assert "decode 127.0.0.1" in stats.stdout and "0/" in stats.stdout  # no page left in use
        check_openai_api_equals_grpc(address, f"http://127.0.0.1:{http_port}/v1")
    finally:
        up.send_signal(signal.SIGINT)
        try:
            out, _ = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # never leave a cluster behind, even when the test fails
            up.kill()
            subprocess.run(["pkill", "-f", f"--port {port}|--port {port + 1}|--port {port + 2}"], check=False)
            raise
    assert up.returncode == 0, out
    stopped = [line for line in out.splitlines() if line.startswith("stopped:")]
    assert stopped and stopped[0].count("exit 0") == 3, out


def check_openai_api_equals_grpc(address: str, base_url: str) -> None:
    """The README's OpenAI snippet against `kvferry up` with SmolLM2: chat (whole and streamed) and text
    completions, compression through extra_body; the same greedy tokens as the gRPC API."""
    import openai

    from kvferry.clients import Client

    document = BUNDLED_DOCUMENT.read_text()
    messages = [
        {"role": "system", "content": "Answer the question using the document.\n\n" + document},
        {"role": "user", "content": BUNDLED_QUESTION},
    ]
    compression = {"method": "compactor", "retention": 0.5, "protect_last_user_turn": True}
    with Client(address, timeout=300) as grpc_client:
        expected = grpc_client.generate(
            messages=messages, compression=compression, max_new_tokens=24, temperature=0
        )
        expected_text = grpc_client.generate("The Marrowick Canal", max_new_tokens=12, temperature=0)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, extra_body={"compression": compression}
    )
    assert reply.choices[0].message.content == expected.text and "Eleanor Brandt" in expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.model_extra["kvferry"]["retention"] == pytest.approx(expected.stats.prefill.retention)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
        extra_body={"compression": compression},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.text
    text = client.completions.create(model=model, prompt="The Marrowick Canal", max_tokens=12, temperature=0)
    assert text.choices[0].text == expected_text.text


def _taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_reader_that_goes_away_ends_the_cli_without_a_traceback() -> None:
    """`kvferry stats | head -1` and the like: a closed stdout is exit status 1 and no traceback."""
    code = (
        "from kvferry.clients import cli\n"
        "cli.print_stats = lambda *args, **kwargs: print('x' * 1_000_000) or 0  # more than a pipe holds\n"
        "raise SystemExit(cli.main(['stats']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err
