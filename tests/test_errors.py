"""Tests of the error hierarchy (SPEC §6): classes, attributes, pickling, messages."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import sys
from typing import Any, Dict, Tuple, Type

import pytest

import fstx
from treeutil import FailAt, assert_clean, installed, make_tree, snapshot

HIERARCHY = [
    pytest.param(fstx.PlanError, (fstx.FstxError, ValueError), id="PlanError"),
    pytest.param(fstx.CommitError, (fstx.FstxError,), id="CommitError"),
    pytest.param(fstx.InUseError, (fstx.FstxError, OSError), id="InUseError"),
    pytest.param(fstx.RollbackError, (fstx.FstxError,), id="RollbackError"),
    pytest.param(fstx.LockTimeout, (fstx.FstxError, TimeoutError), id="LockTimeout"),
    pytest.param(fstx.JournalError, (fstx.FstxError,), id="JournalError"),
]


@pytest.mark.parametrize(("cls", "bases"), HIERARCHY)
def test_hierarchy(cls: Type[BaseException], bases: Tuple[type, ...]) -> None:
    assert issubclass(fstx.FstxError, Exception)
    for base in bases:
        assert issubclass(cls, base)
    assert cls.__module__.startswith("fstx")


ODD_PATH = "/srv/venv/caf" + os.fsdecode(b"\xe9") + '/it\'s "here"'

ERRORS = [
    pytest.param(
        fstx.PlanError("copy", ODD_PATH, "the source does not exist"),
        {"operation": "copy", "path": ODD_PATH, "reason": "the source does not exist"},
        ("copy",),
        id="PlanError",
    ),
    pytest.param(
        fstx.CommitError(
            "write", ODD_PATH, f"commit failed during write {ODD_PATH!r}: disk full"
        ),
        {"operation": "write", "path": ODD_PATH},
        ("write",),
        id="CommitError",
    ),
    pytest.param(
        fstx.InUseError(ODD_PATH, "delete", [(4242, "python.exe"), (7, "av scanner")]),
        {
            "path": ODD_PATH,
            "filename": ODD_PATH,
            "operation": "delete",
            "holders": ((4242, "python.exe"), (7, "av scanner")),
            "errno": errno.EBUSY,
        },
        ("delete", "python.exe (pid 4242)", "av scanner (pid 7)"),
        id="InUseError-holders",
    ),
    pytest.param(
        fstx.InUseError(ODD_PATH, "replace", err=errno.ETXTBSY),
        {
            "path": ODD_PATH,
            "operation": "replace",
            "holders": (),
            "errno": errno.ETXTBSY,
        },
        ("replace", "could not be determined"),
        id="InUseError-unknown-holders",
    ),
    pytest.param(
        fstx.RollbackError(ODD_PATH, "undo delete", "pkg/mod.py"),
        {"root": ODD_PATH, "operation": "undo delete", "path": "pkg/mod.py"},
        ("undo delete", "'pkg/mod.py'", "fstx recover"),
        id="RollbackError",
    ),
    pytest.param(
        fstx.LockTimeout(ODD_PATH, 0.2),
        {"root": ODD_PATH, "timeout": 0.2},
        ("lock", "0.2 s"),
        id="LockTimeout",
    ),
    pytest.param(
        fstx.JournalError(
            ODD_PATH, ["record 2: checksum mismatch", "record 5: not JSON"]
        ),
        {
            "path": ODD_PATH,
            "problems": ("record 2: checksum mismatch", "record 5: not JSON"),
        },
        ("read journal", "record 2: checksum mismatch", "record 5: not JSON"),
        id="JournalError",
    ),
]


@pytest.mark.parametrize(("error", "attributes", "words"), ERRORS)
def test_attributes_and_message(
    error: fstx.FstxError, attributes: Dict[str, Any], words: Tuple[str, ...]
) -> None:
    for name, value in attributes.items():
        assert getattr(error, name) == value, name
    message = str(error)
    path = attributes.get("root", attributes.get("path"))
    assert repr(path) in message  # paths quoted with !r: odd names stay readable
    for word in words:
        assert word in message
    assert "\n" not in message


@pytest.mark.parametrize(("error", "attributes", "words"), ERRORS)
def test_pickle_round_trip(
    error: fstx.FstxError, attributes: Dict[str, Any], words: Tuple[str, ...]
) -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.args == error.args
        for name, value in attributes.items():
            assert getattr(copy, name) == value, (protocol, name)


# -- errors raised by the engine name what a user can act on --------------------------


pytestmark_posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX semantics")


@pytestmark_posix
def test_real_plan_error(root: pathlib.Path) -> None:
    tx = fstx.transaction(root, durability="none")
    with pytest.raises(fstx.PlanError) as info:
        tx.delete("no/such file")
    assert str(info.value) == "cannot delete 'no/such file': it does not exist"
    assert pickle.loads(pickle.dumps(info.value)).operation == "delete"
    tx.rollback()
    assert_clean(root)


@pytestmark_posix
def test_real_commit_and_rollback_errors(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A", "pkg/x": b"x"})
    before = snapshot(root)
    tx = fstx.transaction(root, durability="none")
    tx.write_bytes("a", b"B")
    tx.delete("pkg")
    tx.write_bytes("new", b"N")
    # Fail at the fourth change of the commit and at every one after: the
    # commit fails, and so does its rollback.
    with installed(FailAt(4, errno.EIO, persistent=True)):
        with pytest.raises(fstx.RollbackError) as info:
            tx.commit()
    err = info.value
    assert err.root == str(root)
    assert f"fstx recover {root}" in str(err)
    assert repr(err.path) in str(err)
    assert isinstance(err.__cause__, OSError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err)
    assert fstx.status(root).pending
    report = fstx.recover(root)
    assert report.rolled_back
    assert snapshot(root) == before
    assert_clean(root)


@pytestmark_posix
def test_real_journal_error(root: pathlib.Path) -> None:
    fstx.transaction(root, durability="none").rollback()
    journal = root / ".fstx" / "0123456789abcdef.journal"
    journal.write_bytes(b"00000000 {}\n00000000 {}\n")
    with pytest.raises(fstx.JournalError) as info:
        fstx.recover(root)
    assert repr(str(root / ".fstx")) in str(info.value)
    assert info.value.problems == (
        "0123456789abcdef.journal: record 1: checksum mismatch",
    )
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.problems == info.value.problems
    journal.unlink()


@pytestmark_posix
def test_plan_error_names_a_pathlib_path_as_a_plain_path(root: pathlib.Path) -> None:
    tx = fstx.transaction(root, durability="none")
    try:
        with pytest.raises(fstx.PlanError) as info:
            tx.delete(pathlib.Path("no/such"))
    finally:
        tx.rollback()
    assert str(info.value) == "cannot delete 'no/such': it does not exist"
