"""Ray in one place: connect to ``$RAY_ADDRESS`` (a cluster) or start a local Ray bound
to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` must be set before Python starts;
the Makefile and tests do)."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        address="local",  # never attach to a stray `ray start` cluster by accident
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
