"""Files in use (SPEC §2), proved on winfs with real holder processes.

winfs (``tests/winfs.py``) is a FUSE filesystem with Windows sharing rules:
while a process holds a file open, nobody may delete or replace it, nor
rename it unless it is a program image (``.exe``, ``.dll``, ``.pyd``); a
directory with a held file below it cannot be renamed; every refusal is
EBUSY. Holders are real child processes (``winfs.hold``), so the holder
names in ``InUseError`` come from ``/proc`` as they would in the field.

Budgets are short (``POLICY``) where waiting is not the point; the default
budgets are checked on a fake clock, so no test measures wall-clock time.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

import fstx
from fstx import _commit
from treeutil import assert_clean, installed, make_tree, snapshot, staging_leftovers
from winfs import WinFS, hold

pytest_plugins = ["conftest_winfs"]


pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("windows_protocol")]

POLICY = fstx.RetryPolicy(deadline=1.0, defer_after=0.3)
"""Short budgets: a file in use is given up on in about a second."""

DEFERRED_WARNING = "is in use; deferred its removal"

VENV: Dict[str, Optional[bytes]] = {
    "bin/tool.exe": b"tool 1.0",
    "bin/old.exe": b"old 1.0",
    "bin/activate": b"# activate",
    "lib/site-packages/pkg/__init__.py": b"version = '1.0'",
    "lib/site-packages/pkg/core.py": b"def core(): return 1",
    "lib/site-packages/pkg/_speedups.pyd": b"MZ pyd 1.0",
    "lib/site-packages/pkg/data/table.csv": b"a,b\n1,2\n",
    "lib/site-packages/pkg-1.0.dist-info/RECORD": b"pkg/__init__.py,,\n",
}

PKG = "lib/site-packages/pkg"


# --- helpers ----------------------------------------------------------------


class FakeTime:
    """A monotonic clock that only moves when the engine sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class SleepCounter:
    """A ``sleep`` for RetryPolicy that records each wait and really waits."""

    def __init__(self) -> None:
        self.calls: List[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        time.sleep(seconds)


def contents(root: Path) -> Dict[str, Optional[bytes]]:
    """Path -> bytes (files) or None (directories), staging excluded."""
    return {
        path: entry[2] if entry[0] == "file" else None
        for path, entry in snapshot(root, inodes=False).items()
    }


def expected(spec: Dict[str, Optional[bytes]]) -> Dict[str, Optional[bytes]]:
    """``spec`` with every parent directory listed, as :func:`contents` gives it."""
    out: Dict[str, Optional[bytes]] = {}
    for path, data in spec.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = None
        out[path] = data
    return out


def comm(pid: int) -> str:
    """The process name the kernel gives ``pid`` (what holders() reports)."""
    return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()


def trash_files(root: Path) -> List[Path]:
    """Every file inside the trash's entries (notes excluded)."""
    trash = root / ".fstx" / "trash"
    if not trash.is_dir():
        return []
    return sorted(p for p in trash.rglob("*") if p.is_file() and p.suffix != ".origin")


def deferral_warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fstx" and r.levelno == logging.WARNING
        and DEFERRED_WARNING in r.getMessage()
    ]  # fmt: skip


@pytest.fixture
def root(winfs: WinFS) -> Path:
    """A transaction root on the winfs mount."""
    path = winfs.mountpoint / "venv"
    path.mkdir()
    return path


@pytest.fixture
def fstx_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="fstx"):
        yield caplog


# --- classification ---------------------------------------------------------


def test_refusals_of_winfs_are_ebusy_and_transient(root: Path) -> None:
    make_tree(root, {"data.txt": b"data", "tool.exe": b"MZ"})
    with hold(root / "data.txt"), hold(root / "tool.exe"):
        refusals: List[Callable[[], None]] = [
            lambda: os.unlink(root / "data.txt"),
            lambda: os.rename(root / "data.txt", root / "moved.txt"),
            lambda: os.unlink(root / "tool.exe"),  # a running image: no delete
        ]
        for refused in refusals:
            with pytest.raises(OSError) as info:
                refused()
            assert info.value.errno == errno.EBUSY
            assert fstx.is_transient(info.value)
        # ...but a running image can be renamed away, which fstx relies on.
        os.rename(root / "tool.exe", root / "tool.exe.moved")
        os.rename(root / "tool.exe.moved", root / "tool.exe")


def _fail_renames_onto(
    name: str, err: int, times: int
) -> Tuple[fstx._os.Hook, List[int]]:
    """A hook failing the first ``times`` renames onto ``name`` with ``err``."""
    raised: List[int] = []

    def hook(call: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and call == "rename" and args[3] == name:
            if len(raised) < times:
                raised.append(err)
                raise OSError(err, f"{os.strerror(err)} (injected)")

    return hook, raised


@pytest.mark.parametrize(
    "err",
    [
        pytest.param(errno.EACCES, id="EACCES"),
        pytest.param(errno.EPERM, id="EPERM"),
        pytest.param(errno.ENOSPC, id="ENOSPC"),
        pytest.param(errno.EROFS, id="EROFS"),
        pytest.param(errno.ENAMETOOLONG, id="ENAMETOOLONG"),
    ],
)
def test_permanent_error_fails_at_once_and_rolls_back(root: Path, err: int) -> None:
    make_tree(root, VENV)
    before = snapshot(root)
    sleeps = SleepCounter()
    policy = fstx.RetryPolicy(deadline=60.0, defer_after=60.0, sleep=sleeps)
    hook, raised = _fail_renames_onto("tool.exe", err, times=1_000)
    tx = fstx.transaction(root, retry=policy)
    tx.write_bytes("lib/site-packages/pkg/core.py", b"def core(): return 2")
    tx.write_bytes("bin/tool.exe", b"tool 2.0")
    with installed(hook), pytest.raises(fstx.CommitError) as info:
        tx.commit()
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    assert not isinstance(cause, fstx.InUseError)
    assert cause.errno == err
    assert not fstx.is_transient(cause)
    assert raised == [err]  # tried once: never retried, never waited
    assert sleeps.calls == []
    assert snapshot(root) == before
    assert_clean(root)


@pytest.mark.parametrize(
    "err",
    [
        pytest.param(errno.EBUSY, id="EBUSY"),
        pytest.param(errno.ETXTBSY, id="ETXTBSY"),
        pytest.param(errno.EAGAIN, id="EAGAIN"),
        pytest.param(errno.EINTR, id="EINTR"),
    ],
)
def test_transient_error_is_retried(root: Path, err: int) -> None:
    make_tree(root, VENV)
    fake = FakeTime()
    policy = fstx.RetryPolicy(sleep=fake.sleep, clock=fake.clock)
    hook, raised = _fail_renames_onto("tool.exe", err, times=2)
    with installed(hook), fstx.transaction(root, retry=policy) as tx:
        tx.write_bytes("bin/tool.exe", b"tool 2.0")
    assert raised == [err, err]
    assert len(fake.sleeps) == 2
    assert (root / "bin/tool.exe").read_bytes() == b"tool 2.0"
    assert_clean(root)


# --- a file held for a moment -------------------------------------------------


def test_file_held_for_a_moment_is_replaced_after_retries(
    root: Path, fstx_log: pytest.LogCaptureFixture
) -> None:
    make_tree(root, VENV)
    target = root / "lib/site-packages/pkg/core.py"
    old_ino = target.stat().st_ino
    # Budgets far above the hold: the replace itself waits it out.
    policy = fstx.RetryPolicy(deadline=30.0, defer_after=30.0)
    tx = fstx.transaction(root, retry=policy)
    tx.write_bytes(target, b"def core(): return 2")
    holder = hold(target, seconds=0.3)  # a scanner having a look
    report = tx.commit()
    holder.release()
    assert report.retries >= 1
    assert report.deferred == ()
    assert target.read_bytes() == b"def core(): return 2"
    assert target.stat().st_ino != old_ino
    assert_clean(root)
    assert fstx.status(root).clean
    debug = [r for r in fstx_log.records if r.levelno == logging.DEBUG]
    assert any("trying again" in r.getMessage() for r in debug)
    assert deferral_warnings(fstx_log) == []


# --- the uv case: running executables -------------------------------------------


def test_running_executables_are_replaced_and_deleted_then_purged(
    root: Path, fstx_log: pytest.LogCaptureFixture
) -> None:
    # uv #1368: `uv pip sync` failed with "failed to remove file
    # ...\Scripts\uv.exe: Access is denied (os error 5)" while uv.exe ran.
    make_tree(root, VENV)
    tool, old = root / "bin/tool.exe", root / "bin/old.exe"
    old_inodes = {tool.stat().st_ino, old.stat().st_ino}
    with hold(tool) as tool_holder, hold(old) as old_holder:
        tx = fstx.transaction(root, retry=POLICY)
        tx.write_bytes("bin/tool.exe", b"tool 2.0")
        tx.delete("bin/old.exe")
        tx.write_bytes(f"{PKG}/__init__.py", b"version = '2.0'")
        tx.delete(f"{PKG}/data")
        tx.write_bytes(f"{PKG}/extra.py", b"extra = True")
        tx.rename(
            "lib/site-packages/pkg-1.0.dist-info", "lib/site-packages/pkg-2.0.dist-info"
        )
        report = tx.commit()
        after = dict(VENV)
        del after["bin/old.exe"], after[f"{PKG}/data/table.csv"]
        after["bin/tool.exe"] = b"tool 2.0"
        after[f"{PKG}/__init__.py"] = b"version = '2.0'"
        after[f"{PKG}/extra.py"] = b"extra = True"
        record = after.pop("lib/site-packages/pkg-1.0.dist-info/RECORD")
        after["lib/site-packages/pkg-2.0.dist-info/RECORD"] = record
        assert contents(root) == expected(after)

        both = (str(tool), str(old))
        assert sorted(report.deferred) == sorted(both)
        assert len(report.deferred) == 2
        assert report.retries >= 1  # the replace was tried until defer_after
        status = fstx.status(root)
        assert sorted(status.deferred) == sorted(both)
        assert not status.pending
        assert not status.clean
        # The running images were moved, never touched: same files, in the trash.
        in_trash = trash_files(root)
        assert {p.stat().st_ino for p in in_trash} == old_inodes
        assert {p.read_bytes() for p in in_trash} == {b"tool 1.0", b"old 1.0"}
        # Each path is reported once, though tool.exe had two names in staging
        # (its hard-link backup and the old file moved away).
        warnings = deferral_warnings(fstx_log)
        assert len(warnings) == 2
        assert sum("bin/tool.exe" in w for w in warnings) == 1
        assert sum("bin/old.exe" in w for w in warnings) == 1

        # Recovery while they still run purges nothing and keeps them listed.
        early = fstx.recover(root)
        assert early.purged == 0
        assert sorted(early.deferred) == sorted(both)
        assert sorted(fstx.status(root).deferred) == sorted(both)
        assert tool_holder.alive
        assert old_holder.alive

    after_exit = fstx.recover(root)
    assert after_exit.purged == 2
    assert after_exit.deferred == ()
    assert not after_exit.rolled_back
    assert fstx.status(root).clean
    assert fstx.status(root).deferred == ()
    assert_clean(root)
    assert contents(root) == expected(after)


def test_with_exchange_a_running_image_is_swapped_out_in_one_call(
    root: Path,
) -> None:
    # The Linux protocol on Windows' rules: the staged file and the running
    # image trade names (an image may be renamed), so no retry is needed; the
    # old image waits in the trash until its program exits.
    _commit._EXCHANGE = _commit.EXCHANGE_DEFAULT
    make_tree(root, VENV)
    tool = root / "bin/tool.exe"
    old_ino = tool.stat().st_ino
    with hold(tool) as holder:
        tx = fstx.transaction(root, retry=POLICY)
        tx.write_bytes("bin/tool.exe", b"tool 2.0")
        report = tx.commit()
        assert tool.read_bytes() == b"tool 2.0"
        assert report.retries == 0
        assert report.deferred == (str(tool),)
        in_trash = trash_files(root)
        assert [p.stat().st_ino for p in in_trash] == [old_ino]
        assert holder.alive
    assert fstx.recover(root).purged == 1
    assert_clean(root)


def test_with_exchange_a_held_file_is_refused_then_rolled_back(root: Path) -> None:
    # An ordinary file held open cannot be swapped, nor replaced, nor moved
    # away: the commit gives up after its budget and leaves the tree as it was.
    _commit._EXCHANGE = _commit.EXCHANGE_DEFAULT
    make_tree(root, VENV)
    before = contents(root)
    with hold(root / "bin/activate"):
        tx = fstx.transaction(root, retry=POLICY)
        tx.write_bytes("bin/activate", b"# activate 2")
        tx.write_bytes("bin/new", b"new")
        with pytest.raises(fstx.CommitError) as info:
            tx.commit()
    assert isinstance(info.value.__cause__, fstx.InUseError)
    assert contents(root) == before
    assert_clean(root)


def test_in_use_warning_once_per_path_and_one_trash_entry(
    root: Path, fstx_log: pytest.LogCaptureFixture
) -> None:
    make_tree(root, VENV)
    tool = root / "bin/tool.exe"
    old_ino = tool.stat().st_ino
    with hold(tool):
        tx = fstx.transaction(root, retry=POLICY)
        tx.write_bytes("bin/tool.exe", b"tool 2.0")
        report = tx.commit()
        assert report.deferred == (str(tool),)
        assert fstx.status(root).deferred == (str(tool),)
        assert len(deferral_warnings(fstx_log)) == 1
        # Its hard-link backup and the old file moved away are two names of one
        # file: one trash entry holds both.
        names = trash_files(root)
        assert len(names) == 2
        assert {p.stat().st_ino for p in names} == {old_ino}
        assert len({p.parent for p in names}) == 1
    assert fstx.recover(root).purged == 1
    assert fstx.status(root).clean
    assert_clean(root)
    assert tool.read_bytes() == b"tool 2.0"


# --- a held ordinary file cannot even be moved --------------------------------


def _replace(tx: fstx.Transaction) -> None:
    tx.write_bytes("lib/site-packages/pkg/data/table.csv", b"a,b\n3,4\n")


def _delete(tx: fstx.Transaction) -> None:
    tx.delete("lib/site-packages/pkg/data/table.csv")


def _delete_parent(tx: fstx.Transaction) -> None:
    tx.delete("lib/site-packages/pkg")


@pytest.mark.parametrize(
    ("plan", "operation", "link_left"),
    [
        pytest.param(_replace, "move out of the way", True, id="replace"),
        pytest.param(_delete, "delete", False, id="delete"),
        pytest.param(_delete_parent, "delete", False, id="delete-its-directory"),
    ],
)
def test_held_ordinary_file_fails_the_commit_and_rolls_back(
    root: Path, plan: Any, operation: str, link_left: bool
) -> None:
    make_tree(root, VENV)
    held = root / "lib/site-packages/pkg/data/table.csv"
    before = snapshot(root)
    with hold(held) as holder:
        tx = fstx.transaction(root, retry=POLICY)
        tx.write_bytes("bin/activate", b"# activate 2")  # applied, then undone
        plan(tx)
        with pytest.raises(fstx.CommitError) as info:
            tx.commit()
        cause = info.value.__cause__
        assert isinstance(cause, fstx.InUseError)
        assert isinstance(cause, OSError)
        assert cause.filename == str(held)
        assert cause.operation == operation
        assert cause.errno == errno.EBUSY
        # holders() found the child through /proc/<pid>/fd, across FUSE.
        assert (holder.pid, comm(holder.pid)) in cause.holders
        assert f"pid {holder.pid}" in str(cause)
        assert "rolled back" in str(info.value)
        # The message names the held file once for the operation that failed
        # (when that is the file itself) and once in the cause: not again.
        named = str(info.value).count(repr(str(held)))
        assert named == (1 if plan is _delete_parent else 2)
        assert snapshot(root) == before
        if link_left:
            # The hard-link backup taken before the replace was tried is a second
            # name of the held file: under Windows rules it can be neither
            # removed nor moved while held, so it waits in staging.
            # The journal stays too, so that the next recovery sweeps it.
            (area,) = [n for n in staging_leftovers(root) if n.startswith("tx-")]
            (name,) = os.listdir(root / ".fstx" / area)
            assert (root / ".fstx" / area / name).stat().st_ino == held.stat().st_ino
            assert fstx.status(root).pending
            assert fstx.status(root).deferred == ()
        else:
            assert_clean(root)
            assert fstx.status(root).clean
    fstx.recover(root)
    assert snapshot(root) == before
    assert fstx.status(root).clean
    assert_clean(root)


# --- loaded extension modules ------------------------------------------------------


def test_package_with_a_loaded_pyd_is_deleted_but_the_pyd(root: Path) -> None:
    make_tree(root, VENV)
    pyd = root / PKG / "_speedups.pyd"
    pyd_ino = pyd.stat().st_ino
    with hold(pyd):
        tx = fstx.transaction(root, retry=POLICY)
        tx.delete(PKG)
        tx.delete("lib/site-packages/pkg-1.0.dist-info")
        report = tx.commit()
        assert report.deferred == (str(pyd),)
        after = {
            k: v for k, v in VENV.items() if not k.startswith("lib/site-packages/")
        }
        assert contents(root) == {
            **expected(after),
            "lib": None,
            "lib/site-packages": None,
        }
        assert not (root / PKG).exists()
        (left,) = trash_files(root)
        assert left.stat().st_ino == pyd_ino
        assert fstx.status(root).deferred == (str(pyd),)
    recovered = fstx.recover(root)
    assert recovered.purged == 1
    assert recovered.deferred == ()
    assert fstx.status(root).clean
    assert_clean(root)


def test_upgrade_recreates_a_package_whose_pyd_is_loaded(
    root: Path, tmp_path: Path
) -> None:
    make_tree(root, VENV)
    build = tmp_path / "build" / "pkg"
    new_pkg = {
        "__init__.py": b"version = '2.0'",
        "_speedups.pyd": b"MZ pyd 2.0",
        "fast/__init__.py": b"",
    }
    make_tree(build, dict(new_pkg))
    pyd = root / PKG / "_speedups.pyd"
    with hold(pyd):
        tx = fstx.transaction(root, retry=POLICY)
        tx.delete(PKG)
        tx.copy(build, PKG)
        tx.delete("lib/site-packages/pkg-1.0.dist-info")
        tx.write_bytes("lib/site-packages/pkg-2.0.dist-info/RECORD", b"new\n")
        report = tx.commit()
        assert report.deferred == (str(pyd),)
        after = {
            k: v for k, v in VENV.items() if not k.startswith("lib/site-packages/")
        }
        after.update({f"{PKG}/{k}": v for k, v in new_pkg.items()})
        after["lib/site-packages/pkg-2.0.dist-info/RECORD"] = b"new\n"
        assert contents(root) == expected(after)
        (left,) = trash_files(root)
        assert left.read_bytes() == b"MZ pyd 1.0"
    assert fstx.recover(root).purged == 1
    assert fstx.status(root).clean
    assert_clean(root)
    assert contents(root) == expected(after)


# --- the happy path ------------------------------------------------------------


def test_happy_path_never_sleeps(root: Path, tmp_path: Path) -> None:
    make_tree(root, VENV)
    build = tmp_path / "build"
    make_tree(build, {"pkg/__init__.py": b"version = '2.0'", "pkg/_speedups.pyd": b"2"})
    sleeps = SleepCounter()
    policy = fstx.RetryPolicy(sleep=sleeps)
    with fstx.transaction(root, retry=policy) as tx:
        tx.write_bytes("bin/tool.exe", b"tool 2.0")
        tx.delete("bin/old.exe")
        tx.delete(PKG)
        tx.copy(build / "pkg", PKG)
        tx.rename("bin/activate", "bin/activate.sh")
        tx.chmod("bin/tool.exe", 0o755)
    assert sleeps.calls == []
    assert (root / "bin/tool.exe").read_bytes() == b"tool 2.0"
    assert not (root / "bin/old.exe").exists()
    assert_clean(root)
    assert fstx.status(root).clean


# --- rollback after an in-use failure ----------------------------------------------


def test_rollback_after_in_use_failure_puts_back_what_was_moved_away(
    root: Path,
) -> None:
    make_tree(root, {**VENV, "lib/site-packages/lock.db": b"locked"})
    # Modes no default would give: the package directory, moved entry by entry,
    # is recreated by the rollback and must get its own mode back.
    (root / PKG).chmod(0o750)
    (root / PKG / "data").chmod(0o705)
    before = snapshot(root)
    tool, old = root / "bin/tool.exe", root / "bin/old.exe"
    pyd, db = root / PKG / "_speedups.pyd", root / "lib/site-packages/lock.db"
    with hold(tool), hold(old), hold(pyd), hold(db):
        tx = fstx.transaction(root, retry=POLICY)
        tx.write_bytes("bin/tool.exe", b"tool 2.0")  # old one moved away
        tx.delete("bin/old.exe")  # moved into staging
        tx.delete(PKG)  # moved entry by entry, the .pyd too
        tx.write_bytes(f"{PKG}/__init__.py", b"version = '2.0'")
        tx.write_bytes("bin/new.exe", b"new")
        tx.delete("lib/site-packages/lock.db")  # cannot move: the commit fails
        with pytest.raises(fstx.CommitError) as info:
            tx.commit()
        assert isinstance(info.value.__cause__, fstx.InUseError)
        assert info.value.__cause__.filename == str(db)
        # The very same files are back, running images included.
        assert snapshot(root) == before
        # The second name of tool.exe (its hard-link backup) could not go:
        # it waits in the trash, reported under tool.exe.
        assert fstx.status(root).deferred == (str(tool),)
        assert not fstx.status(root).pending
    assert fstx.recover(root).purged == 1
    assert snapshot(root) == before
    assert fstx.status(root).clean
    assert_clean(root)


# --- the default budgets, on a fake clock ------------------------------------------


@pytest.mark.parametrize(
    ("env", "deadline"),
    [
        pytest.param(None, 10.0, id="default"),
        pytest.param("3", 3.0, id="FSTX_RETRY_DEADLINE=3"),
        pytest.param("0", 0.0, id="FSTX_RETRY_DEADLINE=0"),
    ],
)
def test_default_budgets(
    root: Path, monkeypatch: pytest.MonkeyPatch, env: Optional[str], deadline: float
) -> None:
    if env is None:
        monkeypatch.delenv("FSTX_RETRY_DEADLINE", raising=False)
    else:
        monkeypatch.setenv("FSTX_RETRY_DEADLINE", env)
    make_tree(root, VENV)
    tool, table = root / "bin/tool.exe", root / f"{PKG}/data/table.csv"
    with hold(tool), hold(table):
        # A running image: replaced by moving it away after defer_after (2 s).
        fake = FakeTime()
        policy = fstx.RetryPolicy(sleep=fake.sleep, clock=fake.clock)
        assert policy.deadline == deadline
        assert policy.defer_after == 2.0
        tx = fstx.transaction(root, retry=policy)
        tx.write_bytes("bin/tool.exe", b"tool 2.0")
        report = tx.commit()
        assert report.deferred == (str(tool),)
        assert fake.now == pytest.approx(2.0)
        assert report.retries == len(fake.sleeps)
        _check_backoff(fake.sleeps)

        # An ordinary file: it cannot be moved away either, so after
        # defer_after the move is tried until the deadline, then InUseError.
        fake = FakeTime()
        policy = fstx.RetryPolicy(sleep=fake.sleep, clock=fake.clock)
        tx = fstx.transaction(root, retry=policy)
        tx.write_bytes(table, b"new")
        with pytest.raises(fstx.CommitError) as info:
            tx.commit()
        assert isinstance(info.value.__cause__, fstx.InUseError)
        assert fake.now == pytest.approx(2.0 + deadline)
        assert table.read_bytes() == b"a,b\n1,2\n"
    fstx.recover(root)
    assert fstx.status(root).clean
    assert_clean(root)


def _check_backoff(sleeps: List[float]) -> None:
    """10 ms first, doubling, at most 1 s, each within ±25 %; the last may be cut short."""
    assert sleeps
    for i, slept in enumerate(sleeps[:-1]):
        base = min(0.01 * 2**i, 1.0)
        assert 0.75 * base <= slept <= 1.25 * base, (i, slept)
    assert 0 < sleeps[-1] <= 1.25 * min(0.01 * 2 ** (len(sleeps) - 1), 1.0)
