"""A private network namespace for the calling thread (``private_network``): Ray's
multi-node mode listens on every interface, so the multi-node tests run their cluster
where the only interface is loopback (../shared/design/ENVIRONMENT.md, Ray).

Linux keeps the network namespace per thread: ``unshare(CLONE_NEWNET)`` moves this thread
(and every process and thread it starts from now on) into a new namespace; on exit
``setns`` moves it back. Other threads of the test process (pytest-xdist's channel, the
timeout thread) stay where they were. Needs CAP_SYS_ADMIN (root here); the caller skips
otherwise."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from typing import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def why_not_available() -> str | None:
    """None when :func:`private_network` can work here, else the reason."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a private network namespace needs root (CAP_SYS_ADMIN) for unshare(CLONE_NEWNET)"
    if not os.path.exists("/proc/thread-self/ns/net"):
        return "no /proc/thread-self/ns/net (not Linux, or /proc not mounted)"
    return None


@contextlib.contextmanager
def private_network() -> Iterator[None]:
    """Run the block in a fresh network namespace with only ``lo`` (up)."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield
    finally:
        if _libc.setns(original, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns back to the original network namespace: {os.strerror(err)}")
        os.close(original)
