"""A real multi-node Ray cluster on loopback (#18): ``dinoalign infra up --workers 2``
starts SeaweedFS, an mlflow server, a Ray head and two Ray worker nodes (each a ``ray start
--address`` process with its own raylet and object store) inside a private network
namespace (tests/netns.py), and the embed stage runs on it with every input and output a
worker touches in S3: the images, the feature shards. The driver's working tree holds only
the pairs table the driver reads.

1. the model actors run on the two worker nodes (checked by node id, not assumed), each
   writes its own shards to S3;
2. a worker node is lost part-way (its raylet killed by PID): the run completes on the
   survivor (or fails with a clear error and a re-run finishes) and every uid is in the
   features exactly once, with the bytes of the undisturbed run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest
from netns import private_network, why_not_available
from pipeline_testing import tiny_overrides
from PIL import Image

from dinoalign.ops import services as infra
from dinoalign.ops.stack import StackOptions, down, stack_env, up, worker_resources
from dinoalign.storage import S3Settings, boto3_client

pytestmark = pytest.mark.integration

BUCKET = "dinoalign"
N_IMAGES = 32
SHARD_ROWS = 4  # 8 image shards: enough to lose a node part-way


@dataclasses.dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    services: dict[str, infra.Service]
    settings: S3Settings

    def s3(self) -> Any:
        return boto3_client("s3", self.settings)

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def nodes(self) -> dict[str, list[str]]:
        """Alive node id -> its dinoalign_* resources, asked of the cluster by a driver."""
        code = ("import json, ray; ray.init(logging_level='ERROR'); print(json.dumps({n['NodeID']: sorted(k for k in "
                "n['Resources'] if k.startswith('dinoalign_')) for n in ray.nodes() if n['Alive']}))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("cluster")
    with private_network():
        # outside a loopback-only namespace `up --workers` refuses (tested below); here it starts
        up(root, StackOptions(bucket=BUCKET, ray_cpus=1, ray_workers=2, worker_cpus=1, dvc_remote=False))
        try:
            base = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", "DINOALIGN_"))}
            base["PATH"] = f"{Path(sys.executable).parent}:{base['PATH']}"
            env = {**base, **stack_env(root)}
            services = {s.name: s for s in infra.load_state(root / "infra" / "run" / "stack.json")[0]}
            settings = S3Settings(env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                                  "us-east-1")
            with pytest.MonkeyPatch.context() as mp:  # this process reads the features in S3 too
                for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    mp.setenv(key, env[key])
                yield Cluster(root, env, services, settings)
        finally:
            down(root)


def _world(cluster: Cluster, clip_dir: Path) -> list[str]:
    """Demo images in the bucket, a pairs table naming them by s3:// URI, prepared; the
    overrides that run embed on the cluster."""
    from dinoalign.config import load_params
    from dinoalign.data.synthetic import render

    root = cluster.root
    ov = tiny_overrides(root, clip_dir, **{"data.synthetic.n_train": str(N_IMAGES)})
    world = load_params("/nonexistent/params.yaml", ov).data.synthetic
    rows = []
    for index in range(N_IMAGES):
        sample = render(world, "train", index)
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        cluster.s3().put_object(Bucket=BUCKET, Key=f"images/{index}.png", Body=buf.getvalue())
        rows += [{"image": f"s3://{BUCKET}/images/{index}.png", "caption": c} for c in sample.captions]
    pd.DataFrame(rows).to_csv(root / "pairs.csv", index=False)
    ov += ["data.source=pairs", f"data.pairs.path={root / 'pairs.csv'}", f"tracking.uri={cluster.env['MLFLOW_TRACKING_URI']}",
           "embed.engine=ray", "embed.num_actors=2", "embed.actor_num_cpus=0.5", "embed.decode_num_cpus=0.25",
           "embed.actor_resources={dinoalign_worker: 0.5}", f"embed.shard_rows={SHARD_ROWS}"]
    _cli(cluster, ["prepare", *ov])
    return ov


def _cli(cluster: Cluster, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "dinoalign.cli", args[0], "-p", "/nonexistent/params.yaml", *args[1:]],
                          cwd=cluster.root, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"dinoalign {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _embed_run(cluster: Cluster, features: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          "tags.`dinoalign.stage` = 'embed'")]
    ours = [r for r in runs if r.data.params.get("paths.features") == features]
    assert ours, [r.data.params.get("paths.features") for r in runs]
    return ours[0]


def _shards(cluster: Cluster, prefix: str) -> dict[str, str]:
    """Shard file -> sha256, as the manifest in S3 records them."""
    manifest = json.loads(cluster.s3().get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())
    return {e["file"]: e["sha256"] for e in manifest["shards"]}


def _uids(features: str) -> list[str]:
    from dinoalign.embed.store import FeatureStore

    return FeatureStore(features).read_all("images", ["uid"]).column("uid").to_pylist()


@pytest.mark.timeout(900)
def test_embed_on_two_worker_nodes_then_one_lost_part_way(cluster: Cluster, tiny_clip_dir: Path) -> None:
    ov = _world(cluster, tiny_clip_dir)
    nodes = cluster.nodes()
    workers = {n for n, res in nodes.items() if "dinoalign_worker" in res}
    head = {n for n, res in nodes.items() if "dinoalign_head" in res}
    assert len(nodes) == 3 and len(workers) == 2 and len(head) == 1, nodes
    assert {tuple(res) for n, res in nodes.items() if n in workers} == {
        tuple(sorted(worker_resources(i))) for i in (1, 2)}

    # 1. undisturbed: the actors on both worker nodes, each writing its shards to S3
    whole = f"s3://{BUCKET}/features-whole"
    out = _cli(cluster, ["embed", *ov, f"paths.features={whole}"])
    run = _embed_run(cluster, whole)
    used = set(run.data.tags["dinoalign.embed.nodes"].split(","))
    assert used == workers, (used, workers, out.stderr[-2000:])
    assert run.data.metrics["images_embedded"] == N_IMAGES and run.data.metrics["nodes_used"] == 2
    uids = _uids(whole)
    assert len(uids) == len(set(uids)) == N_IMAGES
    assert not (cluster.root / "features").exists()  # nothing in the driver's tree
    # (that these bytes are the plain loop's: tests/embed/test_embed_engine.py)

    # 2. a worker node lost part-way: its raylet killed once the first shard is in S3
    lost = f"s3://{BUCKET}/features-lost"
    cmd = [sys.executable, "-m", "dinoalign.cli", "embed", "-p", "/nonexistent/params.yaml", *ov,
           f"paths.features={lost}"]
    log = cluster.root / "embed-lost.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=cluster.root, env=cluster.env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not cluster.keys("features-lost/images/part-"):
            time.sleep(0.1)
        assert proc.poll() is None, f"embed finished before a node could be lost:\n{log.read_text()[-3000:]}"
        victim = infra.raylet_pid(cluster.services["ray-worker-1"])
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        written_before = len(cluster.keys("features-lost/images/part-"))
        rc = proc.wait(timeout=600)
    if rc != 0:  # a clear error, then a re-run on the survivor finishes
        tail = log.read_text().strip().splitlines()[-1]
        assert "Traceback" not in tail, log.read_text()[-3000:]
        _cli(cluster, ["embed", *ov, f"paths.features={lost}"])
    assert written_before < N_IMAGES // SHARD_ROWS
    uids = _uids(lost)
    assert len(uids) == len(set(uids)) == N_IMAGES
    # every chunk is a function of the uid order alone: the same shards, byte for byte
    assert _shards(cluster, "features-lost") == _shards(cluster, "features-whole")
    alive = set(cluster.nodes())
    assert len(alive) == 2 and head < alive and len(alive & workers) == 1  # the lost node stays lost


def test_workers_outside_a_private_network_are_refused(tmp_path: Path) -> None:
    from dinoalign.errors import StackError

    if infra.loopback_only():
        pytest.skip("this process is in a loopback-only network namespace already")
    with pytest.raises(StackError, match=r"listens on every interface.*unshare -rn.*--ray-listen-all"):
        up(tmp_path, StackOptions(ray_workers=2, dvc_remote=False))
    assert not (tmp_path / "infra" / "run" / "stack.json").exists()
    assert infra.load_state(tmp_path / "infra" / "run" / "stack.json") == ([], {})
