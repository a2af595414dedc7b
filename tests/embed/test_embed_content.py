"""Issue #20: the embed stage is incremental by content. A row records the sha256 of what it
was computed from (image bytes, caption text); changed pixels or text are embedded again
and exactly those, stale rows (changed, or uids gone from the pairs) are retired, and a
store written before content hashes is re-embedded once."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_testing import REPO, embed_features, output_bytes, tiny_overrides
from dinoalign.cli import main
from dinoalign.config import load_params
from dinoalign.data.prepare import read_pairs
from dinoalign.data.schema import make_caption_id, make_uid
from dinoalign.embed.store import CONTENT_COLUMN, FeatureStore

P = "/nonexistent/params.yaml"


def _prepare(root: Path, clip_dir: Path, **extra: str) -> list[str]:
    ov = tiny_overrides(root, clip_dir, **{"embed.engine": "local", "embed.shard_rows": "4", **extra})
    assert main(["prepare", "-p", P, *ov]) == 0
    return ov


def _embed(ov: list[str], root: Path, features: Path | None = None) -> dict:
    extra = [] if features is None else [f"paths.features={features}"]
    return embed_features(load_params(P, [*ov, *extra]), read_pairs(root / "pairs"))


def _rows(features: Path, kind: str, key: str) -> dict[str, dict]:
    """Every stored row of ``kind`` by its key (each key once)."""
    rows = FeatureStore(str(features)).read_all(kind).to_pylist()
    out = {r[key]: r for r in rows}
    assert len(out) == len(rows), f"a {kind} key is stored twice"
    return out


def _write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)


def _write_table(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)


def _pairs_world(tmp_path: Path, clip_dir: Path, n: int = 12, **extra: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``n`` images with two captions each (rows of one image share its key) in a CSV."""
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(n):
        _write_image(tmp_path / "images" / f"im{i:02d}.png", i)
        rows += [(f"images/im{i:02d}.png", f"image {i} first caption"), (f"images/im{i:02d}.png", f"image {i} second")]
    _write_table(tmp_path / "pairs.csv", rows)
    ov = _prepare(tmp_path, clip_dir, **{"data.source": "pairs", "data.pairs.path": str(tmp_path / "pairs.csv"),
                                         **extra})
    return ov, rows


def _uid_of(root: Path) -> dict[str, str]:
    manifest = read_pairs(root / "pairs")
    return {Path(uri).name: u for u, uri in zip(manifest.column("uid").to_pylist(),
                                                manifest.column("image_uri").to_pylist())}


def _assert_store_is_the_manifest(root: Path, features: Path) -> None:
    """Nothing stale: every stored row is the manifest's current content, every manifest
    image and caption is stored once, and manifest.json lists exactly the shards there."""
    manifest = read_pairs(root / "pairs")
    images = _rows(features, "images", "uid")
    want = dict(zip(manifest.column("uid").to_pylist(), manifest.column("image_sha256").to_pylist()))
    rejected = {r["uid"] for r in FeatureStore(str(features)).read_rejects().to_pylist()}
    assert set(images) | rejected == set(want) and not set(images) & rejected
    assert {u: r[CONTENT_COLUMN] for u, r in images.items()} == {u: want[u] for u in images}
    captions = _rows(features, "captions", "caption_id")
    texts = {make_caption_id(u, i): c for u, cs in zip(manifest.column("uid").to_pylist(),
                                                      manifest.column("captions").to_pylist())
             if u in images for i, c in enumerate(cs)}
    assert {k: r["caption"] for k, r in captions.items()} == texts
    assert all(r[CONTENT_COLUMN] == hashlib.sha256(r["caption"].encode()).hexdigest() for r in captions.values())
    listed = json.loads((features / "manifest.json").read_text())
    on_disk = {str(p.relative_to(features)) for p in features.glob("*/part-*.parquet")}
    assert {e["file"] for e in listed["shards"]} == on_disk
    assert listed["counts"]["images_total"] == len(images) and listed["counts"]["captions_total"] == len(captions)


def test_changed_images_and_captions_and_only_those_are_embedded_again(
    tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ov, rows = _pairs_world(tmp_path, tiny_clip_dir)
    features = tmp_path / "features"
    first = _embed(ov, tmp_path)
    assert first["images_embedded"] == 12 and first["captions_embedded"] == 24
    assert first["images_changed"] == first["images_retired"] == first["images_hashed_here"] == 0
    before_images, before_caps = _rows(features, "images", "uid"), _rows(features, "captions", "caption_id")
    manifest = read_pairs(tmp_path / "pairs")
    for u, uri, h in zip(manifest.column("uid").to_pylist(), manifest.column("image_uri").to_pylist(),
                         manifest.column("image_sha256").to_pylist()):  # prepare hashed what it validated
        assert h == hashlib.sha256(Path(uri).read_bytes()).hexdigest() == before_images[u][CONTENT_COLUMN]

    # new bytes under two existing uids (same paths); three captions edited, one of them
    # of a changed image
    _write_image(tmp_path / "images" / "im03.png", 103)
    _write_image(tmp_path / "images" / "im07.png", 107)
    edited = {2: "image 1 second, edited", 9: "image 4 second, edited", 15: "image 7 second, edited"}
    _write_table(tmp_path / "pairs.csv", [(im, edited.get(i, cap)) for i, (im, cap) in enumerate(rows)])
    assert main(["prepare", "-p", P, *ov]) == 0
    uid = _uid_of(tmp_path)
    changed = {uid["im03.png"], uid["im07.png"]}
    edited_ids = {make_caption_id(uid["im01.png"], 0), make_caption_id(uid["im04.png"], 1),
                  make_caption_id(uid["im07.png"], 1)}
    # (the CSV's rows of an image keep their order: row 2 is image 1's first caption)
    assert _rows_texts(tmp_path, edited_ids) == {"image 1 second, edited", "image 4 second, edited",
                                                 "image 7 second, edited"}

    shutil.copytree(features, tmp_path / "killed")
    second = _embed(ov, tmp_path)
    assert (second["images_embedded"], second["images_changed"], second["images_retired"]) == (2, 2, 2)
    assert second["images_skipped"] == 10 and second["images_rejected"] == 0
    assert (second["captions_embedded"], second["captions_changed"], second["captions_retired"]) == (3, 3, 3)
    assert second["captions_skipped"] == 21
    after_images, after_caps = _rows(features, "images", "uid"), _rows(features, "captions", "caption_id")
    # the unchanged rows are the stored values, untouched (copied, not recomputed)
    assert {u: r for u, r in after_images.items() if u not in changed} == \
        {u: r for u, r in before_images.items() if u not in changed}
    assert {k: r for k, r in after_caps.items() if k not in edited_ids} == \
        {k: r for k, r in before_caps.items() if k not in edited_ids}
    for u in changed:
        assert after_images[u][CONTENT_COLUMN] != before_images[u][CONTENT_COLUMN]
        assert after_images[u]["cls"] != before_images[u]["cls"]
    _assert_store_is_the_manifest(tmp_path, features)

    # killed while retiring (a shard rewritten without its stale row, the old one not yet
    # removed: its rows are there twice), then resumed: the files of the uninterrupted run
    def killed(self: FeatureStore, kind: str, name: str) -> None:
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(FeatureStore, "delete_shard", killed)
        with pytest.raises(KeyboardInterrupt):
            _embed(ov, tmp_path, tmp_path / "killed")
    resumed = _embed(ov, tmp_path, tmp_path / "killed")
    assert resumed["images_embedded"] == 2 and resumed["captions_embedded"] == 3
    assert output_bytes(tmp_path / "killed") == output_bytes(features)

    # the new features are a fresh embed of the new inputs; two uninterrupted fresh runs
    # write the same bytes
    fresh = _embed(ov, tmp_path, tmp_path / "fresh")
    assert fresh["images_embedded"] == 12 and fresh["captions_embedded"] == 24
    fresh_images, fresh_caps = _rows(tmp_path / "fresh", "images", "uid"), _rows(tmp_path / "fresh", "captions",
                                                                                 "caption_id")
    assert set(fresh_images) == set(after_images) and set(fresh_caps) == set(after_caps)
    for u in changed:
        assert fresh_images[u][CONTENT_COLUMN] == after_images[u][CONTENT_COLUMN]
        for c in ("cls", "token_mean", "head_embeddings", "clip_image", "patches"):
            np.testing.assert_allclose(after_images[u][c], fresh_images[u][c], rtol=1e-5, atol=1e-6, err_msg=c)
    for k in edited_ids:
        assert after_caps[k]["caption"] == fresh_caps[k]["caption"]
        np.testing.assert_allclose(after_caps[k]["text_clip"], fresh_caps[k]["text_clip"], rtol=1e-5, atol=1e-6)
    _embed(ov, tmp_path, tmp_path / "fresh2")
    assert output_bytes(tmp_path / "fresh") == output_bytes(tmp_path / "fresh2")

    # nothing changed: nothing embedded, nothing retired, not a byte moved
    digests = output_bytes(features)
    third = _embed(ov, tmp_path)
    assert (third["images_embedded"], third["captions_embedded"], third["images_retired"],
            third["captions_retired"]) == (0, 0, 0, 0)
    assert third["images_skipped"] == 12 and third["captions_skipped"] == 24
    assert output_bytes(features) == digests


def _rows_texts(root: Path, caption_ids: set[str]) -> set[str]:
    manifest = read_pairs(root / "pairs")
    return {c for u, cs in zip(manifest.column("uid").to_pylist(), manifest.column("captions").to_pylist())
            for i, c in enumerate(cs) if make_caption_id(u, i) in caption_ids}


def _stage_overrides(ov: list[str], root: Path) -> list[str]:
    """Curate (the demo's target size: it keeps every train pair) and align@talk2dino under ``root``."""
    return [*ov, f"paths.curated={root / 'curated'}", f"curate.text_vocab={REPO / 'params/vocab/demo.txt'}",
            "curate.levels=[8, 2]", "curate.resample_steps=[1, 1]", "curate.resample_points=[8, 2]",
            f"paths.checkpoints={root / 'checkpoints'}", "align.recipe=talk2dino"]


def _curate_and_plan(ov: list[str], root: Path) -> Any:
    """The curate stage, as ``dvc repro`` runs it after embed, then align's plan: the
    training data and the run identity (the checkpoint folder a run resumes from)."""
    from dinoalign.data.images import image_limits
    from dinoalign.train.plan import plan_align

    stages = _stage_overrides(ov, root)
    assert main(["curate", "-p", P, *stages]) == 0
    params = load_params(P, stages)
    return plan_align(params.align, params.seed, image_limits(params.data), features=str(root / "features"),
                      pairs_dir=str(root / "pairs"), curated=str(root / "curated" / "uids.parquet"),
                      checkpoints=str(root / "checkpoints"), root=root)


def test_a_retrain_batch_that_edits_known_pairs_is_embedded_again_and_only_it(
    tmp_path: Path, tiny_clip_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #20, the retrain path: new caption data that edits a known pair's captions
    and replaces another's image (same keys) updates those rows of ``paths.incoming``
    (``dinoalign.data.incoming.append_batch``); prepare gives them their new content,
    embed embeds exactly the edited caption and the replaced image again, and curate and
    align follow the new features: a curation of the old features is refused, and align
    plans a new run (same uids, new content) instead of "resuming" the finished one (a
    run resumes the latest checkpoint under its name: tests/train/test_align_stage.py).
    Before the fix (the run name hashed the feature spec and the uids only) the names
    were equal."""
    from dinoalign.data import incoming

    drop, folder = tmp_path / "drop", tmp_path / "incoming" / "pairs"
    drop.mkdir()
    for i in range(4):
        _write_image(drop / f"new{i}.png", 200 + i)
    table = [(f"new{i}.png", f"new image {i}") for i in range(4)]
    _write_table(drop / "pairs.csv", table)
    counts = incoming.append_batch(folder, incoming.new_data_items(str(drop / "pairs.csv"), tmp_path), "b1")
    assert (counts["appended"], counts["updated"]) == (4, 0)
    ov = _prepare(tmp_path, tiny_clip_dir, **{"paths.incoming": str(folder)})
    first = _embed(ov, tmp_path)
    assert first["images_embedded"] == 24 + 4 + 4 + 12  # the synthetic splits and the 4 appended
    before_images = _rows(tmp_path / "features", "images", "uid")
    plan_before = _curate_and_plan(ov, tmp_path)
    curated_before = pq.read_table(tmp_path / "curated" / "uids.parquet")
    assert curated_before.schema.metadata[b"dinoalign.features_digest"].decode() == \
        FeatureStore(str(tmp_path / "features")).digest()

    _write_image(drop / "new1.png", 301)  # new bytes under the same key
    _write_table(drop / "pairs.csv", [(im, "new image 2, edited" if im == "new2.png" else cap) for im, cap in table])
    counts = incoming.append_batch(folder, incoming.new_data_items(str(drop / "pairs.csv"), tmp_path), "b2")
    assert counts == {"records": 4, "appended": 0, "updated": 2, "already_present": 2, "rejected": 0}
    rows = pq.read_table(folder / incoming.TABLE).to_pylist()  # new0 .. new3, in arrival order
    assert [r["batch"] for r in rows] == ["b1", "b2", "b2", "b1"]  # replaced in place
    assert (folder / rows[1]["image"]).read_bytes() == (drop / "new1.png").read_bytes()
    assert rows[2]["captions"] == ["new image 2, edited"]
    assert incoming.append_batch(folder, incoming.new_data_items(str(drop / "pairs.csv"), tmp_path),
                                 "b3")["already_present"] == 4  # the same edit again changes nothing

    assert main(["prepare", "-p", P, *ov]) == 0
    second = _embed(ov, tmp_path)
    assert (second["images_embedded"], second["images_changed"], second["images_retired"]) == (1, 1, 1)
    assert (second["captions_embedded"], second["captions_changed"], second["captions_retired"]) == (1, 1, 1)
    after_images = _rows(tmp_path / "features", "images", "uid")
    changed = {u for u in after_images if after_images[u][CONTENT_COLUMN] != before_images[u][CONTENT_COLUMN]}
    assert changed == {make_uid(incoming.SOURCE, rows[1]["key"])}
    assert _rows_texts(tmp_path, {make_caption_id(make_uid(incoming.SOURCE, rows[2]["key"]), 0)}) == {
        "new image 2, edited"}
    _assert_store_is_the_manifest(tmp_path, tmp_path / "features")

    # align on the curation of the old features: refused, it would select by stale clusters
    capsys.readouterr()
    assert main(["align", "-p", P, *_stage_overrides(ov, tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "curated from other features" in err[0] and "dvc repro curate" in err[0], err
    # curate again: align's run is a new one on the new features (same uids: the demo's
    # target size keeps all 28), so it never "resumes" the run finished on the old ones
    plan_after = _curate_and_plan(ov, tmp_path)
    curated_after = pq.read_table(tmp_path / "curated" / "uids.parquet")
    assert curated_after.select(["uid", "kept"]) == curated_before.select(["uid", "kept"])
    assert plan_after.selection.uids == plan_before.selection.uids and len(plan_after.selection.uids) == 28
    assert curated_after.schema.metadata != curated_before.schema.metadata
    assert plan_after.spec_hash == plan_before.spec_hash  # same models and preprocessing
    assert plan_after.run_name != plan_before.run_name


def test_dropped_uids_and_changed_rejects_leave_the_store(tmp_path: Path, tiny_clip_dir: Path) -> None:
    """Without prepare's validation the pairs manifest has no image hashes: a row records the
    hash of the bytes decoded, and embed hashes the embedded images' bytes again to know
    whether their rows hold. Uids dropped from the pairs lose their rows (images, captions)
    and their rejects."""
    ov, rows = _pairs_world(tmp_path, tiny_clip_dir, n=8, **{"prepare.validate_images": "false"})
    (tmp_path / "images" / "im05.png").write_bytes(b"not an image at all")
    features = tmp_path / "features"
    first = _embed(ov, tmp_path)
    assert first["images_hashed_here"] == 0  # nothing stored yet: nothing to check
    assert first["images_embedded"] == 7 and first["images_rejected"] == 1
    uid = _uid_of(tmp_path)
    assert [r["uid"] for r in FeatureStore(str(features)).read_rejects().to_pylist()] == [uid["im05.png"]]

    # drop images 1 and 6, and the rejected 5; then bring 5 back as a good image
    keep = [r for r in rows if not r[0].endswith(("im01.png", "im05.png", "im06.png"))]
    _write_table(tmp_path / "pairs.csv", keep)
    assert main(["prepare", "-p", P, *ov]) == 0
    second = _embed(ov, tmp_path)
    assert second["images_hashed_here"] == 5
    assert (second["images_embedded"], second["images_retired"], second["captions_retired"]) == (0, 2, 4)
    assert second["images_changed"] == second["captions_changed"] == 0 and second["rejects_total"] == 0
    stored = _rows(features, "images", "uid")
    assert set(stored) == {uid[f"im{i:02d}.png"] for i in (0, 2, 3, 4, 7)}
    assert {r["uid"] for r in _rows(features, "captions", "caption_id").values()} == set(stored)
    assert not (features / "rejects.parquet").exists() or FeatureStore(str(features)).read_rejects().num_rows == 0
    for gone in ("im01.png", "im05.png", "im06.png"):  # in no shard the manifest lists
        for entry in json.loads((features / "manifest.json").read_text())["shards"]:
            table = pq.read_table(features / entry["file"], columns=["uid"])
            assert uid[gone] not in table.column("uid").to_pylist()
    _assert_store_is_the_manifest_unhashed(tmp_path, features)

    # 5 comes back as a good image (a new uid to the store: its reject was retired) and
    # image 2's bytes change under the same path: both embedded, 2's old row retired
    _write_image(tmp_path / "images" / "im05.png", 5)
    _write_image(tmp_path / "images" / "im02.png", 102)
    _write_table(tmp_path / "pairs.csv", [r for r in rows if not r[0].endswith(("im01.png", "im06.png"))])
    assert main(["prepare", "-p", P, *ov]) == 0
    before = _rows(features, "images", "uid")
    third = _embed(ov, tmp_path)
    assert (third["images_embedded"], third["images_changed"], third["images_retired"]) == (2, 1, 1)
    assert third["captions_embedded"] == 2 and third["captions_retired"] == 0  # 2's captions did not change
    after = _rows(features, "images", "uid")
    assert set(after) == set(stored) | {uid["im05.png"]}
    assert {u: r for u, r in after.items() if u not in (uid["im02.png"], uid["im05.png"])} == \
        {u: r for u, r in before.items() if u != uid["im02.png"]}
    _assert_store_is_the_manifest_unhashed(tmp_path, features)


def _assert_store_is_the_manifest_unhashed(root: Path, features: Path) -> None:
    """As _assert_store_is_the_manifest for a manifest without image_sha256: the hashes of
    the files themselves."""
    manifest = read_pairs(root / "pairs")
    images = _rows(features, "images", "uid")
    for u, uri in zip(manifest.column("uid").to_pylist(), manifest.column("image_uri").to_pylist()):
        assert images[u][CONTENT_COLUMN] == hashlib.sha256(Path(uri).read_bytes()).hexdigest()
    assert set(images) == set(manifest.column("uid").to_pylist())


def test_a_regenerated_demo_world_is_embedded_again_and_nothing_stale_is_kept(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    small = {"data.synthetic.n_train": "6", "data.synthetic.n_val": "2", "data.synthetic.n_test": "2"}
    ov = _prepare(tmp_path, tiny_clip_dir, **small)
    features = tmp_path / "features"
    first = _embed(ov, tmp_path)
    assert first["images_embedded"] == 10
    old = read_pairs(tmp_path / "pairs")

    reseeded = [*ov, "data.synthetic.seed=7"]
    assert main(["prepare", "-p", P, *reseeded]) == 0
    new = read_pairs(tmp_path / "pairs")
    assert new.column("uid").to_pylist() == old.column("uid").to_pylist()  # same uids, other pixels and text
    changed_images = sum(a != b for a, b in zip(old.column("image_sha256").to_pylist(),
                                                new.column("image_sha256").to_pylist()))
    old_caps = {make_caption_id(u, i): c for u, cs in zip(old.column("uid").to_pylist(),
                                                          old.column("captions").to_pylist()) for i, c in enumerate(cs)}
    new_caps = {make_caption_id(u, i): c for u, cs in zip(new.column("uid").to_pylist(),
                                                          new.column("captions").to_pylist()) for i, c in enumerate(cs)}
    changed_caps = sum(old_caps.get(k) != c for k, c in new_caps.items())
    assert changed_images == 10 and changed_caps > len(new_caps) // 2

    second = _embed(reseeded, tmp_path)
    assert second["images_embedded"] == second["images_changed"] == second["images_retired"] == 10
    assert second["captions_embedded"] == second["captions_changed"] == changed_caps
    assert second["captions_retired"] == changed_caps + len(set(old_caps) - set(new_caps))
    _assert_store_is_the_manifest(tmp_path, features)


def test_a_store_without_content_hashes_is_embedded_again_once(
    tmp_path: Path, tiny_clip_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ov = _prepare(tmp_path, tiny_clip_dir, **{"data.synthetic.n_train": "4", "data.synthetic.n_val": "1",
                                              "data.synthetic.n_test": "1"})
    features = tmp_path / "features"
    _embed(ov, tmp_path)
    # as a version before content hashes wrote it: the same shards without the column
    for shard in features.glob("*/part-*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.drop_columns([CONTENT_COLUMN]).replace_schema_metadata(table.schema.metadata), shard)
    capsys.readouterr()
    again = _embed(ov, tmp_path)
    assert "predate content hashes (no content_sha256 column): re-embedding all once" in capsys.readouterr().out
    assert again["images_embedded"] == 6 and again["captions_embedded"] > 0
    _assert_store_is_the_manifest(tmp_path, features)
    assert _embed(ov, tmp_path)["images_embedded"] == 0
    assert "predate content hashes" not in capsys.readouterr().out


def test_repo_relative_image_paths_are_read_from_the_checkout_wherever_embed_runs(
    tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pairs manifest names the demo images relative to the checkout (the folder of
    params.yaml); embed and the teacher read them from there, not from the working
    directory of the process (`dinoalign embed -p checkout/params.yaml` elsewhere; a Ray
    worker's is not the checkout either)."""
    import os

    root = tmp_path / "checkout"
    root.mkdir()
    (root / "params.yaml").write_text("seed: 0\n")
    ov = tiny_overrides(root, tiny_clip_dir, **{
        "embed.engine": "local", "paths.pairs": "artifacts/pairs", "paths.features": "artifacts/features",
        "data.synthetic.n_train": "6", "data.synthetic.n_val": "2", "data.synthetic.n_test": "2"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["prepare", "-p", str(root / "params.yaml"), *ov]) == 0
    uris = read_pairs(root / "artifacts" / "pairs").column("image_uri").to_pylist()
    assert uris and not any(os.path.isabs(u) for u in uris)  # repo-relative
    assert main(["embed", "-p", str(root / "params.yaml"), *ov]) == 0
    listed = json.loads((root / "artifacts" / "features" / "manifest.json").read_text())
    assert listed["counts"]["images_total"] == 10 and listed["counts"]["rejects_total"] == 0
    # the teacher stage reads the same images (its CLIP trained on the demo's train split)
    assert main(["teacher", "-p", str(root / "params.yaml"), *ov, f"paths.teacher={root / 'teacher'}",
                 "teacher.epochs=1", "teacher.batch_size=4"]) == 0
    assert json.loads((root / "teacher" / "metrics.json").read_text())["train_images"] == 6
    # a relative local-dir: CLIP (the demo's is local-dir:artifacts/teacher/model) is read
    # from the checkout too, and the spec records it as params give it
    import shutil

    shutil.copytree(tiny_clip_dir, root / "towers" / "clip")
    assert main(["embed", "-p", str(root / "params.yaml"), *ov, "clip.name=local-dir:towers/clip",
                 "paths.features=artifacts/features-relative-clip"]) == 0
    relative = json.loads((root / "artifacts" / "features-relative-clip" / "manifest.json").read_text())
    assert relative["counts"]["images_total"] == 10
    assert relative["spec"]["clip"]["name"] == "local-dir:towers/clip"
    assert relative["spec"]["clip"]["weights_sha"] == listed["spec"]["clip"]["weights_sha"]
    assert not (elsewhere / "artifacts").exists() and not (elsewhere / "towers").exists()
