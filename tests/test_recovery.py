"""Tests of fstx.recover and fstx.status (SPEC §3): idempotence, concurrency, trash."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Tuple

import pytest

import fstx
from fstx import _os, _recovery
from fstx._platform import impl
from treeutil import assert_clean, installed, make_tree, snapshot, staging_leftovers

if TYPE_CHECKING:
    import pathlib

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX semantics")

Entry = Tuple[Any, ...]


class Crash(BaseException):
    """Stands for the process dying: the engine does not catch it as an error."""


def crash_after_renames(n: int) -> _os.Hook:
    """Let ``n`` renames happen, then "die" at every later change (no undo runs)."""
    done = [0]

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name not in _os.MUTATING:
            return
        if phase == "before" and done[0] >= n:
            raise Crash
        if phase == "after" and name in ("rename", "rename_noreplace"):
            done[0] += 1

    return hook


LOCK = os.path.join(".fstx", "lock")


def everything(root: pathlib.Path) -> Dict[str, Entry]:
    """The whole root, staging included: type, mode, content, inode and mtime of each."""
    out: Dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            key = os.path.normpath(os.path.relpath(full, root))
            ident = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_ino,
                # Taking the lock may truncate its (empty) file: older filelock
                # opens it with O_TRUNC. Its time is the lock's, not the tree's.
                None if key == LOCK else st.st_mtime_ns,
            )
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[key] = (*ident, f.read())
            elif stat.S_ISLNK(st.st_mode):
                out[key] = (*ident, os.readlink(full))
            else:
                out[key] = ident
    return out


def setup_tree(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A", "pkg/x": b"x", "pkg/sub/y": b"y", "12:00.log": b"l"})
    os.symlink("a", root / "link")


def plan(tx: fstx.Transaction) -> None:
    tx.write_bytes("a", b"new A")
    tx.delete("pkg")
    tx.write_bytes("new/dir/f", b"f")
    tx.rename("12:00.log", "logs/12:00.log")
    tx.write_bytes("link", b"no longer a link")


def crashed(root: pathlib.Path, renames: int = 3) -> Dict[str, Entry]:
    """A root whose commit "died" after ``renames`` renames; returns the before tree."""
    setup_tree(root)
    before = snapshot(root)
    tx = fstx.transaction(root, durability="none")
    plan(tx)
    with (
        installed(crash_after_renames(renames)),
        pytest.raises((Crash, fstx.RollbackError)),
    ):
        tx.commit()
    assert snapshot(root) != before
    return before


NOTHING = fstx.RecoveryReport()


# -- nothing to do ---------------------------------------------------------------------


def test_recover_without_staging_creates_nothing(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    before = everything(root)
    report = fstx.recover(root)
    assert report == NOTHING
    assert (
        report.rolled_back,
        report.rolled_forward,
        report.purged,
        report.deferred,
    ) == (
        False,
        False,
        0,
        (),
    )
    assert everything(root) == before
    assert not (root / ".fstx").exists()
    assert fstx.status(root) == fstx.Status()
    assert fstx.status(root).clean
    assert everything(root) == before


def test_recover_with_only_the_lock_changes_nothing(root: pathlib.Path) -> None:
    with fstx.transaction(root, durability="none") as tx:
        tx.write_bytes("a", b"A")
    assert sorted(os.listdir(root / ".fstx")) == ["lock"]
    before = everything(root)
    assert fstx.recover(root) == NOTHING
    status = fstx.status(root)
    assert (status.pending, status.deferred, status.clean) == (False, (), True)
    assert everything(root) == before


@pytest.mark.parametrize("renames", [1, 3, 5])
def test_recover_is_idempotent(root: pathlib.Path, renames: int) -> None:
    before = crashed(root, renames)
    first = fstx.recover(root)
    assert first.rolled_back is True
    assert first.rolled_forward is False
    assert snapshot(root) == before
    assert_clean(root)
    after_first = everything(root)
    assert fstx.recover(root) == NOTHING
    assert everything(root) == after_first


def test_crash_after_the_commit_point_rolls_forward(root: pathlib.Path) -> None:
    setup_tree(root)
    reference = root.parent / "reference"
    reference.mkdir()
    setup_tree(reference)
    with fstx.transaction(reference, durability="none") as tx:
        plan(tx)
    tx = fstx.transaction(root, durability="none")
    plan(tx)

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "after" and name == "write" and b'"committed"' in bytes(args[1]):
            _os.set_hook(dead)
            raise Crash

    def dead(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in _os.MUTATING:
            raise Crash

    with installed(hook), pytest.raises((Crash, fstx.RollbackError)):
        tx.commit()
    _os.set_hook(None)
    assert fstx.status(root).pending
    report = fstx.recover(root)
    assert (report.rolled_back, report.rolled_forward) == (False, True)
    assert snapshot(root, inodes=False) == snapshot(reference, inodes=False)
    assert_clean(root)


# -- status ----------------------------------------------------------------------------


def test_status_changes_nothing_and_reports_pending(root: pathlib.Path) -> None:
    crashed(root)
    before = everything(root)
    status = fstx.status(root)
    assert (status.pending, status.deferred, status.clean) == (True, (), False)
    assert everything(root) == before
    fstx.recover(root)
    assert fstx.status(root).clean


def test_status_of_a_live_transaction_is_not_pending(root: pathlib.Path) -> None:
    tx = fstx.transaction(root, durability="none")
    tx.write_bytes("a", b"A")
    before = everything(root)
    assert fstx.status(root) == fstx.Status()
    assert everything(root) == before
    tx.commit()
    assert fstx.status(root).clean


ABANDON = textwrap.dedent(
    """
    import os, sys
    import fstx
    tx = fstx.transaction(sys.argv[1], durability="none")
    tx.write_bytes("planned/only", b"never committed")
    tx.delete("a")
    os._exit(0)  # dies while planning: no commit, no rollback
    """
)


def test_process_dead_while_planning_is_pending_then_swept(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    subprocess.run([sys.executable, "-c", ABANDON, str(root)], check=True, timeout=60)
    assert staging_leftovers(root) != []
    assert fstx.status(root).pending
    report = fstx.recover(root)
    assert (report.rolled_back, report.rolled_forward) == (False, False)
    assert snapshot(root) == before
    assert_clean(root)
    assert fstx.status(root).clean


def test_stray_staging_area_without_journal_is_swept(root: pathlib.Path) -> None:
    fstx.transaction(root, durability="none").rollback()
    make_tree(
        root / ".fstx",
        {"tx-0123456789abcdef/s1": b"staged", "tx-0123456789abcdef/d2": None},
    )
    assert fstx.status(root).pending
    report = fstx.recover(root)
    assert (report.rolled_back, report.rolled_forward) == (False, False)
    assert_clean(root)


# -- many recoverers at once -----------------------------------------------------------


RECOVER = textwrap.dedent(
    """
    import json, sys
    import fstx
    sys.stdin.readline()
    r = fstx.recover(sys.argv[1])
    print(json.dumps([r.rolled_back, r.rolled_forward, r.purged, list(r.deferred)]))
    """
)


def test_recover_from_threads_and_processes_at_once_converges(
    root: pathlib.Path,
) -> None:
    before = crashed(root, 2)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RECOVER, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results: List[Tuple[bool, bool, int, List[str]]] = []
    errors: List[BaseException] = []
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        try:
            r = fstx.recover(root)
            results.append(
                (r.rolled_back, r.rolled_forward, r.purged, list(r.deferred))
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    start.wait()
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        results.append(tuple(json.loads(out)))
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 6
    assert sorted(results) == [(False, False, 0, [])] * 5 + [(True, False, 0, [])]
    assert snapshot(root) == before
    assert_clean(root)


def test_recover_waits_for_a_live_transaction(root: pathlib.Path) -> None:
    tx = fstx.transaction(root, durability="none")
    tx.write_bytes("a", b"A")
    reports: List[fstx.RecoveryReport] = []
    thread = threading.Thread(target=lambda: reports.append(fstx.recover(root)))
    thread.start()
    tx.commit()
    thread.join(60)
    assert reports == [NOTHING]
    assert snapshot(root, inodes=False) == {"a": ("file", 0o666 & ~_umask(), b"A")}
    assert_clean(root)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- trash and deferred removals ---------------------------------------------------------


class Busy:
    """An OS-layer hook under which one file (by inode) cannot be removed: EBUSY."""

    def __init__(self, path: pathlib.Path) -> None:
        st = os.lstat(path)
        self.key = (st.st_dev, st.st_ino)
        self.refused = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase != "before" or name not in ("unlink", "rmdir"):
            return
        d, entry = args[0], args[1]
        try:
            st = os.stat(entry, dir_fd=d.fd, follow_symlinks=False)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self.key:
            self.refused += 1
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), entry)


def _commit_with_busy(
    root: pathlib.Path,
) -> Tuple[fstx.CommitReport, Callable[..., None]]:
    make_tree(root, {"app.exe": b"old exe", "pkg/lib.so": b"old lib", "pkg/x": b"x"})
    hooks = [Busy(root / "app.exe"), Busy(root / "pkg/lib.so")]

    def both(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        for hook in hooks:
            hook(name, phase, args)

    tx = fstx.transaction(root, durability="none")
    tx.write_bytes("app.exe", b"new exe")
    tx.delete("pkg")
    with installed(both):
        report = tx.commit()
    assert all(h.refused > 0 for h in hooks)
    return report, both


def test_files_in_use_are_deferred_to_the_trash_then_purged(root: pathlib.Path) -> None:
    report, busy = _commit_with_busy(root)
    deferred = (str(root / "app.exe"), str(root / "pkg" / "lib.so"))
    assert sorted(report.deferred) == sorted(deferred)
    assert snapshot(root, inodes=False) == {
        "app.exe": ("file", 0o666 & ~_umask(), b"new exe")
    }
    assert staging_leftovers(root) == ["trash"]

    before = everything(root)
    status = fstx.status(root)
    assert (status.pending, status.clean) == (False, False)
    assert sorted(status.deferred) == sorted(deferred)
    assert everything(root) == before

    with installed(busy):  # still in use: nothing can go yet
        again = fstx.recover(root)
    assert (again.rolled_back, again.rolled_forward, again.purged) == (False, False, 0)
    assert sorted(again.deferred) == sorted(deferred)
    assert sorted(fstx.status(root).deferred) == sorted(deferred)

    final = fstx.recover(root)
    assert (final.rolled_back, final.rolled_forward) == (False, False)
    assert final.purged == 2
    assert final.deferred == ()
    assert fstx.status(root).clean
    assert snapshot(root, inodes=False) == {
        "app.exe": ("file", 0o666 & ~_umask(), b"new exe")
    }
    assert_clean(root)
    assert fstx.recover(root) == NOTHING


def _chattr(flag: str, path: pathlib.Path) -> bool:
    tool = shutil.which("chattr")
    if tool is None:
        return False
    done = subprocess.run([tool, flag, str(path)], capture_output=True, check=False)
    return done.returncode == 0


def test_immutable_trash_entry_stays_deferred_until_freed(root: pathlib.Path) -> None:
    report, _ = _commit_with_busy(root)
    assert len(report.deferred) == 2
    trash = root / ".fstx" / "trash"
    entries = sorted(p for p in trash.iterdir() if not p.name.endswith(".origin"))
    assert len(entries) == 2
    # The old app.exe is a file in the trash; the old pkg is a shell directory
    # holding lib.so. Make every entry immutable: a real refusal by the kernel.
    locked = [
        p for e in entries for p in ([e] if e.is_file() else sorted(e.rglob("*")))
    ]
    if not all(_chattr("+i", p) for p in locked):
        for p in locked:
            _chattr("-i", p)
        pytest.skip("chattr +i is not available here (needs root and ext4/xfs/btrfs)")
    try:
        stuck = fstx.recover(root)
        assert stuck.purged == 0
        assert sorted(stuck.deferred) == sorted(report.deferred)
        assert sorted(fstx.status(root).deferred) == sorted(report.deferred)
    finally:
        for p in locked:
            _chattr("-i", p)
    freed = fstx.recover(root)
    assert freed.purged == 2
    assert freed.deferred == ()
    assert_clean(root)


def test_recover_after_the_root_itself_moved(root: pathlib.Path) -> None:
    before = crashed(root, 3)
    moved = root.parent / "moved-root"
    os.rename(root, moved)
    assert fstx.status(moved).pending
    report = fstx.recover(moved)
    assert (report.rolled_back, report.rolled_forward) == (True, False)
    assert snapshot(moved) == before
    assert_clean(moved)


@pytest.mark.parametrize(
    "opted_in", [pytest.param(True, id="opted-in"), pytest.param(False, id="default")]
)
def test_held_trash_entries_are_scheduled_for_deletion_at_boot_only_when_asked(
    root: pathlib.Path, monkeypatch: pytest.MonkeyPatch, opted_in: bool
) -> None:
    _report, busy = _commit_with_busy(root)
    scheduled: List[str] = []

    def schedule(path: str) -> bool:
        scheduled.append(path)
        return True

    monkeypatch.setattr(impl, "schedule_delete_on_reboot", schedule)
    if opted_in:
        monkeypatch.setenv(_recovery.REBOOT_ENV, "1")
    else:
        monkeypatch.delenv(_recovery.REBOOT_ENV, raising=False)
    with installed(busy):
        held = fstx.recover(root)
    assert held.purged == 0
    if opted_in:
        # every file of both held entries, each under the trash
        assert len(scheduled) >= 2
        assert all(os.sep + os.path.join(".fstx", "trash") in p for p in scheduled)
    else:
        assert scheduled == []
    assert fstx.recover(root).purged == 2
    assert_clean(root)
