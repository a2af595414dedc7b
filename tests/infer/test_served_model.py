"""The registered models as MLflow pyfunc models (dinoalign.serve): loaded by
``mlflow.pyfunc.load_model`` in a fresh process and served by ``mlflow models serve``, they
answer as the CLI does (the same label map byte for byte, the same scores), carry a
signature and an input example, and refuse bad requests with HTTP 400 and one line while
the server keeps serving."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipeline_testing import DemoModels

from dinoalign.data.prepare import read_pairs

RECIPES = DemoModels.RECIPES
DENSE = ("talk2dino", "dinotxt")


@dataclasses.dataclass(frozen=True)
class Registered:
    models: DemoModels
    tracking_uri: str
    image: str  # a test image of the demo world
    classes: list[str]
    versions: dict[str, str]
    root: Path


@pytest.fixture(scope="module")
def registered(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """The three demo recipes logged and registered as the align stage does it, in a
    store of their own."""
    import mlflow

    from dinoalign.serve import log_model
    from dinoalign.tracking import MODEL_ARTIFACT, register_model

    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("served", artifact_location=(root / "artifacts").as_uri())
    versions = {}
    try:
        for recipe in RECIPES:
            with mlflow.start_run(experiment_id=experiment):
                logged = log_model(demo_models.model_dir(recipe), demo_models.params(),
                                   demo_models.root, MODEL_ARTIFACT)
                versions[recipe] = register_model(
                    recipe, "dinoalign", logged.model_uri, {"dinoalign.weights_sha256": logged.info["weights_sha256"]})
    finally:
        mlflow.set_tracking_uri(None)
    rows = [r for r in read_pairs(demo_models.features.pairs_dir).to_pylist() if r["split"] == "test"]
    classes = demo_models.features.world["classes"][:6]
    return Registered(demo_models, uri, rows[0]["image_uri"], classes, versions, root)


def _b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _cli(models: DemoModels, capsys: Any, *args: str) -> dict:
    capsys.readouterr()
    assert models.main(*args) == 0
    return json.loads(capsys.readouterr().out)


def _cli_answers(reg: Registered, capsys: Any, tmp_path: Path, recipes: tuple[str, ...] | list[str] = RECIPES
                 ) -> dict[str, dict]:
    """What ``dinoalign segment`` / ``classify`` answer on the model folders (the params'
    background threshold, given explicitly: an evaluated threshold would be used otherwise)."""
    params = reg.models.params()
    out: dict[str, dict] = {}
    for recipe in recipes:
        model = str(reg.models.model_dir(recipe))
        classify = _cli(reg.models, capsys, "classify", "--model", model, "--image", reg.image,
                        "--classes", ",".join(reg.classes), "--top-k", str(len(reg.classes)))
        out[recipe] = {"classify": classify}
        if recipe in DENSE:
            mask = tmp_path / f"{recipe}.png"
            threshold = params.evaluate.segmentation_for(recipe).bg_threshold
            segment = _cli(reg.models, capsys, "segment", "--model", model, "--image", reg.image,
                           "--classes", ",".join(reg.classes), "--out", str(mask),
                           "--bg-threshold", str(threshold))
            out[recipe]["segment"] = {**segment, "png": mask.read_bytes()}
    return out


def _check_same_as_cli(cli: dict, recipe: str, answers: list[dict]) -> None:
    classify = answers[0]
    expected = cli[recipe]["classify"]["predictions"]
    assert [p["label"] for p in classify["predictions"]] == [p["class"] for p in expected]
    np.testing.assert_allclose([p["score"] for p in classify["predictions"]],
                               [p["score"] for p in expected], atol=1e-5)
    np.testing.assert_allclose([p["probability"] for p in classify["predictions"]],
                               [p["probability"] for p in expected], atol=1e-5)
    if recipe in DENSE:
        segment = answers[1]
        assert base64.b64decode(segment["mask_png_b64"]) == cli[recipe]["segment"]["png"]
        assert segment["labels"] == list(cli[recipe]["segment"]["labels"].values())
        assert segment["pixel_fraction"] == pytest.approx(cli[recipe]["segment"]["pixel_fraction"])


def _requests(reg: Registered, recipe: str) -> list[dict]:
    image = _b64(reg.image)
    requests = [{"task": "classify", "image_b64": image, "classes": reg.classes}]
    if recipe in DENSE:
        requests.append({"task": "segment", "image_b64": image, "classes": reg.classes})
    requests.append({"task": "embed", "text": f"a photo of a {reg.classes[0]}"})
    return requests


LOAD_AND_PREDICT = """
import json, sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
out = {}
for recipe, requests in json.loads(open(sys.argv[2]).read()).items():
    uri = f"models:/dinoalign-{recipe}@candidate"
    info = mlflow.models.get_model_info(uri)
    model = mlflow.pyfunc.load_model(uri)
    answers = [a.model_dump() for a in model.predict(requests)]
    out[recipe] = {"answers": answers, "inputs": info.signature.inputs.to_dict(),
                   "outputs": info.signature.outputs.to_dict(),
                   "example": info.saved_input_example_info is not None, "flavors": list(info.flavors)}
open(sys.argv[3], "w").write(json.dumps(out))
"""


def test_load_model_in_a_fresh_process_answers_like_the_cli(
    registered: Registered, capsys: Any, tmp_path: Path
) -> None:
    cli = _cli_answers(registered, capsys, tmp_path)
    requests = {recipe: _requests(registered, recipe) for recipe in RECIPES}
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, registered.tracking_uri,
         str(tmp_path / "requests.json"), str(tmp_path / "answers.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = json.loads((tmp_path / "answers.json").read_text())
    for recipe in RECIPES:
        got = loaded[recipe]
        assert "python_function" in got["flavors"] and got["example"], recipe
        fields = {c["name"]: c for c in got["inputs"][0]["properties"]} if isinstance(
            got["inputs"][0].get("properties"), list) else got["inputs"][0]["properties"]
        assert {"task", "image_b64", "image_uri", "text", "classes", "bg_threshold"} <= set(fields), got["inputs"]
        _check_same_as_cli(cli, recipe, got["answers"])
        vectors = np.asarray(got["answers"][-1]["vectors"])
        assert vectors.shape[0] == 1 and np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-4)


def _post(url: str, body: Any) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("recipe", RECIPES)
def test_mlflow_models_serve_answers_like_the_cli_and_refuses_bad_requests(
    registered: Registered, capsys: Any, tmp_path: Path, recipe: str
) -> None:
    from dinoalign.ops.services import start_model_server

    cli = _cli_answers(registered, capsys, tmp_path, [recipe])
    image_dir = str(Path(registered.image).parent)
    server = start_model_server(f"models:/dinoalign-{recipe}@candidate", tmp_path,
                                {"MLFLOW_TRACKING_URI": registered.tracking_uri,
                                 "DINOALIGN_IMAGE_ROOTS": image_dir})
    try:
        status, body = _post(server.url, {"inputs": _requests(registered, recipe)})
        assert status == 200, body
        _check_same_as_cli(cli, recipe, body["predictions"])
        # a path under DINOALIGN_IMAGE_ROOTS gives the same answer as the bytes
        status, by_path = _post(server.url, {"inputs": [
            {"task": "classify", "image_uri": registered.image, "classes": registered.classes}]})
        assert status == 200 and by_path["predictions"][0] == body["predictions"][0]

        image = _b64(registered.image)
        bad = [
            ({"task": "classify", "image_b64": base64.b64encode(b"not an image").decode(),
              "classes": ["red circle"]}, "cannot use image_b64"),
            ({"task": "classify", "image_b64": image, "classes": []}, "needs classes"),
            ({"task": "paint", "image_b64": image, "classes": ["red circle"]}, "unknown task 'paint'"),
            ({"task": "classify", "image_b64": image, "classes": "red circle"}, "valid list"),
            ({"task": "classify", "image_uri": "/etc/hostname", "classes": ["red circle"]},
             "is not under $DINOALIGN_IMAGE_ROOTS"),
            ({"task": "classify", "image_b64": image, "classes": ["red circle", "cat"]},
             f"unknown classes for this {recipe} model"),
        ]
        if recipe not in DENSE:
            bad.append(({"task": "segment", "image_b64": image, "classes": ["red circle"]},
                        f"{recipe} has no dense head"))
        for request, reason in bad:
            status, body = _post(server.url, {"inputs": [request]})
            assert status == 400 and reason in body["message"], (request["task"], status, body)
        status, body = _post(server.url, b"{not json")
        assert status == 400, body
        status, body = _post(server.url, {"inputs": [_requests(registered, recipe)[0]]})
        assert status == 200 and body["predictions"][0]["task"] == "classify"  # still serving
        assert server.alive()
    finally:
        server.stop()
    assert not server.alive()


def test_a_damaged_bundle_is_refused(registered: Registered, tmp_path: Path) -> None:
    from dinoalign.errors import InferenceError
    from dinoalign.serve import load_bundle, write_bundle

    models = registered.models
    bundle = write_bundle(models.model_dir("talk2dino"), models.params(), models.root, tmp_path / "b")
    info = json.loads((bundle / "bundle.json").read_text())
    # the demo teacher CLIP travels with the model; the random-init backbone is a name + seed
    assert info["towers"]["text-clip"]["bundled"] and not info["towers"]["backbone"]["bundled"]
    assert (bundle / "towers" / "text-clip").is_dir() and "tracking" not in json.loads(
        (bundle / "params.json").read_text())
    assert load_bundle(bundle, "cpu").name == "talk2dino"
    weights = bundle / "recipe" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(InferenceError, match="damaged: recipe/model.safetensors"):
        load_bundle(bundle, "cpu")


def test_the_reports_registry_table_shows_the_versions_and_aliases(registered: Registered) -> None:
    """Issue #17: the report's registry state, read from the real store the models were
    registered in (a second talk2dino version made candidate, the first champion)."""
    import re

    import mlflow
    from mlflow import MlflowClient

    from dinoalign.report import _section_registry
    from dinoalign.tracking import CHAMPION, register_model

    client = MlflowClient(registered.tracking_uri)
    first = client.get_model_version_by_alias("dinoalign-talk2dino", "candidate")
    client.set_registered_model_alias("dinoalign-talk2dino", CHAMPION, first.version)
    mlflow.set_tracking_uri(registered.tracking_uri)
    try:
        second = register_model("talk2dino", "dinoalign", first.source)  # the same logged model, a new version
    finally:
        mlflow.set_tracking_uri(None)
    section = _section_registry(registered.tracking_uri, "dinoalign", ["talk2dino", "projector"])
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>", section)
    assert rows == [("dinoalign-talk2dino", second, "@candidate"),
                    ("dinoalign-talk2dino", str(first.version), "@champion"),
                    ("dinoalign-projector", registered.versions["projector"], "@candidate")]
