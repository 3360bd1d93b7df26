"""A service started by `kvferry up` (clients/local_cluster.py) stops when the process that started it
dies, however it dies (SIGKILL included): the parent names itself in KVFERRY_PARENT_PID and the service,
first thing in its `__main__`, asks Linux for a parent-death signal (`PR_SET_PDEATHSIG` = SIGTERM, which
it handles as a graceful stop). If the parent died before the signal was armed, nobody would send it: the
service sees it has another parent and exits at once.

The child arms the signal itself rather than in a `preexec_fn` between fork and exec: a `preexec_fn` makes
subprocess fork (not vfork) a parent that runs gRPC threads, and gRPC's fork handlers then ran in the
child before exec and at times aborted it (SIGABRT, "epoll_wait error: Bad file descriptor") — a
restarted node died at start. Without one the parent spawns the child with vfork, which runs no fork
handlers. The kernel sends the signal when the parent *thread* that started the child exits, so start
services from a thread that outlives them (the main thread does)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "KVFERRY_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_environment() -> dict[str, str]:
    """What a starting process adds to its child's environment to have the child die with it."""
    return {PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Arm the parent-death signal when KVFERRY_PARENT_PID names our parent (a no-op without it, and off
    Linux). The variable is removed, so processes this service starts are not tied to its parent."""
    value = os.environ.pop(PARENT_PID_ENV, None)
    if not value or not sys.platform.startswith("linux"):
        return
    try:
        parent = int(value)
    except ValueError:
        sys.exit(f"{PARENT_PID_ENV}={value!r} is not a process id")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        sys.exit(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(f"the process that started this service ({parent}) has exited")
