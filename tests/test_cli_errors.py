"""One user error, one exit (issue #14 part 5, REVIEW §2.8 and §4.3 example 5).

Every problem a user can fix raises a :class:`dinoalign.errors.UserError`, and
``dinoalign.cli.main`` is the only handler: whichever command meets it (a stage, ``params``,
an inference command, ``import-talk2dino``, ``retrain``, ``infra``), the user sees
``dinoalign <command>: <message>`` on one line of stderr and exit code 2. Anything else is
a bug and keeps its traceback. The commands below are real (in-process ``main``, and one
real ``python -m dinoalign.cli`` process each way); nothing but the bug is faked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dinoalign.cli import main
from dinoalign.errors import (
    ConfigError,
    DataError,
    DataFileMissing,
    DatasetError,
    DatasetFileMissing,
    DvcError,
    InferenceError,
    PreprocessingMismatch,
    RetrainError,
    SetupError,
    StackError,
    UserError,
)
from hostile import HOSTILE_TABLES, write_hostile_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """The repository's params.yaml in an empty checkout: no stage has run there."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def _one_line(argv: list[str], capsys) -> tuple[int, str]:
    """Run ``dinoalign argv``; its exit code and its single stderr line (asserted single)."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "mlflow" not in line.split(":")[0]]
    user_lines = [line for line in lines if line.startswith("dinoalign ")]
    assert "Traceback" not in err, err
    assert len(user_lines) == 1, err
    return code, user_lines[0]


# ----------------------------------------------------------------------------- the hierarchy


def test_every_user_error_is_a_user_error_and_keeps_its_old_base() -> None:
    """Code and tests that catch these as ValueError / RuntimeError / FileNotFoundError
    keep working; the ops errors are importable from their old modules too."""
    from dinoalign.ops.dvc import DvcError as OldDvcError
    from dinoalign.ops.retrain import RetrainError as OldRetrainError
    from dinoalign.ops.stack import StackError as OldStackError

    assert (OldDvcError, OldRetrainError, OldStackError) == (DvcError, RetrainError, StackError)
    bases = {
        ConfigError: ValueError, DataError: ValueError, InferenceError: ValueError,
        PreprocessingMismatch: ValueError, DatasetError: ValueError,
        DataFileMissing: FileNotFoundError, DatasetFileMissing: FileNotFoundError,
        SetupError: RuntimeError, StackError: RuntimeError, DvcError: RuntimeError,
        RetrainError: RuntimeError,
    }
    for cls, base in bases.items():
        assert issubclass(cls, UserError) and issubclass(cls, base), cls
        assert cls("x").exit_code == (1 if cls is RetrainError else 2), cls
    assert RetrainError("locked", 75).exit_code == 75


def test_errors_module_stays_import_light() -> None:
    code = "import sys, dinoalign.errors; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the same mistake


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed"], "artifacts/pairs/summary.json is missing: run the prepare stage first"),
        (["align", "align.recipe=talk2dino"],
         "artifacts/features/manifest.json is missing: run the embed stage first"),
    ],
)
def test_a_stage_missing_its_input_is_one_line_and_exit_2(
    params: Path, argv: list[str], message: str, capsys
) -> None:
    """Was a FileNotFoundError traceback (a bare ``open`` of summary.json in
    data/prepare.py) for embed, curate and align."""
    code, line = _one_line([argv[0], "-p", str(params), *argv[1:]], capsys)
    assert code == 2 and line.startswith(f"dinoalign {argv[0]}: ") and message in line


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the prepare cases below (each stage run opens a run first)."""
    return f"tracking.uri=sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.parametrize("case", [*HOSTILE_TABLES, "webdataset glob matching nothing", "coco file not coco"])
def test_prepare_on_a_hostile_input_file_is_one_line_and_exit_2(
    params: Path, tracking_db: str, case: str, capsys
) -> None:
    """Issue #19: an empty CSV, invalid UTF-8, Latin-1 with ';', a .parquet that is not
    Parquet (and the like) were tracebacks; now exit 2 and one line naming the file and
    the setting to change. The previous prepare output is left as it was."""
    root = params.parent
    previous = root / "artifacts" / "pairs" / "summary.json"
    previous.parent.mkdir(parents=True)
    previous.write_text("{}")
    if case == "webdataset glob matching nothing":
        source, message = ["data.source=webdataset", f"data.webdataset.urls=[{root}/shards/*.tar]"], "no shard matches"
    elif case == "coco file not coco":
        (root / "captions.json").write_text("[1, 2, 3]")
        source = ["data.source=coco", f"data.coco.captions_json={root / 'captions.json'}", f"data.coco.image_dir={root}"]
        message = "is not a COCO annotation file"
    else:
        table, message = write_hostile_table(root / "data", case)
        source = ["data.source=pairs", f"data.pairs.path={table}"]
    code, line = _one_line(["prepare", "-p", str(params), *source, "paths.incoming=null", tracking_db], capsys)
    assert code == 2 and line.startswith("dinoalign prepare: ") and message in line, line
    assert previous.read_text() == "{}"


def test_align_without_a_recipe_is_one_line(params: Path, capsys) -> None:
    """``AlignConfig.training`` raised a plain ValueError (a traceback); now a ConfigError."""
    (params.parent / "artifacts" / "features").mkdir(parents=True)
    code, line = _one_line(["align", "-p", str(params)], capsys)
    assert code == 2 and line.startswith("dinoalign align: align.recipe is not set")


def test_evaluate_with_a_missing_model_is_one_line(params: Path, capsys) -> None:
    """The model check of the evaluate stage: no traceback, as in the inference commands."""
    code, line = _one_line(
        ["evaluate", "-p", str(params), "evaluate.recipes=[talk2dino]",
         f"tracking.uri=sqlite:///{params.parent}/mlflow.db"],
        capsys,
    )
    assert code == 2 and line.startswith("dinoalign evaluate: no trained model at")


@pytest.mark.parametrize("command", ["classify", "index"])
def test_an_inference_command_with_a_missing_model_is_one_line(
    params: Path, command: str, capsys
) -> None:
    missing = params.parent / "no-model"
    extra = (["--image", "x.png", "--classes", "a,b"] if command == "classify"
             else ["--out", str(params.parent / "index")])
    code, line = _one_line(
        [command, "--model", str(missing), *extra, "-p", str(params)], capsys
    )
    assert code == 2 and line.startswith(f"dinoalign {command}: no trained model at '{missing}'")


def test_params_with_a_bad_key_is_one_line(params: Path, capsys) -> None:
    code, line = _one_line(["params", "-p", str(params), "bogus.key=1"], capsys)
    assert code == 2 and line.startswith("dinoalign params: ") and "unknown key 'bogus'" in line


def test_import_talk2dino_with_a_bad_file_is_one_line(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not a checkpoint")
    code, line = _one_line(
        ["import-talk2dino", "--weights", str(weights), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 2
    assert line.startswith(f"dinoalign import-talk2dino: {weights}: neither a PyTorch checkpoint")


def test_import_talk2dino_into_an_unwritable_place_is_one_line(tmp_path: Path, capsys) -> None:
    """The OSError of writing the folder, once caught in the handler, is an InferenceError
    raised where the folder is written, with the OS's message."""
    import torch

    weights = tmp_path / "w.pth"  # a linear Talk2DINO projection, text width 6 -> vision 4
    torch.save({"linear_layer.weight": torch.randn(4, 6), "linear_layer.bias": torch.randn(4)}, weights)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, line = _one_line(
        ["import-talk2dino", "--weights", str(weights), "--out", str(blocker / "out")], capsys
    )
    assert code == 2 and line.startswith("dinoalign import-talk2dino: ") and str(blocker) in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["retrain", "--new", "{tmp}/none.csv", "embed.batch_size=3"],
         "dinoalign retrain: 'embed.batch_size=3': only retrain.* may be overridden here"),
        (["retrain", "--new", "{tmp}/none.csv"], "dinoalign retrain: no new data at {tmp}/none.csv"),
        (["infra", "--root", "{tmp}", "dvc-remote", "r", "http://x"],
         "dinoalign infra: DVC remote url 'http://x': expected s3://bucket/prefix"),
        (["infra", "--root", "{tmp}", "dvc-remote", "r", "s3://b/p"],
         "dinoalign infra: {tmp} is not a DVC repository (no .dvc/): run `dvc init` there first"),
    ],
)
def test_ops_commands_share_the_handler(params: Path, argv: list[str], message: str, capsys) -> None:
    """retrain's bad --new was exit 1 (a RetrainError); it is a bad argument: exit 2, as
    docs/operations.md says of bad arguments."""
    tmp = str(params.parent)
    argv = [a.replace("{tmp}", tmp) for a in argv]
    if argv[0] == "retrain":
        argv += ["-p", str(params)]
    code, line = _one_line(argv, capsys)
    assert code == 2 and line.startswith(message.replace("{tmp}", tmp))


def test_retrain_help_shows_keys_retrain_accepts(params: Path, capsys) -> None:
    """``retrain --help`` once showed ``embed.batch_size=64`` as its example, a key it
    refuses: every KEY=VALUE its help names passes its check (the run then stops at the
    missing --new data, not at the key)."""
    import re

    with pytest.raises(SystemExit):
        main(["retrain", "--help"])
    examples = re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+=\S+?)(?=[\s,)]|$)", " ".join(capsys.readouterr().out.split()))
    assert examples and all(e.startswith("retrain.") for e in examples), examples
    tmp = str(params.parent)
    code, line = _one_line(["retrain", "--new", f"{tmp}/none.csv", "-p", str(params), *examples], capsys)
    assert code == 2 and line.startswith(f"dinoalign retrain: no new data at {tmp}/none.csv"), line


def test_retrain_keeps_its_documented_lock_exit_code(params: Path, capsys) -> None:
    """The one UserError that is not exit 2: cron must tell "another run holds the lock,
    try later" (75, EX_TEMPFAIL) from a failure (1) and a bad argument (2)."""
    from dinoalign.config import load_params
    from dinoalign.ops.retrain import exclusive_lock

    lock = params.parent / load_params(params).paths.retrain_lock
    with exclusive_lock(lock):
        code, line = _one_line(["retrain", "--new", "x.csv", "-p", str(params)], capsys)
    assert code == 75 and line.startswith("dinoalign retrain: another retrain (pid ")


def test_a_stack_that_cannot_start_is_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    """``infra up`` returned 1 for a StackError; it is a user error like the others now.
    (The stack itself is not started here: tests/ops/test_ops_stack.py does that.)"""
    import dinoalign.ops.stack as stack

    def already_up(root, opts):
        raise StackError("the stack is already up (seaweedfs pid 1): see `dinoalign infra status`, "
                         "or run `dinoalign infra down` first")

    monkeypatch.setattr(stack, "up", already_up)
    code, line = _one_line(["infra", "--root", str(tmp_path), "up"], capsys)
    assert code == 2 and line.startswith("dinoalign infra: the stack is already up")


def test_a_multi_line_message_is_printed_on_one_line(params: Path, monkeypatch, capsys) -> None:
    import dinoalign.cli as cli

    def run_stage(name, params, root):
        raise DataError("first line\n   second   line")

    monkeypatch.setattr(cli, "run_stage", run_stage)
    code, line = _one_line(["embed", "-p", str(params)], capsys)
    assert (code, line) == (2, "dinoalign embed: first line second line")


def test_a_full_disk_is_one_line_wherever_it_is_raised(params: Path, monkeypatch, capsys) -> None:
    """No space, over quota, past the file-size limit: the user frees space, it is no bug
    (tests/test_full_disk.py fills a disk under real stages)."""
    import errno

    import dinoalign.cli as cli

    def run_stage(name, params, root):
        full = OSError(errno.ENOSPC, "No space left on device", "/data/features/images/part-1.parquet")
        raise RuntimeError("embed: a shard failed") from full  # as an engine wraps it

    monkeypatch.setattr(cli, "run_stage", run_stage)
    code, line = _one_line(["embed", "-p", str(params)], capsys)
    assert (code, line) == (2, "dinoalign embed: disk full writing /data/features/images/part-1.parquet: No space "
                               "left on device (ENOSPC); free space there and run the command again")

    def log_to_a_full_store(name, params, root):  # what MLflow's sqlite store raises on a full disk
        try:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full")
        except RuntimeError:
            raise RuntimeError("API request to endpoint /api/2.0/mlflow/runs/log-batch failed")

    monkeypatch.setattr(cli, "run_stage", log_to_a_full_store)
    code, line = _one_line(["embed", "-p", str(params)], capsys)
    assert (code, line) == (2, "dinoalign embed: disk full in the MLflow store (tracking.uri): SQLite: database or "
                               "disk is full; free space there and run the command again")


# ----------------------------------------------------------------------------- bugs


def test_a_bug_is_not_a_user_error_and_keeps_its_traceback(params: Path, monkeypatch) -> None:
    import dinoalign.cli as cli

    def run_stage(name, params, root):
        return {}["no such key"]  # a bug

    monkeypatch.setattr(cli, "run_stage", run_stage)
    with pytest.raises(KeyError, match="no such key"):
        main(["embed", "-p", str(params)])

    def denied(name, params, root):  # an OSError that is not a full disk stays a traceback
        raise PermissionError(13, "Permission denied", "/data/features")

    monkeypatch.setattr(cli, "run_stage", denied)
    with pytest.raises(PermissionError):
        main(["embed", "-p", str(params)])


def test_real_processes_one_line_for_a_user_error_a_traceback_for_a_bug(params: Path) -> None:
    run = [sys.executable, "-m", "dinoalign.cli", "embed", "-p", str(params)]
    done = subprocess.run(run, capture_output=True, text=True, cwd=params.parent)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"dinoalign embed: {params.parent}/artifacts/pairs/summary.json is missing: "
        "run the prepare stage first (dvc repro prepare)"
    ]
    bug = (
        "import sys; import dinoalign.cli as cli; "
        "cli.run_stage = lambda *a: [][1]; "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    done = subprocess.run([sys.executable, "-c", bug, "embed", "-p", str(params)],
                          capture_output=True, text=True, cwd=params.parent)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().endswith("IndexError: list index out of range")
