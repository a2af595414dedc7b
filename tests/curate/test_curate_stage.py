"""The curate stage end to end: real prepare + embed (tiny), then `dinoalign curate`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline_testing import REPO, output_bytes, tiny_overrides
from dinoalign.cli import main
from dinoalign.config import load_params
from dinoalign.curate import load_vocab
from dinoalign.curate.tables import curate_train_split
from dinoalign.data.prepare import read_pairs
from dinoalign.data.synthetic import COLOURS, SHAPES

NO_PARAMS_FILE = "/nonexistent/params.yaml"  # every value comes from the overrides
N_TRAIN = 40
LEVELS = [6, 2]
TARGET = 24
DEMO_VOCAB = REPO / "params" / "vocab" / "demo.txt"


def _overrides(root: Path, clip_dir: Path, n_train: int = N_TRAIN) -> list[str]:
    return tiny_overrides(
        root,
        clip_dir,
        **{
            "data.synthetic.n_train": str(n_train),
            "data.synthetic.n_val": "4",
            "data.synthetic.n_test": "4",
            "embed.engine": "local",
            "embed.keep_patches": "false",
            "paths.curated": str(root / "curated"),
            "curate.levels": str(LEVELS),
            "curate.resample_steps": "[1, 1]",
            "curate.resample_points": "[4, 2]",
            "curate.kmeans_iters": "10",
            "curate.target_size": str(TARGET),
            "curate.text_vocab": str(DEMO_VOCAB),
            "curate.text_threshold": "10",
            "curate.combine": "intersection",
            "curate.dedup_threshold": "0.00001",  # only the planted copy is that close
        },
    )


def _run(stage: str, overrides: list[str]) -> None:
    assert main([stage, "-p", NO_PARAMS_FILE, *overrides]) == 0


def _train_uids(root: Path) -> list[str]:
    manifest = read_pairs(root / "pairs")
    splits = manifest.column("split").to_pylist()
    return sorted(uid for uid, split in zip(manifest.column("uid").to_pylist(), splits)
                  if split == "train")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path):
    """Tiny pairs and features from the real prepare and embed stages. After prepare, one
    train image is broken (embed rejects it) and one is overwritten with a copy of another
    (a planted duplicate). Yields (root, overrides, broken uid, the two duplicate uids)."""
    root = tmp_path_factory.mktemp("curate_world")
    overrides = _overrides(root, tiny_clip_dir)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DINOALIGN_ROOT", str(root))  # MLflow artifacts under root, not the repo
        _run("prepare", overrides)
        manifest = read_pairs(root / "pairs")
        train = [i for i, split in enumerate(manifest.column("split").to_pylist())
                 if split == "train"]
        uids = manifest.column("uid").to_pylist()
        images = manifest.column("image_uri").to_pylist()
        Path(images[train[3]]).write_bytes(b"not a png")
        Path(images[train[6]]).write_bytes(Path(images[train[5]]).read_bytes())
        _run("embed", overrides)
        yield root, overrides, uids[train[3]], sorted([uids[train[5]], uids[train[6]]])


def test_stage_lists_every_train_uid_with_its_filters_and_repeats_exactly(world, monkeypatch):
    root, overrides, broken, duplicates = world
    monkeypatch.setenv("DINOALIGN_ROOT", str(root))
    out = root / "curated"
    _run("curate", overrides)
    first = output_bytes(out)

    table = pq.read_table(out / "uids.parquet")
    assert table.column_names == ["uid", "cluster_l1", "cluster_l2", "kept_features",
                                  "kept_dedup", "kept_image", "kept_text", "kept"]
    train_uids = _train_uids(root)
    assert len(train_uids) == N_TRAIN
    assert table.column("uid").to_pylist() == train_uids  # train only, sorted, none dropped
    rows = table.to_pydict()
    kept = {name: np.array(rows[name]) for name in table.column_names[3:]}
    row = train_uids.index(broken)
    assert not any(kept[name][row] for name in kept)
    assert rows["cluster_l1"][row] is None and rows["cluster_l2"][row] is None
    with_features = np.flatnonzero(kept["kept_features"])
    assert len(with_features) == N_TRAIN - 1
    clusters = np.array(rows["cluster_l1"])[with_features].astype(int)
    assert clusters.min() >= 0 and clusters.max() < LEVELS[0]
    assert np.array_equal(kept["kept"], kept["kept_image"] & kept["kept_text"])
    assert not (kept["kept_image"] & ~kept["kept_dedup"]).any()
    assert not (kept["kept_text"] & ~kept["kept_dedup"]).any()
    assert not (kept["kept_dedup"] & ~kept["kept_features"]).any()
    removed_as_duplicate = np.flatnonzero(kept["kept_features"] & ~kept["kept_dedup"])
    # the planted copy with the larger uid goes, and nothing else
    assert [train_uids[i] for i in removed_as_duplicate] == [duplicates[1]]
    assert kept["kept_image"].sum() == min(TARGET, kept["kept_dedup"].sum())
    assert 0 < kept["kept"].sum() < kept["kept_image"].sum()  # text balancing removed some

    stats = json.loads((out / "stats.json").read_text())
    assert stats["split"] == "train" and stats["n_train"] == N_TRAIN
    assert stats["n_input"] == N_TRAIN - 1 and stats["n_kept"] == kept["kept"].sum()
    assert stats["without_features"]["count"] == 1
    assert sum(stats["without_features"]["embed_reject_reasons"].values()) == 1

    for level, k in enumerate(LEVELS, start=1):
        plot = _read_csv(out / "plots" / "cluster_sizes" / f"level_{level}.csv")
        before = [int(r["before"]) for r in plot]
        assert len(plot) == k and sum(before) == N_TRAIN - 1
        assert before == sorted(before, reverse=True)
        assert sum(int(r["after"]) for r in plot) == stats["n_kept"]
    vocab = load_vocab(str(DEMO_VOCAB))
    for when in ("before", "after"):
        plot = _read_csv(out / "plots" / "captions_per_entry" / f"{when}.csv")
        assert [r["entry"] for r in plot] == vocab
        assert {r["entry"]: int(r["captions"]) for r in plot} == stats["text"][
            f"caption_counts_{when}"]

    params = load_params(NO_PARAMS_FILE, overrides)
    client = mlflow.MlflowClient(params.tracking.uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    [run] = client.search_runs([experiment.experiment_id], "tags.`dinoalign.stage` = 'curate'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    metrics = run.data.metrics
    assert metrics["pairs.kept"] == stats["n_kept"]
    assert metrics["pairs.without_features"] == 1
    assert metrics["removed.dedup"] == stats["removed"]["dedup"] == 1
    for level in stats["kmeans"]["levels"]:
        for step, points in enumerate(level["faiss_points"]):
            assert metrics[f"kmeans.l{level['level']}.faiss_points.run{step}"] == points
    assert metrics["kmeans.l1.faiss_points.run0"] == N_TRAIN - 1  # fewer than 256·k: all
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"stats.json", "plots"} <= artifacts

    _run("curate", overrides)
    assert output_bytes(out) == first


def test_new_pairs_are_curated_from_all_features_deterministically(
    world, tmp_path, tiny_clip_dir, monkeypatch, capsys
):
    old_root, old_overrides, _, _ = world
    monkeypatch.setenv("DINOALIGN_ROOT", str(tmp_path))
    _run("curate", old_overrides)
    old_table = pq.read_table(old_root / "curated" / "uids.parquet")
    for name in ("pairs", "features"):
        shutil.copytree(old_root / name, tmp_path / name)
    overrides = _overrides(tmp_path, tiny_clip_dir, n_train=N_TRAIN + 16)
    _run("prepare", overrides)
    capsys.readouterr()
    # stale features are a DataError: one line and exit 2 from the CLI (was a traceback)
    assert main(["curate", "-p", NO_PARAMS_FILE, *overrides]) == 2
    assert "older than the pairs manifest" in capsys.readouterr().err
    _run("embed", overrides)  # embeds only the 16 new pairs
    _run("curate", overrides)
    out = tmp_path / "curated"
    first = output_bytes(out)
    _run("curate", overrides)
    assert output_bytes(out) == first

    table = pq.read_table(out / "uids.parquet")
    uids = table.column("uid").to_pylist()
    assert uids == _train_uids(tmp_path) and len(uids) == N_TRAIN + 16
    assert set(old_table.column("uid").to_pylist()) < set(uids)
    assert not table.equals(old_table)
    assert sum(table.column("kept_image").to_pylist()) == TARGET


# argv: <k> <folder> <dinoalign arguments...>: the stage SIGKILLs itself when it is about
# to rename its k-th file into <folder> (os.replace raises the audit event os.rename), so
# the k-th file's temporary is written whole and never renamed, as when a run is killed there
KILLED_AT_RENAME = """
import os, signal, sys
k, folder = int(sys.argv[1]), sys.argv[2].rstrip("/") + "/"
renames = []

def hook(event, args):
    if event == "os.rename" and os.fspath(args[1]).startswith(folder):
        renames.append(os.fspath(args[1]))
        if len(renames) == k:
            print("killed before renaming onto", renames[-1], file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
from dinoalign.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_killed_run_rerun_writes_the_bytes_of_an_uninterrupted_run(world, tmp_path, monkeypatch):
    """#19 part 4: curate SIGKILLed part-way through its outputs, over the complete output
    of an earlier curation (other params), then run again: the folder holds exactly what
    an uninterrupted run writes, no temporary and nothing of the earlier output."""
    root, overrides, _, _ = world
    monkeypatch.setenv("DINOALIGN_ROOT", str(tmp_path))
    out = tmp_path / "curated"
    overrides = [*overrides, f"paths.curated={out}", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]
    _run("curate", overrides)
    whole = output_bytes(out)
    files = ["uids.parquet", "stats.json", "plots/cluster_sizes/level_1.csv", "plots/cluster_sizes/level_2.csv",
             "plots/captions_per_entry/before.csv", "plots/captions_per_entry/after.csv"]
    assert sorted(whole) == sorted(files)

    for k in (1, 3, 6):  # before its first rename, in its plots, before its last rename
        shutil.rmtree(out)
        _run("curate", [*overrides, f"curate.target_size={TARGET - 8}"])
        earlier = output_bytes(out)
        assert sorted(earlier) == sorted(files) and earlier["uids.parquet"] != whole["uids.parquet"]
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_AT_RENAME, str(k), str(out), "curate", "-p", NO_PARAMS_FILE, *overrides],
            capture_output=True, text=True, timeout=300, env={**os.environ, "DINOALIGN_ROOT": str(tmp_path)},
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        target = killed.stderr.strip().splitlines()[-1].removeprefix("killed before renaming onto ")
        assert Path(target).relative_to(out).as_posix() in files
        left = output_bytes(out)
        [temporary] = [name for name in left if Path(name).name.startswith(".")]
        assert Path(out / temporary).parent == Path(target).parent
        assert Path(temporary).name.startswith(f".{Path(target).name}.")
        assert left[temporary] == whole[Path(target).relative_to(out).as_posix()]  # written, never renamed
        assert left != whole
        _run("curate", overrides)
        assert output_bytes(out) == whole


def test_bad_feature_choice_is_explained(world):
    root, overrides, _, _ = world
    for feature in ("no_such_feature", "head_embeddings"):  # unknown; not one vector per image
        params = load_params(NO_PARAMS_FILE, [*overrides, f"curate.feature={feature}"])
        with pytest.raises(ValueError, match=r"not a per-image vector .*choose one of \[.*'cls'"):
            curate_train_split(params.curate, root / params.paths.pairs, params.paths.features)


def test_demo_params_curate_the_train_split_over_the_demo_vocabulary():
    params = load_params(REPO / "params.yaml")
    assert params.curate.combine == "intersection"
    assert load_vocab(str(REPO / params.curate.text_vocab)) == [*COLOURS, *SHAPES]
    assert params.curate.target_size < params.data.synthetic.n_train
