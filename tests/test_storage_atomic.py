"""storage.atomic_path / write_atomic: the one way dinoalign writes a file whole."""

from __future__ import annotations

import os
import re
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
