"""A second file system inside the root: staging per device, EXDEV, ENOSPC, EROFS.

A real tmpfs is mounted at ``root/mnt`` (this needs root; the tests skip with
the reason otherwise). Staging for changes on the mount must live on the
mount, so that the commit is still made of renames: a hook checks that no
rename or link ever spans two devices. Renames between the root's device and
the mount fall back to copy + delete, all or nothing. A full tmpfs gives
ENOSPC while staging; a mount turned read-only between planning and commit
gives a clean rollback, and recovery finishes once it is writable again.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

import fstx
from fstx._platform import Dir
from treeutil import FailAt, Snapshot, assert_clean, installed, make_tree, snapshot

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux mounts"),
]

STAGING = ".fstx"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


class Mounts:
    """Mounts made by one test, all undone at its end (lazily if busy)."""

    def __init__(self) -> None:
        self.points: List[Path] = []

    def tmpfs(self, where: Path, size: str = "4m") -> Path:
        where.mkdir(exist_ok=True)
        done = _run(
            "mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.points.append(where)
        return where

    def bind_read_only(self, where: Path) -> None:
        """Stack a read-only bind of ``where`` on itself."""
        done = _run("mount", "--bind", str(where), str(where))
        assert done.returncode == 0, done.stderr
        self.points.append(where)
        done = _run("mount", "-o", "remount,bind,ro", str(where))
        assert done.returncode == 0, done.stderr

    def remount(self, where: Path, option: str) -> None:
        done = _run("mount", "-o", f"remount,{option}", str(where))
        assert done.returncode == 0, done.stderr

    def unmount(self, where: Path) -> None:
        """Undo the most recent mount at ``where``."""
        del self.points[len(self.points) - 1 - self.points[::-1].index(where)]
        done = _run("umount", str(where))
        if done.returncode != 0:
            _run("umount", "-l", str(where))

    def close(self) -> None:
        while self.points:
            self.unmount(self.points[-1])


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not installed")
    made = Mounts()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def mnt(root: Path, mounts: Mounts) -> Path:
    """A 4 MiB tmpfs at ``root/mnt``."""
    path = mounts.tmpfs(root / "mnt")
    assert os.stat(path).st_dev != os.stat(root).st_dev
    return path


class DeviceGuard:
    """An OS hook that records every rename or link whose two ends are on different devices."""

    NAMES = ("rename", "rename_noreplace", "link", "exchange")

    def __init__(
        self, inner: Optional[Callable[[str, str, Tuple[Any, ...]], None]] = None
    ) -> None:
        self.inner = inner
        self.crossings: List[str] = []
        self.renames = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in self.NAMES:
            src, dst = args[0], args[2]
            assert isinstance(src, Dir)
            assert isinstance(dst, Dir)
            self.renames += 1
            if os.fstat(src.fd).st_dev != os.fstat(dst.fd).st_dev:
                self.crossings.append(
                    f"{name} {src.path}/{args[1]} -> {dst.path}/{args[3]}"
                )
        if self.inner is not None:
            self.inner(name, phase, args)


def mount_staging(mnt: Path) -> List[str]:
    """What the mount's own staging directory holds (absent: nothing)."""
    path = mnt / STAGING
    return sorted(os.listdir(path)) if path.exists() else []


def check_clean(root: Path, mnt: Path) -> None:
    assert_clean(root)
    assert not (mnt / STAGING).exists(), mount_staging(mnt)
    assert fstx.status(root).clean


def visible(snap: Snapshot) -> Snapshot:
    """A snapshot without the mount's own staging directory (SPEC: staging may change)."""
    return {
        k: v
        for k, v in snap.items()
        if k != "mnt/.fstx" and not k.startswith("mnt/.fstx/")
    }


def content(snap: Snapshot) -> Dict[str, Tuple[Any, ...]]:
    """A snapshot without inode identity: type, mode, data (or link target)."""
    return {k: v[:3] for k, v in snap.items()}


def mtimes(base: Path) -> Dict[str, int]:
    """mtime of every file and symlink (directories' change with their entries)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            if not rel.startswith(STAGING) and not stat.S_ISDIR(st.st_mode):
                out[rel] = st.st_mtime_ns
    return out


def build(root: Path, mnt: Path) -> None:
    make_tree(
        root,
        {
            "f": b"root file",
            "tree/a": b"tree a",
            "tree/sub/b": b"tree b",
            "keep": b"keep",
        },
    )
    os.chmod(root / "tree" / "a", 0o640)
    os.chmod(root / "tree" / "sub", 0o750)
    os.symlink("tree/a", root / "link")
    make_tree(
        mnt, {"g": b"mnt g", "h": b"mnt h", "mtree/c": b"mnt c", "mtree/d/e": b"mnt e"}
    )
    os.chmod(mnt / "g", 0o600)
    # Old, distinct mtimes: a copy that lost them would show.
    for i, path in enumerate(sorted(p for p in (*root.rglob("*"), *mnt.rglob("*")))):
        os.utime(path, ns=(1_000_000_000 + i, 1_500_000_000_000_000_000 + i * 1_000_003),
                 follow_symlinks=False)  # fmt: skip


# --- staging on the mount's own device ---------------------------------------------


@pytest.mark.parametrize("durability", ["full", "none"])
def test_copy_into_the_mount_is_staged_on_the_mount(
    root: Path, mnt: Path, tmp_path: Path, durability: str
) -> None:
    build(root, mnt)
    src = tmp_path / "src"
    make_tree(src, {"file": b"from outside", "tree/x": b"x", "tree/y/z": b"z"})
    before = snapshot(root)
    guard = DeviceGuard()
    with installed(guard):
        tx = fstx.transaction(root, durability=durability)
        tx.copy(src / "file", "mnt/file")
        tx.copy(src / "tree", "mnt/new/tree")
        # The new content sits in a staging area on the mount itself.
        areas = mount_staging(mnt)
        assert len(areas) == 1
        assert areas[0].startswith("tx-")
        area = mnt / STAGING / areas[0]
        assert os.stat(area).st_dev == os.stat(mnt).st_dev
        assert len(os.listdir(area)) == 3  # file, tree, and the new parent dir
        tx.commit()
    assert guard.crossings == []
    assert guard.renames >= 3
    after = snapshot(root, inodes=False)
    expected = content(before)
    expected.update(
        {
            "mnt/file": (
                "file",
                stat.S_IMODE(os.stat(src / "file").st_mode),
                b"from outside",
            ),
            "mnt/new": ("dir", 0o777 & ~_umask()),
            "mnt/new/tree": ("dir", os.stat(src / "tree").st_mode & 0o777),
            "mnt/new/tree/x": ("file", os.stat(src / "tree/x").st_mode & 0o777, b"x"),
            "mnt/new/tree/y": ("dir", os.stat(src / "tree/y").st_mode & 0o777),
            "mnt/new/tree/y/z": (
                "file",
                os.stat(src / "tree/y/z").st_mode & 0o777,
                b"z",
            ),
        }
    )
    assert content(after) == expected
    assert (
        os.stat(mnt / "new/tree/y/z").st_mtime_ns
        == os.stat(src / "tree/y/z").st_mtime_ns
    )
    check_clean(root, mnt)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


MOVES = [
    pytest.param([("f", "mnt/f")], id="file-into-mount"),
    pytest.param([("tree", "mnt/tree")], id="tree-into-mount"),
    pytest.param([("link", "mnt/link")], id="symlink-into-mount"),
    pytest.param([("mnt/g", "g")], id="file-out-of-mount"),
    pytest.param([("mnt/mtree", "deep/er/mtree")], id="tree-out-of-mount-new-parents"),
    pytest.param([("f", "mnt/h")], id="file-into-mount-replacing"),
    pytest.param([("mnt/h", "keep")], id="file-out-of-mount-replacing"),
    pytest.param([("f", "mnt/f"), ("mnt/f", "back")], id="into-mount-and-back-in-one"),
    pytest.param([("tree", "mnt/t"), ("mnt/t", "mnt/t2"), ("mnt/t2", "t3")],
                 id="tree-into-within-and-out"),
    pytest.param([("tree", "mnt/tree"), ("mnt/mtree", "mtree")], id="swap-both-ways"),
]  # fmt: skip


def apply_moves_to(
    snap: Dict[str, Tuple[Any, ...]], moves: List[Tuple[str, str]]
) -> None:
    """What renames do to a content snapshot (new parent dirs get the default mode)."""
    for src, dst in moves:
        moved = {k: v for k, v in snap.items() if k == src or k.startswith(src + "/")}
        for k in moved:
            del snap[k]
        parts = dst.split("/")
        for i in range(1, len(parts)):
            snap.setdefault("/".join(parts[:i]), ("dir", 0o777 & ~_umask()))
        for k, v in moved.items():
            snap[dst + k[len(src) :]] = v


@pytest.mark.parametrize("moves", MOVES)
def test_rename_across_devices_copies_then_deletes(
    root: Path, mnt: Path, moves: List[Tuple[str, str]]
) -> None:
    build(root, mnt)
    before = snapshot(root)
    times = mtimes(root)
    guard = DeviceGuard()
    with installed(guard), fstx.transaction(root) as tx:
        for src, dst in moves:
            tx.rename(src, dst)
    assert guard.crossings == []
    expected = content(before)
    apply_moves_to(expected, moves)
    assert content(snapshot(root)) == expected
    # Mode bits came along (compared above), and so did every mtime.
    want_times = dict(times)
    for src, dst in moves:
        for k in [k for k in want_times if k == src or k.startswith(src + "/")]:
            want_times[dst + k[len(src) :]] = want_times.pop(k)
    now = mtimes(root)
    assert {k: now[k] for k in want_times if k in now and k in expected} == {
        k: v for k, v in want_times.items() if k in now and k in expected
    }
    check_clean(root, mnt)


def test_rename_into_mount_and_back_round_trips(root: Path, mnt: Path) -> None:
    build(root, mnt)
    before = snapshot(root)
    times = mtimes(root)
    with fstx.transaction(root) as tx:
        tx.rename("f", "mnt/f")
        tx.rename("tree", "mnt/tree")
    assert not (root / "f").exists()
    assert (mnt / "tree" / "sub" / "b").read_bytes() == b"tree b"
    with fstx.transaction(root) as tx:
        tx.rename("mnt/f", "f")
        tx.rename("mnt/tree", "tree")
    assert content(snapshot(root)) == content(before)
    assert mtimes(root) == times
    check_clean(root, mnt)


def test_replace_chmod_and_delete_on_the_mount(root: Path, mnt: Path) -> None:
    build(root, mnt)
    before = snapshot(root)
    guard = DeviceGuard()
    with installed(guard), fstx.transaction(root) as tx:
        tx.write_bytes("mnt/g", b"new g")
        tx.chmod("mnt/h", 0o604)
        tx.delete("mnt/mtree")
        tx.write_text("mnt/fresh/t.txt", "text", mode=0o640)
        tx.write_bytes("keep", b"root side too")
    assert guard.crossings == []
    after = snapshot(root)
    expected = dict(before)
    for k in ["mnt/mtree", "mnt/mtree/c", "mnt/mtree/d", "mnt/mtree/d/e"]:
        del expected[k]
    expected["mnt/h"] = ("file", 0o604, *before["mnt/h"][2:])
    assert {
        k: v
        for k, v in after.items()
        if k not in {"mnt/g", "keep", "mnt/fresh", "mnt/fresh/t.txt"}
    } == {k: v for k, v in expected.items() if k not in {"mnt/g", "keep"}}
    assert after["mnt/g"][:3] == ("file", 0o600, b"new g")  # keeps its mode
    assert after["keep"][2] == b"root side too"
    assert after["mnt/fresh/t.txt"][:3] == ("file", 0o640, b"text")
    check_clean(root, mnt)


# --- all or nothing across devices ------------------------------------------------


def reset(root: Path, mnt: Path) -> None:
    for name in os.listdir(root):
        if name not in ("mnt", STAGING):
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for name in os.listdir(mnt):
        path = mnt / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    build(root, mnt)


def plan_cross(tx: fstx.Transaction) -> None:
    tx.rename("tree", "mnt/tree")
    tx.rename("mnt/mtree", "mtree")
    tx.write_bytes("mnt/g", b"new g")
    tx.delete("mnt/h")
    tx.write_bytes("f", b"new f")


def test_failure_at_every_call_of_a_cross_device_commit_rolls_back_exactly(
    root: Path, mnt: Path
) -> None:
    reset(root, mnt)
    with fstx.transaction(root) as tx:
        plan_cross(tx)
    want = content(snapshot(root))
    k = 0
    failures = 0
    while True:
        k += 1
        reset(root, mnt)
        before = snapshot(root)
        tx = fstx.transaction(root)
        plan_cross(tx)
        fail = FailAt(k, errno.EIO)
        guard = DeviceGuard(fail)
        try:
            with installed(guard):
                tx.commit()
        except fstx.CommitError:
            failures += 1
            assert snapshot(root) == before, (k, fail.calls)
            assert guard.crossings == []
            check_clean(root, mnt)
            continue
        # The commit went through: the failure (if any) hit the clean-up, and
        # what it left waits in staging (the mount's trash) for recovery.
        assert content(visible(snapshot(root))) == want, (k, fail.calls)
        fstx.recover(root)
        assert content(snapshot(root)) == want
        check_clean(root, mnt)
        if fail.count < k:
            break  # no call was failed: the sweep is over
    assert failures >= 8, failures


# --- a full tmpfs -------------------------------------------------------------------

BIG = 1 << 20


def _copy_big(tx: fstx.Transaction, big: Path) -> None:
    tx.copy(big, "mnt/big")


def _rename_big(tx: fstx.Transaction, big: Path) -> None:
    tx.rename("big", "mnt/big")


def _write_big(tx: fstx.Transaction, big: Path) -> None:
    tx.write_bytes("mnt/big", big.read_bytes())


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(_copy_big, id="copy-from-outside"),
        pytest.param(_rename_big, id="rename-from-root-device"),
        pytest.param(_write_big, id="write"),
    ],
)
def test_full_mount_fails_cleanly(
    root: Path,
    mounts: Mounts,
    tmp_path: Path,
    plan: Callable[[fstx.Transaction, Path], None],
) -> None:
    mnt = mounts.tmpfs(root / "mnt", size="64k")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(BIG))
    shutil.copy2(big, root / "big")
    make_tree(mnt, {"small": b"small"})
    before = snapshot(root)
    tx = fstx.transaction(root)
    staging_error: Optional[OSError] = None
    try:
        tx.write_bytes("mnt/small", b"replaced")  # some staging fits
        plan(tx, big)
    except OSError as exc:
        staging_error = exc
    if staging_error is not None:
        # Raised as it is while staging: nothing outside staging changed.
        assert staging_error.errno == errno.ENOSPC
        assert visible(snapshot(root)) == before
        tx.rollback()
    else:
        with pytest.raises(fstx.CommitError) as info:
            tx.commit()
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC
    assert snapshot(root) == before
    check_clean(root, mnt)
    # The space came back.
    assert os.statvfs(mnt).f_bfree * os.statvfs(mnt).f_frsize > 32 * 1024


# --- a mount turned read-only between planning and commit ----------------------------


@pytest.mark.parametrize("how", ["remount-ro", "ro-bind"])
def test_read_only_mount_at_commit_rolls_back_and_recovery_finishes(
    root: Path, mnt: Path, mounts: Mounts, how: str
) -> None:
    build(root, mnt)
    before = snapshot(root)
    tx = fstx.transaction(root)
    tx.write_bytes("f", b"root side first")  # applied, then undone
    tx.rename("tree", "other")
    tx.write_bytes("mnt/g", b"new g")
    tx.write_bytes("mnt/new", b"new")
    tx.delete("mnt/h")
    if how == "remount-ro":
        mounts.remount(mnt, "ro")
    else:
        mounts.bind_read_only(mnt)
    with pytest.raises(fstx.CommitError) as info:
        tx.commit()
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.EROFS
    assert visible(snapshot(root)) == before
    if how == "remount-ro":
        mounts.remount(mnt, "rw")
    else:
        mounts.unmount(mnt)
    fstx.recover(root)
    assert snapshot(root) == before
    check_clean(root, mnt)
    # The root is usable again, on both devices.
    with fstx.transaction(root) as tx2:
        tx2.write_bytes("mnt/g", b"after")
    assert (mnt / "g").read_bytes() == b"after"
    check_clean(root, mnt)


# --- a bind mount of the root's own file system ---------------------------------------


def test_bind_mount_of_the_same_file_system_inside_the_root(
    root: Path, mounts: Mounts, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    make_tree(other, {"x": b"x"})
    make_tree(root, {"top": b"top", "bind": None})
    done = _run("mount", "--bind", str(other), str(root / "bind"))
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    mounts.points.append(root / "bind")
    assert os.stat(root / "bind").st_dev == os.stat(root).st_dev
    with fstx.transaction(root) as tx:
        tx.write_bytes("bind/new", b"new")
        tx.rename("top", "bind/top")
    assert (other / "new").read_bytes() == b"new"
    assert (other / "top").read_bytes() == b"top"
    assert not (root / "top").exists()
    assert_clean(root)
    assert not (root / "bind" / STAGING).exists()


# --- a crash mid-commit with staging on both devices ----------------------------------

CRASHER = textwrap.dedent(
    """
    import os, sys
    import fstx
    from fstx import _os

    root, after = sys.argv[1], int(sys.argv[2])
    tx = fstx.transaction(root, durability="none")
    tx.rename("tree", "mnt/tree")
    tx.write_bytes("mnt/g", b"new g")
    tx.delete("mnt/h")
    tx.rename("mnt/mtree", "mtree")
    tx.write_bytes("f", b"new f")
    seen = 0

    def hook(name, phase, args):
        global seen
        if phase == "after" and name in ("rename", "rename_noreplace", "unlink", "rmdir"):
            seen += 1
            if seen == after:
                os._exit(137)

    _os.set_hook(hook)
    tx.commit()
    print("finished", seen)
    """
)


def test_crash_at_every_step_of_a_cross_device_commit_recovers_exactly(
    root: Path, mnt: Path
) -> None:
    reset(root, mnt)
    with fstx.transaction(root) as tx:
        plan_cross(tx)
    want = content(snapshot(root))
    outcomes = {"pre": 0, "post": 0}
    after = 0
    while True:
        after += 1
        reset(root, mnt)
        before = snapshot(root)
        run = subprocess.run(
            [sys.executable, "-c", CRASHER, str(root), str(after)],
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode == 0:
            assert run.stdout.startswith("finished")
            assert content(snapshot(root)) == want
            check_clean(root, mnt)
            break
        assert run.returncode == 137, run.stderr
        if not fstx.status(root).pending:
            # Killed after its journal was gone: the clean-up was complete.
            assert content(snapshot(root)) == want, after
        fstx.recover(root)
        now = snapshot(root)
        if now == before:
            outcomes["pre"] += 1
        else:
            assert content(now) == want, after
            outcomes["post"] += 1
        check_clean(root, mnt)
        assert fstx.recover(root) == fstx.RecoveryReport()
    # Crashes landed on both sides of the commit point.
    assert outcomes["pre"] >= 5, outcomes
    assert outcomes["post"] >= 1, outcomes
