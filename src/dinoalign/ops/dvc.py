"""DVC commands run by operations code (``retrain``), with clear errors and a retry policy.

DVC runs as a subprocess of the same interpreter (``python -m dvc``), in the checkout, with
analytics off. ``push`` is retried as a whole: DVC uploads content-addressed objects and
skips those already on the remote, so a retry only sends what is missing and a push that
died half-way loses nothing (botocore's own per-request retries, ``AWS_MAX_ATTEMPTS``,
handle shorter blips inside each attempt).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from dinoalign.errors import DvcError


def dvc(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run ``dvc <args>`` in ``root``; return its output, raise :class:`DvcError` on failure."""
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, **(env or {}), "DVC_NO_ANALYTICS": "1"},
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {_error_lines(out)}")
    return out


def _error_lines(output: str, limit: int = 6) -> str:
    """DVC's ``ERROR:`` lines (the useful part of its output), else the last lines."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return " | ".join((errors or lines)[-limit:]) or "no output"


def remote_description(root: Path, remote: str | None) -> str:
    """``'name' (url via endpoint)`` of ``remote`` (default: the checkout's default)."""
    from dvc.config import Config

    conf = Config(dvc_dir=str(Path(root) / ".dvc"), validate=False)
    name = remote or conf["core"].get("remote")
    if not name:
        return "the default remote (none is configured)"
    section = conf["remote"].get(name, {})
    via = f" via {section['endpointurl']}" if section.get("endpointurl") else ""
    return f"{name!r} ({section.get('url', '?')}{via})"


def push(root: Path, remote: str | None = None, targets: Sequence[str] = (), attempts: int = 3,
         backoff: float = 5.0, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """``dvc push`` with up to ``attempts`` tries, ``backoff * 2**i`` seconds apart.

    Raises :class:`DvcError` saying where it pushed, how often it tried, DVC's error, and
    that nothing was lost (the workspace and cache are untouched; a re-run sends only what
    is missing)."""
    args = ["push", *(["-r", remote] if remote else []), *targets]
    last: DvcError | None = None
    for i in range(attempts):
        try:
            return dvc(root, *args, env=env, timeout=timeout)
        except DvcError as e:
            last = e
            if i + 1 < attempts:
                time.sleep(backoff * 2**i)
    raise DvcError(
        f"dvc push to {remote_description(root, remote)} failed {attempts} time(s); last error: {last}. "
        "Nothing is lost: the workspace and the DVC cache are untouched and objects already "
        "uploaded stay on the remote. Check that the S3 endpoint answers (`dinoalign infra status`) "
        "and run `dvc push` again: it sends only what is missing."
    )
