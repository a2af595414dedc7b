"""The KubeRay manifests (infra/kubernetes/) against the vendored subset of the KubeRay v1
CRD schemas and the core kinds they use (no cluster needed), their cross-references, the
kustomize rendering, the in-cluster entry script and the single-machine crontab line."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "infra" / "kubernetes"
SCHEMA = json.loads((KUBE / "schemas" / "manifests.schema.json").read_text())
MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def errors(doc: dict[str, Any]) -> list[str]:
    """Validation errors of one manifest against the schema of its kind."""
    kind = doc.get("kind")
    if kind not in SCHEMA["$defs"]:
        return [f"kind {kind!r} has no schema in manifests.schema.json"]
    validator = jsonschema.Draft202012Validator({**SCHEMA, "$ref": f"#/$defs/{kind}"})
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in docs(p) if d["kind"] == kind]


def test_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path: Path) -> None:
    found = docs(path)
    assert found
    for doc in found:
        assert errors(doc) == [], f"{path.name} {doc['kind']}"


def _raycluster() -> dict[str, Any]:
    return copy.deepcopy(by_kind("RayCluster")[0])


def _rayjob() -> dict[str, Any]:
    return copy.deepcopy(docs(KUBE / "rayjob-retrain.yaml")[0])


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True), "Additional properties"),  # typo
    (lambda d: d["spec"].__setitem__("submissionMode", "K8sJob"), "is not one of"),
    (lambda d: d["spec"].__setitem__("entrypointNumCpus", "one"), "is not of type 'number'"),
    (lambda d: d["spec"].pop("clusterSelector"), "is not valid under any of the given schemas"),
    (lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"), "'ray.io/v1' was expected"),
], ids=["misspelt-field", "bad-enum", "bad-type", "no-cluster", "old-api"])
def test_schema_rejects_broken_rayjobs(break_it: Any, expected: str) -> None:
    doc = _rayjob()
    break_it(doc)
    assert any(expected in e for e in errors(doc)), errors(doc)


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("replicas", "1"), "is not of type 'integer'"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .__setitem__("memory", "8 GB"), "is not valid under any of the given schemas"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].__setitem__("containers", []), "should be non-empty"),
], ids=["replicas-string", "no-group-name", "bad-quantity", "no-containers"])
def test_schema_rejects_broken_rayclusters(break_it: Any, expected: str) -> None:
    doc = _raycluster()
    break_it(doc)
    assert any(expected in e for e in errors(doc)), errors(doc)


def test_cross_references() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    for name in [*kustomization["resources"], *(f for g in kustomization["configMapGenerator"] for f in g["files"])]:
        assert (KUBE / name).is_file(), name
    cluster = _raycluster()
    # every Ray pod: the image kustomize rewrites, settings from the ConfigMap, keys from the Secret
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    config = by_kind("ConfigMap")[0]["metadata"]["name"]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == kustomization["images"][0]["name"]
            assert {"configMapRef": {"name": config}} in container["envFrom"]
            assert {"secretRef": {"name": "dinoalign-s3"}} in container["envFrom"]
            # MLflow basic auth (#19): the workers log to MLflow themselves; optional for a server without it
            assert {"secretRef": {"name": "dinoalign-mlflow", "optional": True}} in container["envFrom"]
    # the RayJobs run on that cluster, through the entry script, in a mode it knows
    script = (KUBE / "run-in-cluster.sh").read_text()
    for path in (KUBE / "rayjob-repro.yaml", KUBE / "rayjob-retrain.yaml"):
        job = docs(path)[0]
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        command = job["spec"]["entrypoint"].split()
        assert command[:2] == ["bash", "/opt/dinoalign/infra/kubernetes/run-in-cluster.sh"]
        assert f"\n  {command[2]})\n" in script
    # the CronJob mounts the generated RayJob, may create rayjobs, and never overlaps itself
    cron = by_kind("CronJob")[0]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    generator = kustomization["configMapGenerator"][0]
    assert pod["volumes"][0]["configMap"]["name"] == generator["name"]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"{mount}/{generator['files'][0]}" in pod["containers"][0]["command"][-1]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    role = by_kind("Role")[0]
    assert role["rules"][0]["resources"] == ["rayjobs"] and "create" in role["rules"][0]["verbs"]
    assert by_kind("RoleBinding")[0]["subjects"][0]["name"] == pod["serviceAccountName"]
    # no credentials in any manifest (comments aside): they come from the Secret only
    text = json.dumps([d for p in KUBE.glob("*.yaml") for d in docs(p)])
    assert not any(key in text for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD",
                                           "MLFLOW_TRACKING_USERNAME"))


def test_entry_script_parses() -> None:
    subprocess.run(["bash", "-n", str(KUBE / "run-in-cluster.sh")], check=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kustomize rendering)")
def test_kustomize_renders_valid_manifests() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, check=True).stdout
    found = [d for d in yaml.safe_load_all(rendered) if d]
    assert sorted(d["kind"] for d in found) == ["ConfigMap", "ConfigMap", "CronJob", "RayCluster", "Role",
                                                "RoleBinding", "ServiceAccount"]
    for doc in found:
        assert errors(doc) == [], doc["kind"]
        assert doc["metadata"]["namespace"] == "dinoalign"
    images = {c["image"] for d in found if d["kind"] == "RayCluster"
              for g in [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/dinoalign:0.1.0"}
    generated = next(d for d in found if d["kind"] == "ConfigMap" and "rayjob-retrain.yaml" in d["data"])
    assert errors(yaml.safe_load(generated["data"]["rayjob-retrain.yaml"])) == []
    cron = next(d for d in found if d["kind"] == "CronJob")
    volume = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == generated["metadata"]["name"]  # the hashed name, rewritten


def test_crontab_line() -> None:
    lines = [ln for ln in (REPO / "infra" / "crontab").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for field, (low, high) in zip(fields[:5], ranges):
        assert field == "*" or (re.fullmatch(r"\d+", field) and low <= int(field) <= high), field
    assert ". infra/run/stack.env" in fields[5] and "dinoalign retrain --new " in fields[5]
