"""storage.atomic_path / write_atomic: the one way dinoalign writes a file whole."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dinoalign import storage


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "summary.json"
    storage.write_atomic(target, "first\n")
    storage.write_atomic(target, b"second\n", fsync=True)
    assert target.read_bytes() == b"second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "uids.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.atomic_path(target) as tmp:
            tmp.write_text("half a fil")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["uids.parquet"]


def test_temporary_names_are_hidden_and_unique_per_writer(tmp_path: Path) -> None:
    target = tmp_path / "world.json"
    with storage.atomic_path(target) as a, storage.atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        assert re.fullmatch(rf"\.world\.json\.{os.getpid()}-[0-9a-f]{{8}}\.tmp", a.name)
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the outer block ends last: its rename wins


def test_no_other_module_writes_a_temporary_and_renames() -> None:
    """ARCHITECTURE's 'outputs appear whole' invariant has one implementation."""
    src = Path(storage.__file__).parent
    offenders = [
        f"{path.relative_to(src)}:{n}"
        for path in sorted(src.rglob("*.py"))
        if path.name != "storage.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"os\.replace\(|os\.rename\(|mkstemp\(|\.tmp\b", line.split("#")[0])
    ]
    assert offenders == [], "write through storage.write_atomic / atomic_path: " + ", ".join(offenders)


def test_a_failed_write_names_the_file_it_was_writing_not_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "features" / "part-0.parquet"
    with pytest.raises(OSError) as caught:
        with storage.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a sha")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(target) and not target.exists()
    assert list(target.parent.iterdir()) == []


def test_disk_full_finds_the_os_error_behind_a_wrapped_one() -> None:
    full = OSError(errno.EDQUOT, "Disk quota exceeded", "/data/x")
    try:
        raise RuntimeError("shard failed") from full
    except RuntimeError as wrapped:
        assert storage.disk_full(wrapped) is full
    ray_style = RuntimeError("task failed")
    ray_style.cause = OSError(errno.EFBIG, "File too large")  # ray.exceptions.RayTaskError.cause
    assert storage.disk_full(ray_style) is ray_style.cause
    assert storage.disk_full(OSError(errno.ENOSPC, "No space left on device")) is not None
    assert storage.disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert storage.disk_full(ValueError("no")) is None


def test_disk_full_finds_sqlites_full_database_behind_sqlalchemy(tmp_path: Path) -> None:
    """MLflow's sqlite store on a full disk: SQLITE_FULL raised by SQLite itself (here: a
    database capped by max_page_count), wrapped by SQLAlchemy, then by a plain error with
    only the context kept, as MLflow's store does."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'mlflow.db'}")
    sqlalchemy.event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA max_page_count = 2"))
    with pytest.raises(sqlalchemy.exc.OperationalError) as full:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE runs (x BLOB)"))
            for _ in range(50):
                conn.execute(sqlalchemy.text("INSERT INTO runs VALUES (zeroblob(4000))"))
    try:
        try:
            raise full.value
        except sqlalchemy.exc.OperationalError:
            raise RuntimeError("API request to the tracking store failed")  # context only, no cause
    except RuntimeError as wrapped:
        assert storage.disk_full(wrapped) is full.value
    assert storage.disk_full(RuntimeError("database is locked")) is None


def test_the_temporary_of_a_killed_writer_is_removed_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "plots" / "level_1.csv"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from dinoalign.storage import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('rank,cluster')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(target)])
    assert killed.returncode == -signal.SIGKILL
    [left] = target.parent.iterdir()
    assert left.name.startswith(".level_1.csv.")
    kept = [tmp_path / "uids.parquet", tmp_path / ".keep", tmp_path / "notes.tmp", tmp_path / "plots" / ".a.b.tmp"]
    for path in kept:
        path.write_text("mine")
    assert storage.remove_temporaries(tmp_path) == [left]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
    assert storage.remove_temporaries(tmp_path / "missing") == []
