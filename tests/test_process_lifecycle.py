"""One process per port, and a supervised local cluster, on real processes: a second service on a taken
port exits at once with a clear message (gRPC's default SO_REUSEPORT would let it share the port and
take half the calls); `kvferry up` restarts a service killed with SIGKILL (logged, with backoff), and its
dead decode node's shared-memory pool file is reclaimed by the restart; it gives up with a message
naming the node when a service keeps crashing; and its children stop when `up` itself is killed with
SIGKILL."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from builders import TinyModel

from kvferry.clients import Client, KvferryRpcError
from kvferry.clients.local_cluster import free_port
from kvferry.coordinator import server as coordinator_server
from kvferry.coordinator.settings import CoordinatorSettings
from kvferry.serving.healthcheck import is_serving
from kvferry.serving.server import ListenError

KVFERRY = [sys.executable, "-P", "-m", "kvferry.clients.cli"]
TOKEN = "supervised-token"


def test_a_second_host_on_a_taken_port_fails_to_start() -> None:
    async def go() -> str:
        first = coordinator_server.build(CoordinatorSettings(port=0))
        await first.start()
        try:
            second = coordinator_server.build(CoordinatorSettings(port=first.port))
            with pytest.raises(ListenError) as err:
                await second.start()
            await second.server.stop(None)
            return str(err.value)
        finally:
            await first.stop()

    message = asyncio.run(go())
    assert "is in use by another process" in message and "--port" in message


@pytest.mark.slow
def test_a_second_service_process_on_a_taken_port_exits_with_a_clear_message() -> None:
    port = free_port()
    command = [*KVFERRY, "coordinator", "--port", str(port), "--grace-seconds", "0"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not is_serving(f"127.0.0.1:{port}", timeout=0.5):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"port {port} is in use by another process" in second.stderr, second.stderr
        assert is_serving(f"127.0.0.1:{port}", timeout=2)  # the first one is untouched
    finally:
        first.terminate()
        first.wait(30)


# ---- kvferry up -----------------------------------------------------------------------------------
class Up:
    """A `kvferry up` process on the tiny model; its output lines are read on a thread."""

    def __init__(self, tiny: TinyModel, tmp_path: Path, *flags: str) -> None:
        port = free_port()
        while any(_taken(p) for p in (port + 1, port + 2)):
            port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.token_file = tmp_path / "token"
        self.token_file.write_text(TOKEN)
        self.process = subprocess.Popen(
            [*KVFERRY, "up", "--port", str(port), "--log-dir", str(tmp_path / "logs"),
             "--auth-token-file", str(self.token_file), "--model", str(tiny.path), "--device", "cpu",
             "--dtype", "float32", "--max-model-len", "512", "--kv-cache-bytes",
             str(4 << 20), "--torch-threads", "1", "--http-port", "0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is None and time.monotonic() < deadline:
                    continue
                raise AssertionError(
                    f"no line with {text!r} after {timeout} s:\n{''.join(self.seen)}"
                ) from None
            self.seen.append(line)
            if text in line:
                return line

    def children(self) -> dict[str, psutil.Process]:
        """The three services, by role, from the process table."""
        roles = {"kvferry.decode_service": "decode", "kvferry.prefill_service": "prefill",
                 "kvferry.coordinator": "coordinator"}  # fmt: skip
        out = {}
        for child in psutil.Process(self.process.pid).children():
            cmdline = child.cmdline()
            for module, role in roles.items():
                if module in cmdline:
                    out[role] = child
        return out

    def generate(self) -> list[int]:
        with Client(self.address, timeout=30, token=TOKEN) as client:
            return client.generate(
                list(range(1, 40)), max_new_tokens=4, temperature=0, ignore_eos=True
            ).token_ids


def _taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _shm_files(pid: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"kvferry-kv-{pid}-*"))


def _gone(processes: list[psutil.Process], timeout: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


@pytest.fixture
def up_cluster(tiny_model: Callable[[str], TinyModel], tmp_path: Path) -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(*flags: str) -> Up:
        up = Up(tiny_model("llama"), tmp_path, *flags)
        started.append(up)
        up.wait_for("kvferry is up")
        return up

    yield start
    for up in started:  # never leave a cluster behind, even when a test fails
        children = up.children() if up.process.poll() is None else {}
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGINT)
            try:
                up.process.wait(60)
            except subprocess.TimeoutExpired:
                up.process.kill()
        for child in children.values():
            if child.is_running():
                child.kill()


@pytest.mark.slow
def test_up_restarts_a_killed_service_and_gives_up_when_it_keeps_crashing(
    up_cluster: Callable[..., Up],
) -> None:
    up = up_cluster("--max-restarts", "1")
    expected = up.generate()
    with Client(up.address, timeout=10) as anonymous, pytest.raises(KvferryRpcError) as err:
        anonymous.info()  # the token reached the services: no caller gets in without it
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED

    decode = up.children()["decode"]
    assert _shm_files(decode.pid)  # its KV pool lives in /dev/shm
    decode.send_signal(signal.SIGKILL)
    line = up.wait_for("decode: exited with code -9")
    assert "restarting in 1 s" in line
    up.wait_for("decode: restarted")
    up.wait_for("decode: serving again")
    assert up.generate() == expected  # the coordinator found the new decode node by itself
    assert not _shm_files(decode.pid)  # the dead node's pool file was reclaimed by the restart
    restarted = up.children()["decode"]
    assert restarted.pid != decode.pid and _shm_files(restarted.pid)

    others = [p for role, p in up.children().items() if role != "decode"]
    restarted.send_signal(signal.SIGKILL)  # a second crash within the window: more than --max-restarts 1
    up.wait_for("not restarting it again")
    assert up.process.wait(60) == 1
    assert _gone(others, timeout=30)  # the others were stopped


@pytest.mark.slow
def test_services_stop_when_up_is_killed_with_sigkill(up_cluster: Callable[..., Up]) -> None:
    up = up_cluster()
    children = up.children()
    assert set(children) == {"coordinator", "prefill", "decode"}
    decode_pid = children["decode"].pid
    os.kill(up.process.pid, signal.SIGKILL)
    up.process.wait(10)
    assert _gone(list(children.values()), timeout=30), [p.pid for p in children.values() if p.is_running()]
    assert not _shm_files(decode_pid)  # the SIGTERM they got let decode unlink its pool file


ARMED = """
import ctypes, os
from kvferry.serving.parent_death import die_with_parent
die_with_parent()
signal = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
print(signal.value, os.environ.get("KVFERRY_PARENT_PID"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_service_arms_its_parent_death_signal_only_for_the_parent_that_named_itself() -> None:
    """The child arms SIGTERM itself (no preexec_fn: the parent spawns without running fork handlers), and
    refuses to start when the process named is not its parent (it died before the signal was armed)."""
    run = [sys.executable, "-P", "-c", ARMED]
    armed = subprocess.run(run, env={**os.environ, "KVFERRY_PARENT_PID": str(os.getpid())}, capture_output=True,
                           text=True, timeout=60, check=True)  # fmt: skip
    assert armed.stdout.split() == [str(int(signal.SIGTERM)), "None"]  # armed; not passed on to its children
    unarmed = subprocess.run(run, env={k: v for k, v in os.environ.items() if k != "KVFERRY_PARENT_PID"},
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert unarmed.stdout.split() == ["0", "None"]
    orphan = subprocess.run(run, env={**os.environ, "KVFERRY_PARENT_PID": "1"}, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert orphan.returncode == 1 and "has exited" in orphan.stderr


def test_a_node_that_dies_at_start_is_reported_with_its_last_log_lines(tmp_path: Path) -> None:
    """wait_ready's error names the node, its exit code and the end of its log (a CI machine's log files
    are gone by the time anyone reads the failure)."""
    from kvferry.clients.local_cluster import ClusterError, LocalCluster

    cluster = LocalCluster(log_dir=tmp_path)
    with open(tmp_path / "decode.log", "wb") as log:
        script = "import sys; print('\\n'.join(f'line {i}' for i in range(40))); sys.exit(3)"
        cluster.processes["decode"] = subprocess.Popen([sys.executable, "-c", script], stdout=log)
    cluster.processes["decode"].wait(30)
    with pytest.raises(ClusterError) as err:
        cluster.wait_ready(timeout=5, nodes=["decode"])
    message = str(err.value)
    assert (
        "decode service exited with code 3" in message and "line 39" in message and "line 27" not in message
    )
