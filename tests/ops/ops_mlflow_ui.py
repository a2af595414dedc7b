"""Look at the MLflow UI the way a person would: runs of an experiment, registered models
and their aliases, rendered by headless Chromium (shared by the UI and integration tests)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any, Iterable

TIMEOUT_MS = 90_000  # the UI's JS bundle is large and the machine is shared


def check_mlflow_ui(browser: Any, url: str, experiment_id: str, run_names: Iterable[str],
                    model_aliases: dict[str, str], shots: Path, pipelines: int = 0,
                    datasets: dict[str, str] | None = None,
                    signatures: dict[tuple[str, str], list[str]] | None = None,
                    credentials: tuple[str, str] | None = None) -> None:
    """Assert that the runs page of ``experiment_id`` (model-training view) lists every run
    in ``run_names``, the models page lists every model of ``model_aliases``, and each
    model's page shows its alias. ``pipelines``: the number of pipeline parent runs the
    table lists with the runs of ``run_names`` nested under them (hidden until a parent is
    expanded); ``datasets``: run name -> a dataset its row shows in the Dataset column;
    ``signatures``: (model, version) -> input fields its version page shows in its schema.
    Screenshots go to ``shots`` (kept by pytest's tmp dirs for a look). ``credentials``:
    (user, password) of a basic-auth server, sent as an ``Authorization`` header with
    every request of the page (the URL holds none; Playwright's ``http_credentials``,
    which answers the 401 challenge instead, failed in Chromium with
    ERR_INVALID_AUTH_CREDENTIALS in the full suite)."""
    shots.mkdir(parents=True, exist_ok=True)
    auth = {}
    if credentials:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        auth = {"extra_http_headers": {"Authorization": f"Basic {token}"}}
    page = browser.new_page(viewport={"width": 1400, "height": 900}, **auth)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        _look(page, url, experiment_id, run_names, model_aliases, shots, pipelines, datasets or {},
              signatures or {})
    except Exception:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        raise
    finally:
        page.close()
    assert not errors, f"the MLflow UI raised JavaScript errors: {errors}"


def _look(page: Any, url: str, experiment_id: str, run_names: Iterable[str], model_aliases: dict[str, str],
          shots: Path, pipelines: int, datasets: dict[str, str],
          signatures: dict[tuple[str, str], list[str]]) -> None:
    page.goto(f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    if pipelines:
        parents = page.get_by_role("row").filter(has=page.get_by_role("link", name=re.compile(r"^pipeline ")))
        parents.nth(pipelines - 1).wait_for(timeout=TIMEOUT_MS)
        assert parents.count() == pipelines
        for name in run_names:  # nested: not in the table until their parent is expanded
            assert page.get_by_role("link", name=name, exact=True).count() == 0, name
        for i in range(pipelines):
            parents.nth(i).get_by_role("button").first.click()
    for name in run_names:
        page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=TIMEOUT_MS)
    for name, dataset in datasets.items():  # "pairs (<digest>)" in the Dataset column, once per run of that name
        # (the grid renders the pinned name column and the other columns as separate rows)
        shown = page.get_by_text(re.compile(rf"^{re.escape(dataset)} \([0-9a-f]+\)$"))
        shown.first.wait_for(timeout=TIMEOUT_MS)
        assert shown.count() == page.get_by_role("link", name=name, exact=True).count(), (name, shown.count())
    page.screenshot(path=str(shots / "runs.png"), full_page=True)
    page.goto(f"{url}/#/models")
    for model in model_aliases:
        page.get_by_role("link", name=model, exact=True).first.wait_for(timeout=TIMEOUT_MS)
    page.screenshot(path=str(shots / "models.png"), full_page=True)
    for model, alias in model_aliases.items():
        page.goto(f"{url}/#/models/{model}")
        page.reload()  # a hash change alone keeps the previous model's versions in the app's state
        page.get_by_text(re.compile(rf"@\s*{re.escape(alias)}$")).first.wait_for(timeout=TIMEOUT_MS)
        page.screenshot(path=str(shots / f"model-{model}.png"), full_page=True)
    for (model, version), fields in signatures.items():  # the version page's schema table
        page.goto(f"{url}/#/models/{model}/versions/{version}")
        page.reload()
        for side in ("Inputs (1)", "Outputs (1)"):  # a list of one request / response object each
            page.get_by_text(side, exact=True).first.click(timeout=TIMEOUT_MS)
        for field in fields:
            page.get_by_text(field).first.wait_for(timeout=TIMEOUT_MS)
        page.screenshot(path=str(shots / f"version-{model}-{version}.png"), full_page=True)
