"""Look at the MLflow UI the way a person would: runs of an experiment, registered models
and their aliases, rendered by headless Chromium (shared by the UI and integration tests)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

TIMEOUT_MS = 90_000  # the UI's JS bundle is large and the machine is shared


def check_mlflow_ui(browser: Any, url: str, experiment_id: str, run_names: Iterable[str],
                    model_aliases: dict[str, str], shots: Path) -> None:
    """Assert that the runs page of ``experiment_id`` lists every run in ``run_names``,
    the models page lists every model of ``model_aliases``, and each model's page shows
    its alias. Screenshots go to ``shots`` (kept by pytest's tmp dirs for a look)."""
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        _look(page, url, experiment_id, run_names, model_aliases, shots)
    except Exception:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        raise
    finally:
        page.close()
    assert not errors, f"the MLflow UI raised JavaScript errors: {errors}"


def _look(page: Any, url: str, experiment_id: str, run_names: Iterable[str], model_aliases: dict[str, str],
          shots: Path) -> None:
    page.goto(f"{url}/#/experiments/{experiment_id}/runs")
    for name in run_names:
        page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=TIMEOUT_MS)
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
