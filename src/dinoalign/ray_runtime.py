"""Ray in one place: connect to ``$RAY_ADDRESS`` (a cluster) or start a local Ray bound
to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` must be set before Python starts;
the Makefile and tests do)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from dinoalign.errors import ConfigError


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        address="local",  # never attach to a stray `ray start` cluster by accident
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        runtime_env={
            "worker_process_setup_hook": "dinoalign.ray_runtime.quiet_worker_logs",
            # Ray Train's preemption watcher follows node draining (spot instances) on a
            # cluster; on one local node it has nothing to watch, and each train run logged
            # an error-level line about its constructor arguments.
            "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
        },
    )


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


def quiet_worker_logs() -> None:
    """Ray worker setup hook of the local Ray: silence the loggers in NOISY_WORKER_LOGGERS."""
    for name in NOISY_WORKER_LOGGERS:
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
