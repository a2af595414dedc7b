"""The Ray head's start-up retry (ops.services.start_ray_head), with a stand-in `ray`
executable: the real `ray start` gives its raylet a fixed 30 s to register with the GCS
(ray/_private/node.py) and exits on an overloaded machine, which made `infra up` fail
while a training run used both cores."""

from __future__ import annotations

import stat
import sys
import textwrap
from pathlib import Path

import pytest

from dinoalign.errors import StackError
from dinoalign.ops import services

# Fails like `ray start` under load while ``failures`` > 0 (decremented per run), then
# listens on --port and logs the readiness line, as `ray start --head --block` does.
FAKE_RAY = textwrap.dedent("""\
    #!{python}
    import socket, sys, time
    from pathlib import Path
    counter = Path({counter!r})
    left = int(counter.read_text())
    if left > 0:
        counter.write_text(str(left - 1))
        print({message!r} + " while starting", flush=True)
        sys.exit(1)
    port = int(next(a for a in sys.argv if a.startswith("--port=")).split("=")[1])
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
    print("Ray runtime started.", flush=True)
    time.sleep(60)
""")


def _fake_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int, message: str) -> Path:
    counter = tmp_path / "failures"
    counter.write_text(str(failures))
    ray = tmp_path / "ray"
    ray.write_text(FAKE_RAY.format(python=sys.executable, counter=str(counter), message=message))
    ray.chmod(ray.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(services, "_bin", lambda name: str(ray))
    return counter


def _start(tmp_path: Path) -> services.Service:
    return services.start_ray_head(tmp_path / "logs", tmp_path / "token", tmp_path / "t", num_cpus=1)


def test_a_head_that_misses_gcs_registration_is_started_again(tmp_path, monkeypatch) -> None:
    counter = _fake_ray(tmp_path, monkeypatch, 2, services.RAY_REGISTRATION_TIMEOUT)
    svc = _start(tmp_path)
    try:
        assert svc.alive() and counter.read_text() == "0"  # third attempt
        assert services.port_open(svc.ports["gcs"])
    finally:
        svc.stop()


def test_it_gives_up_after_the_last_attempt(tmp_path, monkeypatch) -> None:
    _fake_ray(tmp_path, monkeypatch, services.RAY_START_ATTEMPTS, services.RAY_REGISTRATION_TIMEOUT)
    with pytest.raises(StackError, match="ray head exited during start"):
        _start(tmp_path)


def test_other_start_failures_are_not_retried(tmp_path, monkeypatch) -> None:
    counter = _fake_ray(tmp_path, monkeypatch, 1, "some other error")
    with pytest.raises(StackError, match="ray head exited during start"):
        _start(tmp_path)
    assert counter.read_text() == "0"  # one attempt only
