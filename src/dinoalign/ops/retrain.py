"""``dinoalign retrain --new URI``: scheduled retraining with champion/candidate promotion.

One run, under an exclusive lock (``paths.retrain_lock``; a second run exits at once with
code 75 and changes nothing):

1. New data: the pairs at ``URI`` (a csv/tsv/parquet table or webdataset shards, local or
   ``s3://``). A location whose fingerprint was already ingested, or whose pairs are all
   known and unchanged, is "no new data": exit 0 having written nothing. Otherwise the new
   pairs are appended to ``paths.incoming`` (train split only), a known pair whose captions
   or image bytes changed replaces its row (``updated``: embed re-embeds exactly those,
   features being keyed by content), and the batch is recorded as *pending* in the ledger
   (``<paths.decisions>/batches.json``).
2. ``dvc add`` of the folder, then ``dvc repro`` (``retrain.targets``) with
   ``DINOALIGN_PIPELINE_RUN_ID`` = the batch id:
   prepare adds the pairs, embed embeds only the new uids, curate, align (a new
   ``@candidate`` per recipe), evaluate.
3. Per recipe, :func:`dinoalign.ops.promotion.decide`: the candidate and the champion
   evaluated on the fixed evaluation set, the tolerance rule.
4. ``dvc push`` (retried), so every output the decision rests on is on the remote.
5. Only then the decisions are applied (``@champion`` moves), recorded as MLflow tags on
   a ``retrain`` run and on the model versions, in ``<paths.decisions>/decision.json`` +
   ``history.jsonl``, and the batch is marked *decided*.

A failure anywhere before 5 leaves every alias untouched, records the failure (MLflow run
FAILED, ``decision.json`` with ``status: failed``) and keeps the batch pending: the next
run (with the same or any ``--new``) resumes it instead of appending again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow import MlflowClient

from dinoalign.config import Params
from dinoalign.data import incoming
from dinoalign.data.prepare import read_pairs, split_digest
from dinoalign.errors import ConfigError, DataError, RetrainError
from dinoalign.ops import dvc as ops_dvc
from dinoalign.ops import promotion
from dinoalign.storage import under_root, write_atomic
from dinoalign.tracking import log_dataset, run_url, stage_run, tracking_uri

EXIT_LOCKED = 75  # EX_TEMPFAIL: cron may simply try again later
DECISION_FILE, HISTORY_FILE, LEDGER_FILE = "decision.json", "history.jsonl", "batches.json"
# What the retrain run logs as its params (it is no DVC stage; the pipeline's stages log theirs)
PARAMS_READ = ("retrain", "evaluate", "paths.incoming", "paths.decisions", "paths.retrain_lock", "paths.pairs",
               "data.allowed_roots")


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on ``path`` (its content: the holder's pid) or raise at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RetrainError(f"another retrain (pid {holder}) holds {path}; this run changed nothing",
                               EXIT_LOCKED) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def retrain(params: Params, root: Path, new_uri: str) -> dict[str, Any]:
    """One scheduled retraining of the checkout at ``root`` (see the module docstring)."""
    if not params.paths.incoming:
        raise ConfigError("paths.incoming is null: retraining appends new pairs there; set it (e.g. incoming/pairs)")
    root = Path(root).resolve()
    with exclusive_lock(Path(under_root(params.paths.retrain_lock, root))):
        folder = Path(under_root(params.paths.incoming, root))
        ledger = Path(under_root(params.paths.decisions, root)) / LEDGER_FILE
        batch = _pending_batch(ledger) or _ingest(params, root, folder, ledger, new_uri)
        if batch is None:
            return {"status": "no_new_data", "new": new_uri}
        return _run_batch(params, root, folder, ledger, batch)


# ----------------------------------------------------------------------------- ledger
def load_ledger(path: Path) -> list[dict[str, Any]]:
    """The batches appended so far (``<paths.decisions>/batches.json``)."""
    return json.loads(path.read_text()) if path.exists() else []


def _save_ledger(path: Path, ledger: list[dict[str, Any]]) -> None:
    write_atomic(path, json.dumps(ledger, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- ingest
def _pending_batch(ledger_path: Path) -> dict[str, Any] | None:
    pending = [b for b in load_ledger(ledger_path) if b["status"] == "pending"]
    if pending:
        _say(f"retrain: resuming batch {pending[-1]['id']} (appended from {pending[-1]['source']}, not yet decided)")
    return pending[-1] if pending else None


def _ingest(params: Params, root: Path, folder: Path, ledger_path: Path, new_uri: str) -> dict[str, Any] | None:
    cfg = params.retrain
    try:
        fp = incoming.fingerprint(new_uri)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    ledger = load_ledger(ledger_path)
    if any(b["fingerprint"] == fp for b in ledger):
        _say(f"retrain: no new data: {new_uri} is unchanged since batch "
              f"{next(b['id'] for b in ledger if b['fingerprint'] == fp)}")
        return None
    batch_id = f"retrain-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{fp[:8]}"
    with tempfile.TemporaryDirectory(prefix="dinoalign-retrain-") as tmp:
        # new data is untrusted: its images stay under data.allowed_roots, default the table's folder
        items = incoming.new_data_items(new_uri, Path(tmp), cfg.image_column, cfg.caption_column, cfg.key_column,
                                        allowed_roots=params.data.allowed_roots)
        try:
            counts = incoming.append_batch(folder, items, batch_id)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"cannot read new data at {new_uri}: {e}") from None
    if counts["appended"] == 0 and counts["updated"] == 0:
        _say(f"retrain: no new data: {counts['records']} pairs at {new_uri}, {counts['already_present']} already "
              f"appended unchanged, {counts['rejected']} rejected")
        return None
    batch = {"id": batch_id, "source": new_uri, "fingerprint": fp, "status": "pending",
             "appended_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **counts}
    _save_ledger(ledger_path, [*ledger, batch])  # before anything can fail: a re-run resumes the batch
    _say(f"retrain: appended {counts['appended']} new pairs from {new_uri} to {folder}, updated "
          f"{counts['updated']} whose captions or image changed ({counts['already_present']} already there "
          f"unchanged, {counts['rejected']} rejected); batch {batch_id}")
    return batch


# ----------------------------------------------------------------------------- run
def _run_batch(params: Params, root: Path, folder: Path, ledger_path: Path, batch: dict[str, Any]) -> dict[str, Any]:
    cfg = params.retrain
    env = {"DINOALIGN_PIPELINE_RUN_ID": batch["id"]}
    record: dict[str, Any] = {"batch": batch["id"], "source": batch["source"], "appended": batch["appended"],
                              "updated": batch.get("updated", 0), "started_at": _now(), "tolerance": cfg.tolerance}
    previous = os.environ.get("DINOALIGN_PIPELINE_RUN_ID")
    os.environ["DINOALIGN_PIPELINE_RUN_ID"] = batch["id"]  # the retrain run is tagged like the stages
    try:
        with stage_run("retrain", params, run_name=f"retrain {batch['id']}", param_keys=PARAMS_READ) as run:
            record["mlflow_run"] = run_url(run)
            log_dataset("new pairs", batch["source"], batch["fingerprint"], "new data",
                        rows=batch["appended"] + batch.get("updated", 0))
            try:
                started = time.perf_counter()
                ops_dvc.dvc(root, "add", "-q", str(folder.relative_to(root)))  # version the appended pairs
                _say(f"retrain: dvc repro {' '.join(cfg.targets)}".rstrip())
                ops_dvc.dvc(root, "repro", *cfg.targets, env=env)
                record["repro_seconds"] = round(time.perf_counter() - started, 1)
                eval_set = split_digest(read_pairs(under_root(params.paths.pairs, root)), params.evaluate.split)
                client = MlflowClient(tracking_uri(params))
                evaluate = promotion.evaluate_with_stage_code(params, root)
                decisions = [promotion.decide(client, r, params, batch["id"], eval_set, evaluate)
                             for r in cfg.recipes]
                if cfg.push:
                    ops_dvc.push(root, attempts=cfg.push_attempts, env=env)
                for d in decisions:
                    promotion.apply(client, d, run.info.run_id)
            except Exception as e:  # recorded, then raised as a RetrainError with the cause chained
                mlflow.set_tags({"dinoalign.retrain.status": "failed", "dinoalign.retrain.batch": batch["id"]})
                _record(root, params.paths.decisions, {**record, "status": "failed", "error": str(e), "finished_at": _now()})
                raise RetrainError(f"retraining batch {batch['id']} failed; every @champion is untouched and the "
                                   f"batch stays pending (the next run resumes it): {e}") from e
            record.update(status="done", eval_set=eval_set, finished_at=_now(),
                          decisions=[dataclasses.asdict(d) for d in decisions])
            mlflow.set_tags({"dinoalign.retrain.status": "done", "dinoalign.retrain.batch": batch["id"],
                             **{f"dinoalign.retrain.{d.recipe}": d.action for d in decisions}})
            mlflow.log_dict(record, "decision.json")
    finally:
        if previous is None:
            os.environ.pop("DINOALIGN_PIPELINE_RUN_ID", None)
        else:
            os.environ["DINOALIGN_PIPELINE_RUN_ID"] = previous
    _record(root, params.paths.decisions, record)
    ledger = load_ledger(ledger_path)
    for b in ledger:
        if b["id"] == batch["id"]:
            b.update(status="decided", decided_at=record["finished_at"])
    _save_ledger(ledger_path, ledger)
    for d in decisions:
        _say(f"retrain: {d.model}: {d.action} version {d.candidate_version} ({d.reason})")
    return record


def _record(root: Path, decisions_dir: str, record: dict[str, Any]) -> None:
    """``decision.json`` (this run) and one line of ``history.jsonl`` in the repo."""
    out = Path(under_root(decisions_dir, root))
    write_atomic(out / DECISION_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    with (out / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _say(message: str) -> None:
    """Progress goes to stderr: stdout carries the run's JSON record (``dinoalign retrain``)."""
    print(message, file=sys.stderr, flush=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
