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


# ----------------------------------------------------------------------------- a quiet Ray


def test_ray_data_progress_follows_the_console(monkeypatch) -> None:
    """Progress bars in a terminal; none under a log file or a pipe (Ray Data would log a
    10-line block every 10 s), unless DINOALIGN_VERBOSE brings Ray's own output back."""
    import types

    from dinoalign.ray_runtime import configure_data_context

    ctx = types.SimpleNamespace(enable_progress_bars=True)
    for tty, verbose, expected in [(False, "", False), (True, "", True), (False, "1", True), (False, "0", False)]:
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty)
        monkeypatch.setenv("DINOALIGN_VERBOSE", verbose)
        configure_data_context(ctx)
        assert ctx.enable_progress_bars is expected, (tty, verbose)


def test_worker_lines_reach_the_console_only_when_tagged_unless_verbose(capsys, monkeypatch) -> None:
    """What Ray workers print: dinoalign's tagged lines as the driver's own (no "(Actor
    pid=...)" prefix, no colour); the rest only with DINOALIGN_VERBOSE, or from the raylet
    (a worker killed for memory is news)."""
    from ray._private import worker as ray_worker

    from dinoalign.ray_runtime import WORKER_LINE_TAG, _print_worker_lines

    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    data = {"pid": 4242, "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": False, "actor_name": "RayTrainWorker",
            "task_name": "", "lines": [f"{WORKER_LINE_TAG}align@talk2dino: step 20/100 (20%)", "Setting up process group"]}
    _print_worker_lines(dict(data), loud=False, ray_worker=ray_worker)
    assert capsys.readouterr().out == "align@talk2dino: step 20/100 (20%)\n"

    _print_worker_lines({**data, "pid": "raylet", "lines": ["A worker died or was killed"]}, loud=False,
                        ray_worker=ray_worker)
    assert "A worker died or was killed" in capsys.readouterr().out

    _print_worker_lines({**data, "pid": 4243}, loud=True, ray_worker=ray_worker)
    ray_worker.stdout_deduplicator.flush()
    out = capsys.readouterr().out
    assert out.startswith("align@talk2dino: step 20/100 (20%)\n")
    assert "(RayTrainWorker pid=4243) Setting up process group" in out and "\x1b[" not in out


def test_the_harmless_autoscaling_warning_is_silenced_unless_verbose(monkeypatch) -> None:
    import logging

    from dinoalign.ray_runtime import QUIET_WORKER_LOGGERS, quiet_worker_logs

    (name,) = QUIET_WORKER_LOGGERS
    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv("DINOALIGN_VERBOSE", "1")
    quiet_worker_logs()
    assert logger.level == logging.NOTSET
    monkeypatch.setenv("DINOALIGN_VERBOSE", "0")
    quiet_worker_logs()
    assert logger.level == logging.ERROR


CONSOLE_PROBE = r"""
import time
import ray
import ray.data
from dinoalign.ray_runtime import init_ray, worker_print

init_ray(num_cpus=2)

@ray.remote
def say():
    worker_print("probe: tagged line")
    print("probe: untagged worker line")
    return 1

assert ray.get(say.remote()) == 1

def slow(batch):
    time.sleep(0.05)
    return batch

assert ray.data.range(40, override_num_blocks=8).map_batches(slow, batch_size=5).count() == 40
time.sleep(3)  # the log monitor forwards worker lines about once a second
ray.shutdown()
print("probe: done")
"""


def test_a_piped_ray_run_prints_no_progress_blocks_prefixes_or_colour_codes(tmp_path) -> None:
    """A driver whose stdout is a pipe (dvc repro into a log): quiet by default, Ray's own
    output with DINOALIGN_VERBOSE=1, and never raw ANSI colour codes. The quiet and the
    verbose driver run side by side, each on its own local Ray: part of a Ray start-up is
    waiting (51-57 s on 2 busy cores, 66-71 s one after the other)."""
    runs = {}
    try:
        for verbose in ("0", "1"):
            env = {**os.environ, "DINOALIGN_VERBOSE": verbose, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONUNBUFFERED": "1"}
            env.pop("RAY_ADDRESS", None)
            env.pop("RAY_COLOR_PREFIX", None)
            (tmp_path / verbose).mkdir()
            runs[verbose] = subprocess.Popen([sys.executable, "-c", CONSOLE_PROBE], env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, cwd=tmp_path / verbose)
        outputs = {}
        for verbose, run in runs.items():
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-3000:]
            outputs[verbose] = out + err
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.communicate()
    quiet, loud = outputs["0"], outputs["1"]
    assert "\x1b[" not in quiet and "\x1b[" not in loud
    assert "probe: tagged line" in quiet.splitlines() and "probe: done" in quiet
    assert "untagged worker line" not in quiet and "pid=" not in quiet
    assert "Running Dataset" not in quiet and "Progress" not in quiet and "Traceback" not in quiet
    assert len(quiet.splitlines()) == 2, quiet
    # verbose: Ray's own lines are back (the worker's with its prefix, Ray Data's progress)
    assert "probe: tagged line" in loud.splitlines()
    assert "pid=" in loud and "untagged worker line" in loud
    assert "Running Dataset" in loud or "Progress" in loud
