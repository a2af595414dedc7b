"""A full disk leaves no partial or temporary file in a DVC output (issue #20).

The real prepare and embed stages run in their own process (``python -c`` around
``dinoalign.cli.main``) under a file-size limit (:func:`pipeline_testing.run_on_a_full_disk`:
RLIMIT_FSIZE with SIGXFSZ ignored), so a write past the limit fails part-way with EFBIG, as
a write to a full disk fails with ENOSPC. Each limit is placed from the sizes an
uninterrupted run wrote: some writes fit, a later one does not. The stage must stop with
one line and exit 2, leave in ``paths.pairs`` / ``paths.features`` only files of the
uninterrupted run, byte for byte (so whole, and no temporary), and the same command
without the limit (run in the test's process) must finish what is missing, keep what is
there, and end with exactly the uninterrupted run's bytes.

MLflow logs to a file store here: its files are a few hundred bytes, so the limit falls on
the stage outputs (an sqlite database would be the largest file the stage writes).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from pipeline_testing import output_bytes, run_on_a_full_disk, tiny_overrides
from dinoalign.cli import main

NO_PARAMS_FILE = "/nonexistent/params.yaml"  # every value comes from the overrides


def _limited(root: Path, stage: str, overrides: list[str], limit: int) -> subprocess.CompletedProcess:
    """``dinoalign <stage>`` in a process that can write no file past ``limit`` bytes."""
    return run_on_a_full_disk(
        limit, "from dinoalign.cli import main\nsys.exit(main(sys.argv[1:]))", stage, "-p", NO_PARAMS_FILE,
        *overrides, env={**os.environ, "DINOALIGN_ROOT": str(root), "MLFLOW_ALLOW_FILE_STORE": "true"})


def _run(stage: str, overrides: list[str]) -> None:
    """The same command without the limit (in this process: no second start-up)."""
    assert main([stage, "-p", NO_PARAMS_FILE, *overrides]) == 0


def _stopped_on_a_full_disk(done: subprocess.CompletedProcess, stage: str, output: Path) -> Path:
    """The run ended with exit 2 and one line naming the file it could not write (inside
    ``output``, under its final name) and no traceback; returns that file."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"dinoalign {stage}:")]
    assert len(lines) == 1, done.stderr
    match = re.fullmatch(rf"dinoalign {stage}: disk full writing ({re.escape(str(output))}/\S+): File too large "
                         r"\(EFBIG\); free space there and run the command again", lines[0])
    assert match, lines[0]
    return Path(match.group(1))


def _identities(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: unchanged when a re-run kept the file."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_a_full_disk_leaves_only_whole_files_and_the_rerun_finishes_the_same_bytes(
    tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DINOALIGN_ROOT", str(tmp_path))  # MLflow artifacts under tmp_path
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    root = tmp_path  # the same for every run: the pairs manifest records absolute image paths
    overrides = tiny_overrides(root, tiny_clip_dir, **{
        "tracking.uri": (root / "mlruns").as_uri(),
        "data.synthetic.n_train": "16",
        "data.synthetic.n_val": "2",
        "data.synthetic.n_test": "6",
        # image rows small enough that an image shard of 8 rows is smaller than a caption
        # shard of 32 captions: the limit can let every image shard through and stop a caption shard
        "backbone.model_kwargs": "{embed_dim: 12, depth: 1, num_heads: 3}",
        "clip.image_features": "false",
        "embed.engine": "local",
        "embed.keep_patches": "false",
        "embed.shard_rows": "8",
    })
    pairs, features = root / "pairs", root / "features"

    # the uninterrupted run: the bytes every other run must end with
    for stage in ("prepare", "embed"):
        _run(stage, overrides)
    whole = {"pairs": output_bytes(pairs), "features": output_bytes(features)}
    assert not [name for files in whole.values() for name in files if "/." in f"/{name}"]
    shutil.rmtree(pairs)
    shutil.rmtree(features)

    # prepare: the world's images are rendered in parallel (each before its mask); those
    # larger than the limit fail, the others are written
    images = {name: len(data) for name, data in whole["pairs"].items() if name.startswith("synthetic/images/")}
    limit = int(statistics.median(images.values()))
    assert min(images.values()) < limit < max(images.values())
    failed = _stopped_on_a_full_disk(_limited(root, "prepare", overrides, limit), "prepare", pairs)
    assert images[str(failed.relative_to(pairs))] > limit and not failed.exists()
    left = output_bytes(pairs)
    assert left and set(left) < set(whole["pairs"])
    assert all(whole["pairs"][name] == data for name, data in left.items())  # whole files, none hidden
    assert "summary.json" not in left  # written last: the output is visibly unfinished
    kept = _identities(pairs)
    _run("prepare", overrides)
    assert output_bytes(pairs) == whole["pairs"]
    assert {name: ident for name, ident in _identities(pairs).items() if name in kept} == kept  # not redone

    # embed: every image shard fits under the limit, the first caption shard does not
    shards = {kind: {name: len(data) for name, data in whole["features"].items() if name.startswith(f"{kind}/")}
              for kind in ("images", "captions")}
    limit = (max(shards["images"].values()) + max(shards["captions"].values())) // 2
    assert max(shards["images"].values()) < limit < max(shards["captions"].values())
    failed = _stopped_on_a_full_disk(_limited(root, "embed", overrides, limit), "embed", features)
    assert shards["captions"][str(failed.relative_to(features))] > limit and not failed.exists()
    left = output_bytes(features)
    assert all(whole["features"][name] == data for name, data in left.items())  # whole files, none hidden
    assert set(shards["images"]) <= set(left) and "manifest.json" not in left
    assert output_bytes(pairs) == whole["pairs"]
    kept = _identities(features)
    _run("embed", overrides)
    assert output_bytes(features) == whole["features"]
    assert {name: _identities(features)[name] for name in shards["images"]} == {
        name: kept[name] for name in shards["images"]}  # the image shards were kept, not redone
