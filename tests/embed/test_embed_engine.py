"""The embed stage: feature math, both engines, incremental runs, rejects, kill + resume, S3."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from badfiles import CORPUS_MIN_SIDE, write_bad_corpus
from pipeline_testing import embed_features, output_bytes, tiny_backbone, tiny_overrides
from dinoalign.cli import main
from dinoalign.config import load_params
from dinoalign.data.prepare import read_pairs
from dinoalign.data.schema import make_caption_id
from dinoalign.embed.features import averaged_attention_embedding, head_embeddings, image_features
from dinoalign.embed.engine import decode_batch, plan_chunks, shard_name
from dinoalign.errors import ConfigError
from dinoalign.embed.store import FeatureStore, load_image_features


def test_head_embeddings_match_a_by_hand_softmax_pooling() -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    out = backbone(torch.randn(2, 3, 56, 70))
    got = head_embeddings(out.patches, out.attn_logits)
    B, H, P = out.attn_logits.shape
    for b in range(B):
        for h in range(H):
            logits = out.attn_logits[b, h].tolist()
            m = max(logits)
            w = [np.exp(x - m) for x in logits]
            w = [x / sum(w) for x in w]
            expected = sum(w[p] * out.patches[b, p].double() for p in range(P))
            torch.testing.assert_close(got[b, h].double(), expected, rtol=1e-5, atol=1e-6)
    feats = image_features(out, keep_patches=True)
    assert feats["head_embeddings"].shape == (2, 3, 48)
    # Talk2DINO's avg_self_attn_token (lorebianchi98/Talk2DINO, process_self_attention): the
    # heads' logits averaged, then one softmax over patches; not the mean of the heads' pools.
    for b in range(B):
        mean_logits = out.attn_logits[b].double().mean(0)
        w = (mean_logits - mean_logits.max()).exp()
        expected = (w / w.sum()) @ out.patches[b].double()
        torch.testing.assert_close(feats["head_mean_embedding"][b].double(), expected, rtol=1e-5, atol=1e-6)
    # Where the heads disagree the two readings differ: head 0 sees patch 0 only, head 1 both.
    patches, logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[10.0, 0.0], [0.0, 0.0]]])
    averaged = averaged_attention_embedding(patches, logits)[0]
    assert averaged[0].item() > 0.99 and head_embeddings(patches, logits).mean(1)[0, 0].item() < 0.76
    all_tokens = torch.cat([out.cls[:, None], out.registers, out.patches], 1)
    torch.testing.assert_close(feats["token_mean"], all_tokens.mean(1))
    assert feats["registers"].shape == (2, 4, 48) and feats["patches"].shape == (2, P, 48)


def _prepare(root: Path, clip_dir: Path, **extra: str) -> list[str]:
    ov = tiny_overrides(root, clip_dir, **extra)
    assert main(["prepare", "-p", "/nonexistent/params.yaml", *ov]) == 0
    return ov


@pytest.fixture()
def world(tmp_path: Path, tiny_clip_dir: Path) -> tuple[Path, list[str]]:
    return tmp_path, _prepare(tmp_path, tiny_clip_dir, **{"embed.engine": "local"})


def _uids(store_uri: str, kind: str = "images", key: str = "uid") -> list[str]:
    return FeatureStore(store_uri).read_all(kind, [key]).column(key).to_pylist()


def test_chunks_are_a_function_of_the_uid_order_alone() -> None:
    """#19 part 4: a resumed run plans exactly the chunks an uninterrupted run had left,
    with the same names, so it writes the same files."""
    import pyarrow as pa

    uids = [f"{i:02x}" for i in range(10)]
    table = pa.table({"uid": uids, "image_uri": [f"{u}.png" for u in uids]})
    full = plan_chunks("images", table, "uid", 4)
    assert [list(c.columns["uid"]) for c in full] == [uids[0:4], uids[4:8], uids[8:10]]
    assert [c.name for c in full] == [shard_name(uids[0:4]), shard_name(uids[4:8]), shard_name(uids[8:10])]
    assert full[0].name == "part-" + hashlib.sha256("\n".join(uids[0:4]).encode()).hexdigest()[:16] + ".parquet"
    # the first and last chunks finished before a kill: the rest is the middle chunk, as planned
    rest = table.filter(pa.array([u in uids[4:8] for u in uids]))
    assert plan_chunks("images", rest, "uid", 4) == [full[1]]
    with pytest.raises(ConfigError, match="embed.shard_rows must be >= 1"):
        plan_chunks("images", table, "uid", 0)


def test_local_engine_writes_shapes_and_skips_done_uids(world: tuple[Path, list[str]]) -> None:
    root, ov = world
    params = load_params("/nonexistent/params.yaml", ov)
    manifest = read_pairs(root / "pairs")
    first = embed_features(params, manifest)
    assert first["images_embedded"] == manifest.num_rows == 40
    assert first["operators"] == {} and first["ray_data_stats"] == ""  # Ray's operators only
    assert first["captions_embedded"] == sum(len(c) for c in manifest.column("captions").to_pylist())
    feats = load_image_features(str(root / "features"), ["cls", "head_embeddings", "clip_image", "patches"])
    assert feats["head_embeddings"].shape == (40, 3, 48)
    assert feats["patches"].shape == (40, 16, 48) and feats["clip_image"].shape == (40, 32)
    assert sorted(feats["uid"]) == sorted(manifest.column("uid").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(feats["clip_image"], axis=1), 1.0, rtol=1e-4)
    caps = FeatureStore(str(root / "features")).read_all("captions")
    expected_ids = {make_caption_id(u, i) for u, cs in zip(manifest.column("uid").to_pylist(),
                    manifest.column("captions").to_pylist()) for i in range(len(cs))}
    assert set(caps.column("caption_id").to_pylist()) == expected_ids
    assert len(caps.column("text_clip")[0]) == 32

    second = embed_features(params, manifest)
    assert second["images_embedded"] == 0 and second["captions_embedded"] == 0
    assert second["images_skipped"] == 40

    # new pairs: the world grows by 6 train images; only those are embedded
    grown = [*ov, "data.synthetic.n_train=30"]
    assert main(["prepare", "-p", "/nonexistent/params.yaml", *grown]) == 0
    third = embed_features(load_params("/nonexistent/params.yaml", grown), read_pairs(root / "pairs"))
    assert third["images_embedded"] == 6
    uids = _uids(str(root / "features"))
    assert len(uids) == len(set(uids)) == 46

    # a changed feature spec (another image size) re-embeds everything
    resized = [*grown, "embed.img_size=42", "backbone.img_size=42"]
    fourth = embed_features(load_params("/nonexistent/params.yaml", resized), read_pairs(root / "pairs"))
    assert fourth["images_embedded"] == 46
    assert load_image_features(str(root / "features"), ["patches"])["patches"].shape[1] == 9


def test_ray_engine_gives_the_local_engine_features(world: tuple[Path, list[str]]) -> None:
    from mlflow import MlflowClient

    root, ov = world
    manifest = read_pairs(root / "pairs")
    local = load_params("/nonexistent/params.yaml", [*ov, f"paths.features={root / 'local'}"])
    ray_ov = [*ov, f"paths.features={root / 'ray'}", "embed.engine=ray", "embed.actor_num_cpus=0.5",
              "embed.decode_num_cpus=0.25"]
    ray_p = load_params("/nonexistent/params.yaml", ray_ov)
    embed_features(local, manifest)
    assert main(["embed", "-p", "/nonexistent/params.yaml", *ray_ov]) == 0  # the stage, with its MLflow run

    # counts, throughput and Ray Data's time per operator are in the stage's MLflow run
    client = MlflowClient(ray_p.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(ray_p.tracking.experiment).experiment_id],
                                "tags.`dinoalign.stage` = 'embed'")
    metrics = run.data.metrics
    n_captions = sum(len(c) for c in manifest.column("captions").to_pylist())
    assert metrics["images_embedded"] == 40 and metrics["captions_embedded"] == n_captions
    assert metrics["images_per_s"] > 0 and metrics["captions_per_s"] > 0
    # one Ray Data row per chunk (= shard): 40 images in shards of 10, captions in shards of 40
    assert metrics["op.images.Map_DecodeChunk.rows"] == metrics["op.images.Map_ImageShards.rows"] == 4
    assert metrics["op.captions.Map_CaptionShards.rows"] == -(-n_captions // 40)
    assert metrics["shards_written"] == 4 + -(-n_captions // 40) and metrics["nodes_used"] == 1
    for op in ("images.Map_DecodeChunk", "images.Map_ImageShards", "captions.Map_CaptionShards"):
        assert metrics[f"op.{op}.wall_s"] > 0 and metrics[f"op.{op}.span_s"] > 0, op
    stats_file = client.download_artifacts(run.info.run_id, "ray_data_stats.txt", str(root / "dl"))
    assert "Map(ImageShards)" in Path(stats_file).read_text()

    # the same inputs give the same bytes (the DVC hash of the features) whichever order
    # Ray Data's workers finish in: rows are written by uid, as the plain loop writes them
    assert output_bytes(root / "ray") == output_bytes(root / "local")
    # the same bytes when the shards come back to the driver instead of being written where
    # they were computed (embed.write=driver; the plain loop takes the same path)
    driver = load_params("/nonexistent/params.yaml", [*ov, f"paths.features={root / 'driver'}", "embed.write=driver"])
    assert embed_features(driver, manifest)["shards_written"] == metrics["shards_written"]
    assert output_bytes(root / "driver") == output_bytes(root / "local")
    cols = ["cls", "token_mean", "head_embeddings", "clip_image"]
    a = load_image_features(str(root / "local"), cols)
    b = load_image_features(str(root / "ray"), cols)
    assert list(a["uid"]) == list(b["uid"])
    for c in cols:
        np.testing.assert_allclose(a[c], b[c], rtol=1e-4, atol=1e-5)
    assert embed_features(ray_p, manifest)["images_embedded"] == 0


def test_resources_ray_cannot_give_fail_fast_instead_of_waiting_forever(
    world: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dinoalign.ray_runtime import require_resources

    root, ov = world
    # Ray Data would wait forever for an actor the local Ray cannot place
    assert main(["embed", "-p", "/nonexistent/params.yaml", *ov, "embed.engine=ray", "embed.actor_num_gpus=64"]) == 2
    assert "needs 64 GPU (the Ray cluster has" in capsys.readouterr().err
    assert not (root / "features" / "images").exists()  # nothing half-written
    # the same check guards Ray Train's workers (align)
    with pytest.raises(ConfigError, match=r"needs 1024 CPU \(the Ray cluster has \d+\): fix it"):
        require_resources("align", {"CPU": 512.0, "GPU": 0.0}, 2, "fix it")
    # on a cluster an autoscaler may add nodes: a warning, no error
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    require_resources("align", {"CPU": 512.0}, 2, "fix it")
    assert "waiting for the cluster to add nodes" in capsys.readouterr().err


def test_bad_files_end_in_rejects_and_good_ones_in_shards(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    expected = write_bad_corpus(images)
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 60 * i, np.uint8)).save(images / f"good{i}.png")
    table = tmp_path / "pairs.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name in [*expected, "good0.png", "good1.png", "good2.png", "does_not_exist.jpg"]:
            w.writerow([f"images/{name}", f"caption of {name}"])
    # prepare's own validation is off so that every bad file reaches the embed stage
    ov = _prepare(tmp_path, tiny_clip_dir, **{
        "data.source": "pairs", "data.pairs.path": str(table), "prepare.validate_images": "false",
        "data.max_pixels": "1000000", "data.min_side": str(CORPUS_MIN_SIDE), "embed.engine": "local"})
    manifest = read_pairs(tmp_path / "pairs")
    assert manifest.num_rows == len(expected) + 4
    summary = embed_features(load_params("/nonexistent/params.yaml", ov), manifest)
    rejects = pq.read_table(tmp_path / "features" / "rejects.parquet").to_pylist()
    by_uri = dict(zip(manifest.column("uid").to_pylist(), manifest.column("image_uri").to_pylist()))
    got = {Path(by_uri[r["uid"]]).name: r["reason"] for r in rejects}
    assert got == {**expected, "does_not_exist.jpg": "missing"}
    assert all(r["stage"] == "embed" for r in rejects)
    embedded = _uids(str(tmp_path / "features"))
    assert sorted(Path(by_uri[u]).name for u in embedded) == ["good0.png", "good1.png", "good2.png"]
    assert summary["images_rejected"] == len(expected) + 1
    assert set(embedded) | {r["uid"] for r in rejects} == set(by_uri)  # nothing lost
    # a second run retries nothing and loses nothing
    again = embed_features(load_params("/nonexistent/params.yaml", ov), manifest)
    assert again["images_embedded"] == 0 and again["rejects_total"] == len(rejects)


@pytest.mark.timeout(300)
def test_a_transient_reject_is_retried_on_the_next_run_a_permanent_one_is_not(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    """Issue #20: an image whose server answered 503 past this run's tries is a transient
    reject (``unavailable``) the next run tries again, and embeds once the server is back;
    a 404 (``missing``) or 403 (``read_error``) is never asked for again."""
    from flaky_http import flaky_server

    with flaky_server() as srv:
        paths = {"ok": "/ok/a.png", "blip": "/flaky/1/b.png", "outage": "/flaky/2/c.png",
                 "gone": "/status/404/d.png", "denied": "/status/403/e.png"}
        table = tmp_path / "pairs.csv"
        with table.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for name, path in paths.items():
                w.writerow([srv.url + path, f"caption of {name}"])
        ov = _prepare(tmp_path, tiny_clip_dir, **{
            "data.source": "pairs", "data.pairs.path": str(table), "prepare.validate_images": "false",
            "embed.engine": "local", "data.read_attempts": "2", "data.read_backoff_s": "0.01"})
        params = load_params("/nonexistent/params.yaml", ov)
        manifest = read_pairs(tmp_path / "pairs")
        uid = {n: u for u, uri in zip(manifest.column("uid").to_pylist(), manifest.column("image_uri").to_pylist())
               for n, p in paths.items() if uri == srv.url + p}

        first = embed_features(params, manifest)
        # the blip (one 503) passed on its second try; the outage (two 503s) did not
        assert sorted(_uids(str(tmp_path / "features"))) == sorted([uid["ok"], uid["blip"]])
        rejects = {r["uid"]: r["reason"] for r in FeatureStore(str(tmp_path / "features")).read_rejects().to_pylist()}
        assert rejects == {uid["outage"]: "unavailable", uid["gone"]: "missing", uid["denied"]: "read_error"}
        assert first["images_rejected_transient"] == 1 and first["images_rejected"] == 3
        assert [srv.hits[paths[n]] for n in ("blip", "outage", "gone", "denied")] == [2, 2, 1, 1]

        second = embed_features(params, manifest)
        assert second["images_embedded"] == 1 and second["images_retried"] == 1
        assert second["images_skipped"] == 4 and second["images_rejected"] == 0
        # the embedded two are read once more, to hash them (the pairs manifest has no
        # image_sha256 without prepare's validation: their rows hold only while their bytes do)
        assert second["images_hashed_here"] == 2
        assert [srv.hits[paths[n]] for n in ("ok", "blip", "outage", "gone", "denied")] == [2, 3, 3, 1, 1]
    uids = _uids(str(tmp_path / "features"))
    assert sorted(uids) == sorted([uid["ok"], uid["blip"], uid["outage"]]) and len(set(uids)) == 3
    rejects = {r["uid"]: r["reason"] for r in FeatureStore(str(tmp_path / "features")).read_rejects().to_pylist()}
    assert rejects == {uid["gone"]: "missing", uid["denied"]: "read_error"}  # one row per uid, the last outcome
    assert set(uids) | set(rejects) == set(uid.values())  # every input accounted
    caps = _uids(str(tmp_path / "features"), "captions", "uid")
    assert sorted(caps) == sorted(uids)  # the retried image's caption too


def test_real_coco_images_reach_the_shards_at_the_papers_preprocessing(
    coco_mini: Path, tmp_path: Path, tiny_clip_dir: Path
) -> None:
    """The official COCO val captions file over a folder holding 159 of its 5,000 images
    (one greyscale) through prepare and the Ray engine at talk2dino's preprocessing (short
    side 448 bicubic, centre crop 448): the absent images are prepare's `missing` rejects,
    every present one reaches a shard, and the stored CLS equals the backbone on
    torchvision's own Resize + CenterCrop of the image."""
    import torchvision.transforms as T
    from PIL import Image

    from dinoalign.data.schema import make_uid
    from dinoalign.backbones.dinov2 import build_backbone_from

    ov = _prepare(tmp_path, tiny_clip_dir, **{
        "data.source": "coco", "data.coco.captions_json": str(coco_mini / "annotations-full" / "captions_val2017.json"),
        "data.coco.image_dir": str(coco_mini / "val2017"), "data.coco.split": "val",
        "backbone.img_size": "448", "embed.img_size": "448", "embed.engine": "ray", "embed.keep_patches": "false",
        "embed.actor_num_cpus": "0.5", "embed.decode_num_cpus": "0.25"})
    params = load_params("/nonexistent/params.yaml", ov)
    manifest = read_pairs(tmp_path / "pairs")
    present = len(list((coco_mini / "val2017").glob("*.jpg")))
    assert manifest.num_rows == present == 159
    prepare_rejects = pq.read_table(tmp_path / "pairs" / "rejects.parquet").column("reason").to_pylist()
    assert len(prepare_rejects) == 5000 - present and set(prepare_rejects) == {"missing"}
    summary = embed_features(params, manifest)
    assert summary["images_embedded"] == present and summary["rejects_total"] == 0
    n_captions = sum(len(c) for c in manifest.column("captions").to_pylist())
    assert summary["captions_embedded"] == n_captions >= 5 * present
    spec = json.loads((tmp_path / "features" / "manifest.json").read_text())["spec"]
    assert spec["img_size"] == 448 and spec["interpolation"] == "bicubic" and spec["backbone"]["grid"] == [32, 32]

    feats = load_image_features(str(tmp_path / "features"), ["cls", "head_embeddings"])
    assert sorted(feats["uid"]) == sorted(manifest.column("uid").to_pylist())
    assert np.isfinite(feats["head_embeddings"]).all()
    backbone = build_backbone_from(params.backbone, params.seed)
    by_hand = T.Compose([T.Resize(448, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(448)])
    by_uri = dict(zip(manifest.column("uid").to_pylist(), manifest.column("image_uri").to_pylist()))
    grey = make_uid("coco", "431848")  # the subset's one greyscale (mode L) JPEG
    uids = np.array([grey, min(by_uri)])
    decoded = decode_batch({"uid": uids, "image_uri": np.array([by_uri[u] for u in uids])}, img_size=448,
                           interpolation="bicubic", max_pixels=params.data.max_pixels, min_side=params.data.min_side)
    for uid, pixels in zip(decoded["uid"], decoded["image"]):
        with Image.open(by_uri[uid]) as image:
            crop = np.array(by_hand(image.convert("RGB")))
        np.testing.assert_array_equal(pixels, crop)  # the pipeline's decode is torchvision's, to the pixel
        with torch.no_grad():
            expected = backbone(backbone.normalize(torch.from_numpy(crop[None]))).cls[0]
        stored = torch.from_numpy(feats["cls"][list(feats["uid"]).index(uid)])
        # tight: this tiny random ViT's CLS (|x| ~ 1e-3) moves by ~2e-6 between bicubic and bilinear crops
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-7)


def test_killed_run_resumes_without_duplicates(tmp_path: Path, tiny_clip_dir: Path) -> None:
    ov = _prepare(tmp_path, tiny_clip_dir, **{
        "data.synthetic.n_train": "160", "embed.engine": "local", "embed.shard_rows": "8",
        "embed.batch_size": "4", "embed.decode_batch_size": "4"})
    features = tmp_path / "features" / "images"
    cmd = [sys.executable, "-m", "dinoalign.cli", "embed", "-p", "/nonexistent/params.yaml", *ov]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if features.is_dir() and len(list(features.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _uids(str(tmp_path / "features"))
    manifest = read_pairs(tmp_path / "pairs")
    assert 0 < len(partial) < manifest.num_rows
    assert not (tmp_path / "features" / "manifest.json").exists()

    summary = embed_features(load_params("/nonexistent/params.yaml", ov), manifest)
    assert summary["images_embedded"] == manifest.num_rows - len(partial)
    uids = _uids(str(tmp_path / "features"))
    assert len(uids) == len(set(uids)) and set(uids) == set(manifest.column("uid").to_pylist())
    caps = _uids(str(tmp_path / "features"), "captions", "caption_id")
    assert len(caps) == len(set(caps)) == sum(len(c) for c in manifest.column("captions").to_pylist())
    # #19 part 4: the killed and resumed run wrote the files of an uninterrupted one, byte for byte
    whole = load_params("/nonexistent/params.yaml", [*ov, f"paths.features={tmp_path / 'whole'}"])
    embed_features(whole, manifest)
    assert output_bytes(tmp_path / "features") == output_bytes(tmp_path / "whole")


@pytest.mark.integration
def test_s3_round_trip_against_real_seaweedfs(world: tuple[Path, list[str]], s3_server) -> None:
    from dinoalign.ops.services import ensure_bucket
    from dinoalign.storage import boto3_client

    root, ov = world
    ensure_bucket("dinoalign-features")
    uri = "s3://dinoalign-features/run1/features"
    params = load_params("/nonexistent/params.yaml", [*ov, f"paths.features={uri}"])
    manifest = read_pairs(root / "pairs")
    assert embed_features(params, manifest)["images_embedded"] == 40
    keys = [o["Key"] for o in boto3_client().list_objects_v2(Bucket="dinoalign-features")["Contents"]]
    assert "run1/features/manifest.json" in keys and any(k.startswith("run1/features/images/part-") for k in keys)
    remote = load_image_features(uri, ["cls", "head_embeddings"])
    local_params = load_params("/nonexistent/params.yaml", ov)
    embed_features(local_params, manifest)
    local = load_image_features(str(root / "features"), ["cls", "head_embeddings"])
    assert list(remote["uid"]) == list(local["uid"])
    np.testing.assert_allclose(remote["head_embeddings"], local["head_embeddings"], rtol=1e-5, atol=1e-6)
    assert embed_features(params, manifest)["images_embedded"] == 0
