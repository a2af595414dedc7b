"""A throw-away checkout of this repository (the working tree as it is, committed into a
fresh git repo) with a small ``params.yaml``, for running the real ``dvc repro``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from dinoalign.config import apply_overrides, load_params


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout


def copy_checkout(src: Path, dst: Path, overrides: dict[str, Any]) -> Path:
    """Copy every file git would see in ``src`` (tracked or not ignored) to ``dst``, write
    ``params.yaml`` = ``src``'s with ``overrides``, and commit it all.

    ``dvc.lock`` stays behind: it records a demo-size run whose outputs are in no cache or
    remote of the copy, and with other params. `dvc exp run` of one target then fails to
    load the outputs that the lock records for stages outside the target (seen: "failed to
    load directory ('plots', 'dinotxt')" from the copy's empty S3 remote)."""
    listed = git(src, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, listed):
        path = src / name
        if name == "dvc.lock":
            continue
        if path.is_file():  # listed but deleted in the working tree: skip
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / name)
    raw = yaml.safe_load((src / "params.yaml").read_text())
    raw = apply_overrides(raw, [f"{k}={v}" for k, v in overrides.items()])
    (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    load_params(dst / "params.yaml")  # the small params are valid params
    git(dst, "init", "-q", "-b", "main")
    git(dst, "add", "-A")
    git(dst, "commit", "-q", "-m", "checkout for the test")
    return dst


def empty_checkout(tmp_path: Path) -> Path:
    """A fresh git + DVC repository under ``tmp_path`` (``infra`` commands run in one)."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


def infra_cli(root: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``dinoalign infra --root root ARGS`` in a subprocess with ``env``."""
    return subprocess.run([sys.executable, "-m", "dinoalign.cli", "infra", "--root", str(root), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def infra_up(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path, dict[str, Any]]:
    """``dinoalign infra up --ray-cpus 1`` in a fresh checkout: (root, its run folder, the
    started services by name from the stack's state file). The caller stops them."""
    import json

    from dinoalign.ops import services as infra
    from dinoalign.ops.stack import STATE_FILE, run_dir

    root = empty_checkout(tmp_path)
    started = infra_cli(root, "up", "--ray-cpus", "1", env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    run = run_dir(root)
    state = json.loads((run / STATE_FILE).read_text())
    return root, run, {s["name"]: infra.Service(**s) for s in state["services"]}
