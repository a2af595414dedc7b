"""Ray in one place: connect to ``$RAY_ADDRESS`` (a cluster) or start a local Ray bound
to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` must be set before Python starts;
the Makefile and tests do).

Ray is quiet unless ``DINOALIGN_VERBOSE=1``: no Ray Data progress blocks when stdout is
not a terminal (:func:`configure_data_context`; progress bars in a terminal), no Ray Data
INFO lines, no colour codes when stdout is not a terminal, and of what Ray workers print
only the lines dinoalign tags (:data:`WORKER_LINE_TAG`, :func:`worker_print`), shown
without Ray's ``(Actor pid=...)`` prefix. Everything else stays in Ray's own log files
(``/tmp/ray/session_latest/logs``); ``DINOALIGN_VERBOSE=1`` prints it as Ray does.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
from typing import Any

from dinoalign.errors import ConfigError


VERBOSE_ENV = "DINOALIGN_VERBOSE"

# A worker line that starts with this reaches the driver's console (without the tag, Ray's
# "(Actor pid=...)" prefix and colours) whether verbose or not: dinoalign's own progress
WORKER_LINE_TAG = "[dinoalign] "


def verbose() -> bool:
    """``DINOALIGN_VERBOSE`` is set to 1/true/yes/on: Ray logs as Ray does."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def worker_print(line: str) -> None:
    """Print ``line`` from a Ray worker so that the driver shows it as its own line (in
    a plain process it is printed as it is). Written to ``sys.stdout`` itself: Ray Train
    replaces ``print`` in its workers with one that writes the line twice (to stdout and
    through its console logger), and the driver would show both."""
    ray = sys.modules.get("ray")  # not imported: not a Ray worker
    in_worker = ray is not None and getattr(ray._private.worker.global_worker, "mode", None) == ray.WORKER_MODE
    sys.stdout.write(f"{WORKER_LINE_TAG}{line}\n" if in_worker else f"{line}\n")
    sys.stdout.flush()


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    if not sys.stdout.isatty():  # a log file or a pipe: Ray's prefixes without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name in () if loud else QUIET_DRIVER_LOGGERS:  # some speak during ray.init
        logging.getLogger(name).setLevel(logging.ERROR)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        quiet_driver_logs(loud)
        return
    ray.init(
        address="local",  # never attach to a stray `ray start` cluster by accident
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="INFO" if loud else "WARNING",
        runtime_env={
            "worker_process_setup_hook": "dinoalign.ray_runtime.quiet_worker_logs",
            # Ray Train's preemption watcher follows node draining (spot instances) on a
            # cluster; on one local node it has nothing to watch, and each train run logged
            # an error-level line about its constructor arguments.
            "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", VERBOSE_ENV: "1" if loud else "0"},
        },
    )
    quiet_driver_logs(loud)


def configure_data_context(ctx: Any) -> None:
    """Ray Data progress for this console: bars in a terminal; under a log file or a pipe
    none (Ray Data would log a 10-line block every 10 s), unless ``DINOALIGN_VERBOSE``.
    ``ctx``: a ``ray.data.DataContext`` (the dataset's, or ``DataContext.get_current()``)."""
    ctx.enable_progress_bars = verbose() or sys.stdout.isatty()


# Driver-side loggers that only say something harmless in a quiet run: the token
# authentication a local Ray enables (it is bound to 127.0.0.1), Ray Data's note that its
# progress bars are off (configure_data_context turned them off)
QUIET_DRIVER_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",
    "ray.data._internal.progress",
)


def quiet_driver_logs(loud: bool | None = None) -> None:
    """After ``ray.init`` in the driver: unless ``loud`` (default :func:`verbose`), Ray
    Data's console handler shows warnings and errors only (its INFO lines and progress
    blocks stay in the session's ``ray-data.log``), and only tagged worker lines are
    printed (:func:`_print_worker_lines`). Idempotent."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    loud = verbose() if loud is None else loud
    configure_data_context(ray.data.DataContext.get_current())
    if not loud:
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.WARNING)
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray layout: leave Ray's printing as it is
        return
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return  # log_to_driver is off, or Ray prints worker lines another way
    dispatcher.remove_handler("ray_print_logs")  # the name disconnect() removes
    dispatcher.add_handler("ray_print_logs", functools.partial(_print_worker_lines, loud=loud, ray_worker=ray_worker))


def _print_worker_lines(data: dict[str, Any], loud: bool, ray_worker: Any) -> None:
    """Ray's driver-side printer of worker output, replaced: tagged lines are printed as
    the driver's own; the others as Ray prints them when ``loud`` or when the raylet
    says them (a worker killed for memory, objects spilled), else not at all (they are
    in the worker's log file)."""
    lines = data.get("lines", [])
    ours = [line[len(WORKER_LINE_TAG):] for line in lines if line.startswith(WORKER_LINE_TAG)]
    if ours:
        sink = sys.stderr if data.get("is_err") else sys.stdout
        print("\n".join(ours), file=sink, flush=True)
    rest = [line for line in lines if not line.startswith(WORKER_LINE_TAG)]
    if rest and (loud or data.get("pid") == "raylet"):
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        ray_worker.print_to_stdstream({**data, "lines": rest}, ignore_prefix=ignore_prefix)


# ray.init retries a GCS that does not answer for minutes, silently: the address is tried
# first, for this long
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ConfigError, naming ``RAY_ADDRESS``, unless something accepts a TCP connection
    at ``address`` (``host:port`` of a GCS, default port 6379, or ``ray://host:port`` of a
    Ray Client server, default 10001) within ``timeout_s``. ``auto`` and ``local`` are
    Ray's own and left to it."""
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    hostport = address.removeprefix("ray://").rstrip("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    if not port.isdigit():
        port = "10001" if client else "6379"
    host = host.strip("[]") or "127.0.0.1"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConfigError(
            f"RAY_ADDRESS={address}: no Ray {'client server' if client else 'head'} at {host}:{port} "
            f"({reason}): start it (`ray start --head`), correct RAY_ADDRESS, "
            "or unset RAY_ADDRESS to run on a local Ray"
        ) from None


# Without the dashboard (a local Ray here) the State API is not served, and Ray Train's
# placement-group cleaner, which asks it every second whether the train controller is
# alive, logs "Failed to query Ray Train Controller actor state" once a second for the
# whole run. Its real job (removing the placement group if the controller dies) only
# needs that answer on a cluster, where the dashboard runs.
NOISY_WORKER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
# Unless DINOALIGN_VERBOSE: Ray Train's controller asks the autoscaling coordinator (an actor
# it starts) to reserve the workers' resources within 5 s; on a busy 2-core machine the
# actor's start takes longer and a harmless "Failed to send resource request" warning
# with a traceback follows (it retries, and a local Ray has no autoscaler to ask)
QUIET_WORKER_LOGGERS = ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",)


def quiet_worker_logs() -> None:
    """Ray worker setup hook of the local Ray: silence the loggers in NOISY_WORKER_LOGGERS,
    and unless ``DINOALIGN_VERBOSE`` those in QUIET_WORKER_LOGGERS."""
    for name in NOISY_WORKER_LOGGERS + (() if verbose() else QUIET_WORKER_LOGGERS):
        logging.getLogger(name).setLevel(logging.ERROR)


def require_resources(what: str, per_unit: dict[str, float], units: int, fix: str) -> None:
    """Fail fast when Ray can never place ``units`` × ``per_unit`` (a GPU actor on a machine
    without a GPU, more CPUs than the machine has) instead of waiting for them forever, as
    Ray Data and Ray Train do. On a cluster (``RAY_ADDRESS``) an autoscaler may still add
    nodes, so there it only warns. Call after :func:`init_ray`."""
    import ray

    total = ray.cluster_resources()
    short = {k: (v * units, total.get(k, 0.0)) for k, v in per_unit.items() if v * units > total.get(k, 0.0) + 1e-9}
    if not short:
        return
    detail = ", ".join(f"{need:g} {name} (the Ray cluster has {have:g})" for name, (need, have) in short.items())
    message = f"{what} needs {detail}: {fix}"
    if os.environ.get("RAY_ADDRESS"):
        print(f"dinoalign: warning: {message}; waiting for the cluster to add nodes", file=sys.stderr)
        return
    raise ConfigError(message)


class TorchThreads:
    """Give torch ``n`` intra-op threads in whichever thread calls it.

    OpenMP's thread count is a per-thread setting: ``torch.set_num_threads`` in a
    constructor does not reach a method that a Ray actor runs in its executor thread
    (Ray Data calls ``map_batches`` UDFs from a ``ThreadPoolExecutor``), where OpenMP then
    starts from ``OMP_NUM_THREADS``, which Ray sets to the actor's whole CPUs (1 for a
    1-CPU actor). Call the instance at the top of every call; it sets the count once per
    thread."""

    def __init__(self, n: int) -> None:
        import torch

        self.n = max(1, int(n))
        self._done: set[int] = set()
        torch.set_num_threads(self.n)
        self._done.add(threading.get_ident())

    def __call__(self) -> None:
        ident = threading.get_ident()
        if ident not in self._done:
            import torch

            torch.set_num_threads(self.n)
            self._done.add(ident)
