"""Ray actors run ``map_batches`` calls in an executor thread, where OpenMP starts from
``OMP_NUM_THREADS`` (Ray sets it to the actor's CPUs): a ``torch.set_num_threads`` in the
constructor does not reach the forward pass, which then runs on one core. The check reads
OpenMP's own per-thread setting (``omp_get_max_threads`` of the libgomp torch loaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import ctypes, json, os, threading
from concurrent.futures import ThreadPoolExecutor
import torch
from dinoalign.ray_runtime import TorchThreads

maps = open(f"/proc/{os.getpid()}/maps").read().split()
gomp = ctypes.CDLL(next(p for p in maps if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))))
threads = TorchThreads(2)  # in the constructor's thread, as an actor's __init__ does

def call(fix):
    if fix:
        threads()
    return gomp.omp_get_max_threads()

pool = ThreadPoolExecutor(1)  # like Ray's executor thread
print(json.dumps({"init_thread": gomp.omp_get_max_threads(), "call_without": pool.submit(call, False).result(),
                  "call_with": ThreadPoolExecutor(1).submit(call, True).result()}))
"""


def test_torch_threads_reach_the_calling_thread() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray gives a 1-CPU actor
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["init_thread"] == 2
    assert seen["call_without"] == 1  # the defect this guards against is real here
    assert seen["call_with"] == 2


def test_a_ray_address_where_nothing_listens_fails_in_seconds_naming_it(monkeypatch) -> None:
    """ray.init retries a GCS that does not answer for minutes without a word; the
    address is tried first and a ConfigError (one line from the CLI, exit 2) names it."""
    import socket
    import time

    import pytest
    import ray

    from dinoalign.errors import ConfigError
    from dinoalign.ray_runtime import init_ray

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def init(*args, **kwargs):
        raise AssertionError("ray.init was called: it would wait for this address for minutes")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever this session's tests started
    monkeypatch.setattr(ray, "init", init)
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        start = time.monotonic()
        with pytest.raises(ConfigError) as caught:
            init_ray()
        assert time.monotonic() - start < 10
        message = str(caught.value)
        assert message.startswith(f"RAY_ADDRESS={address}: no Ray ") and f"127.0.0.1:{port}" in message
        assert "\n" not in message
