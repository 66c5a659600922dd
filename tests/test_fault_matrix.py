"""Fault matrix: real environment faults, each ending in a clean error and an exact rollback.

Every case here meets a real cause, not an injected one: a full tmpfs (by
bytes and by inodes, with the free space swept across the transaction's
footprint), a mount turned read-only between planning and commit, an
unprivileged user facing a read-only directory, an immutable file, a full
target device for a move across devices, names at the 255-byte limit or
past it, paths longer than PATH_MAX, names that are not UTF-8. Each case
checks that:

- the failure surfaces as the SPEC says: ``OSError`` from the planning call
  (staging) or from opening the transaction, else ``CommitError`` with the
  cause chained;
- the tree is exactly the before-tree (same inodes, same mtimes), the
  staging directory holds nothing but its lock;
- once the cause is gone, recovery completes and the same transaction
  commits, giving exactly the after-tree.

Names and deep paths also run through a failed commit (an injected I/O
error at the last rename) and a crash (a forked child killed mid-commit,
recovered by a fresh interpreter), since the journal must carry them.

The unprivileged runs use ``setpriv --reuid=65534 --regid=65534
--clear-groups`` with an interpreter that user can execute (the pyenv one
under /root is not readable by it) and ``PYTHONPATH`` pointing at a
world-readable copy of fstx and its pure-Python dependencies (attrs,
filelock, tenacity), made once per test session.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import attrs
import pytest

import fstx
from fstx import _os
from mounts import Mounts, mounts, why_no_mounts
from treeutil import Snapshot, assert_clean, installed, snapshot, staging_leftovers
from workloads import (
    BY_NAME,
    Copy,
    Delete,
    Dir,
    File,
    Mkdir,
    Rename,
    Spec,
    Workload,
    Write,
    _force_rmtree,
    build,
    tree_of,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="Linux mounts and errno"
    ),
]

PAGE = os.sysconf("SC_PAGE_SIZE")
NOBODY = 65534
STAGING = ".fstx"


@pytest.fixture
def made() -> Iterator[Mounts]:
    reason = why_no_mounts()
    if reason is not None:
        pytest.skip(reason)
    with mounts() as m:
        yield m


# -- running a workload to its outcome ------------------------------------------------


def attempt(workload: Workload, root: str, src: str, err: int) -> str:
    """Run ``workload``; how it ended: ``open``, ``plan``, ``commit`` (errors) or ``committed``.

    A failure must be ``err``: an ``OSError`` from opening the transaction or
    from a planning call (then the tree is untouched and ``rollback`` works),
    or a ``CommitError`` caused by it.
    """
    failure: Optional[BaseException] = None
    outcome = "committed"
    try:
        tx = fstx.transaction(root)
    except OSError as exc:
        failure, outcome = exc, "open"
    else:
        try:
            workload.plan(tx, src)
        except OSError as exc:
            tx.rollback()
            failure, outcome = exc, "plan"
        except BaseException:
            tx.rollback()
            raise
        else:
            try:
                tx.commit()
            except fstx.CommitError as exc:
                failure, outcome = exc.__cause__, "commit"
    if failure is not None:
        assert isinstance(failure, OSError), repr(failure)
        assert not isinstance(failure, fstx.FstxError), repr(failure)
        assert failure.errno == err, repr(failure)
    return outcome


def settled(
    root: str, outcome: str, before: Snapshot, after: Snapshot, where: str, *,
    cross: bool = False, hide: str = "",
) -> None:  # fmt: skip
    """Exactly the before-tree after a failure, the after-tree after a commit; staging clean.

    With ``cross``, files moved across devices are new inodes: the after-tree
    is compared without inode numbers (mode, content and mtime still count).
    ``hide`` is a path left out of the comparison (a filler inside the root).
    """
    if outcome == "committed":
        assert same_after(root, after, cross=cross, hide=hide), where
    else:
        assert {k: v for k, v in snapshot(root).items() if k != hide} == before, where
    assert_clean(root)


def same_after(root: str, after: Snapshot, *, cross: bool, hide: str = "") -> bool:
    got = {k: v for k, v in tree_of(root, after).items() if k != hide}
    return without_inodes(got) == without_inodes(after) if cross else got == after


def without_inodes(snap: Snapshot) -> Snapshot:
    """File entries as (type, mode, data, mtime): a move across devices keeps all but the inode."""
    return {k: v[:3] + v[4:] if v[0] == "file" else v for k, v in snap.items()}


def cause_gone(
    workload: Workload,
    root: str,
    src: str,
    outcome: str,
    after: Snapshot,
    *,
    cross: bool = False,
) -> None:
    """Recovery completes (and changes nothing); the transaction then commits."""
    settled_tree = snapshot(root)
    fstx.recover(root)
    assert fstx.status(root).clean
    assert snapshot(root) == settled_tree
    if outcome != "committed":
        with fstx.transaction(root) as tx:
            workload.plan(tx, src)
    assert same_after(root, after, cross=cross)
    assert_clean(root)


# -- disk full: bytes and inodes ---------------------------------------------------------

_MANY = tuple(
    Write(
        f"data/entry-{i:02d}-with-a-name-long-enough-to-grow-the-journal.txt",
        b"%d\n" % i,
    )
    for i in range(24)
)

FULL_WORKLOADS: Dict[str, Workload] = {
    "installer-upgrade": BY_NAME["installer-upgrade"],
    "many-small-writes": Workload(
        name="many-small-writes",
        before={
            "data/old.txt": b"replaced\n",
            "data/gone.txt": b"deleted\n",
            "keep": b"kept\n",
        },
        source={},
        ops=(*_MANY, Write("data/old.txt", b"new\n"), Delete("data/gone.txt")),
    ),
    "big-files": Workload(
        name="big-files",
        before={"big.bin": File(b"o" * (10 * PAGE + 7), 0o600), "other": b"other\n"},
        source={"src.bin": b"s" * (6 * PAGE)},
        ops=(
            Write("big.bin", b"n" * (9 * PAGE + 100)),
            Copy("src.bin", "copied/src.bin"),
            Rename("other", "copied/other"),
        ),
    ),
}


def fill_bytes(mnt: str, free_pages: int) -> None:
    """Fill the tmpfs at ``mnt`` with a filler file, leaving ``free_pages`` pages free."""
    path = os.path.join(mnt, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = b"\0" * (16 * PAGE)
        with contextlib.suppress(OSError):  # ENOSPC: full, as wanted (checked below)
            while True:
                os.write(fd, chunk)
        size = os.fstat(fd).st_size // PAGE * PAGE
        os.ftruncate(fd, max(0, size - free_pages * PAGE))
    finally:
        os.close(fd)
    assert os.statvfs(mnt).f_bavail == free_pages


def fill_inodes(mnt: str, free: int) -> None:
    """Use up the inodes of the tmpfs at ``mnt`` with empty files, leaving ``free`` free."""
    path = os.path.join(mnt, "filler.d")
    os.mkdir(path)
    made: List[str] = []
    full = OSError()
    while True:
        name = os.path.join(path, str(len(made)))
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            full = exc
            break
        made.append(name)
    assert full.errno == errno.ENOSPC
    for name in made[len(made) - free :] if free else []:
        os.unlink(name)
    assert os.statvfs(mnt).f_favail == free


def unfill(mnt: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # the bytes or the inodes filler
        os.unlink(os.path.join(mnt, "filler"))
    if os.path.isdir(os.path.join(mnt, "filler.d")):
        shutil.rmtree(os.path.join(mnt, "filler.d"))


@pytest.mark.parametrize(
    ("name", "by"),
    [
        pytest.param("installer-upgrade", "bytes", id="installer-upgrade-bytes"),
        pytest.param("many-small-writes", "bytes", id="many-small-writes-bytes"),
        pytest.param("big-files", "bytes", id="big-files-bytes"),
        pytest.param("installer-upgrade", "inodes", id="installer-upgrade-inodes"),
        pytest.param("many-small-writes", "inodes", id="many-small-writes-inodes"),
    ],
)
def test_disk_full_swept_across_the_footprint(
    name: str, by: str, made: Mounts, tmp_path: Any
) -> None:
    workload = FULL_WORKLOADS[name]
    src = str(tmp_path / "src")
    build(src, workload.source)
    tally: Dict[str, int] = {"open": 0, "plan": 0, "commit": 0, "committed": 0}
    free, streak = 0, 0
    # From nothing free upwards, one page or inode at a time, until the
    # transaction has committed twice in a row: every point of its footprint.
    while streak < 2:
        assert free < 200, f"{name} never fit: {tally}"
        options: Dict[str, Any] = (
            {"size": "2m"} if by == "bytes" else {"nr_inodes": 400}
        )
        mnt = made.tmpfs(made.point("full"), **options)
        root = os.path.join(mnt, "root")
        build(root, workload.before)
        before = snapshot(root)
        after = workload.expected(root, src)
        if by == "bytes":
            fill_bytes(mnt, free)
        else:
            fill_inodes(mnt, free)
        where = f"{name}: {free} free {by}"
        outcome = attempt(workload, root, src, errno.ENOSPC)
        settled(root, outcome, before, after, where)
        unfill(mnt)
        cause_gone(workload, root, src, outcome, after)
        made.unmount(mnt)
        tally[outcome] += 1
        streak = streak + 1 if outcome == "committed" else 0
        free += 1
    print(f"\ndisk full {name} by {by}: {tally}")  # the numbers for docs/testing.md
    assert tally["plan"] + tally["open"] > 0, tally
    if name == "many-small-writes" and by == "bytes":
        # Staging fits but the journal's commit append needs one more page.
        assert tally["commit"] > 0, tally


# -- a read-only file system between planning and commit ----------------------------------


def test_read_only_mount_between_planning_and_commit(
    made: Mounts, tmp_path: Any
) -> None:
    root = str(tmp_path / "root")
    build(root, {"root-side.txt": b"root side\n", "tree/a": b"a\n"})
    ro = made.tmpfs(os.path.join(root, "ro"), size="1m")
    build(ro, {"a.txt": File(b"old a\n", 0o640), "b.txt": b"b\n", "sub/c.txt": b"c\n"})
    workload = Workload(
        name="read-only",
        before={},
        source={},
        ops=(
            Write("root-side.txt", b"applied first, then undone\n"),
            Rename("tree", "moved-tree"),
            Write("ro/a.txt", b"new a\n"),
            Write("ro/new.txt", b"new\n"),
            Delete("ro/b.txt"),
            Rename("ro/sub/c.txt", "ro/c.txt"),
        ),
    )
    before = snapshot(root)
    after = workload.expected(root, "")
    tx = fstx.transaction(root)
    workload.plan(tx, "")
    made.remount(ro, "ro")
    with pytest.raises(fstx.CommitError) as info:
        tx.commit()
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.EROFS
    # Exact, but for the staging directory on the read-only mount, which
    # cannot go until the mount is writable again; the journal that lists it
    # stays for the next recovery.
    assert {
        k: v for k, v in snapshot(root).items() if not k.startswith("ro/.fstx")
    } == before
    assert all(n.endswith(".journal") for n in staging_leftovers(root))
    made.remount(ro, "rw")
    fstx.recover(root)
    assert snapshot(root) == before
    assert_clean(root)
    with fstx.transaction(root) as retry:
        workload.plan(retry, "")
    assert tree_of(root, after) == after
    assert_clean(root)


# -- permission denied, as an unprivileged user -----------------------------------------------

_DEPENDENCIES = ("fstx", "attr", "attrs", "filelock", "tenacity")


@attrs.frozen
class Nobody:
    """How to run Python as uid 65534: an interpreter it can execute, and a readable site."""

    python: str
    site: str

    def run(self, code: str, *args: str) -> Dict[str, Any]:
        """Run ``code`` as uid 65534; the JSON it printed last."""
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": self.site,
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
        }
        done = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             self.python, "-c", code, *args],
            env=env, cwd="/", capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert isinstance(result, dict)
        return result


@pytest.fixture(scope="session")
def nobody() -> Iterator[Nobody]:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed (util-linux)")
    site = tempfile.mkdtemp(prefix="fstx-nobody-site-")
    try:
        os.chmod(site, 0o755)
        for name in _DEPENDENCIES:
            module = __import__(name)
            package = os.path.dirname(os.path.abspath(module.__file__ or ""))
            shutil.copytree(package, os.path.join(site, name),
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        for top, dirs, files in os.walk(site):
            for entry in dirs:
                os.chmod(os.path.join(top, entry), 0o755)
            for entry in files:
                os.chmod(os.path.join(top, entry), 0o644)
        tried: List[str] = []
        for python in (
            "/usr/bin/python3",
            "/usr/local/bin/python3",
            os.path.realpath(sys.executable),
        ):
            if not os.path.exists(python):
                continue
            candidate = Nobody(python, site)
            try:
                got = candidate.run(
                    "import json, os, fstx; print(json.dumps({'uid': os.getuid()}))"
                )
            except AssertionError as exc:
                tried.append(f"{python}: {str(exc).splitlines()[0]}")
                continue
            assert got == {"uid": NOBODY}
            yield candidate
            return
        pytest.skip(f"no Python that uid {NOBODY} can run with fstx: {tried}")
    finally:
        shutil.rmtree(site, ignore_errors=True)


# Runs as uid 65534: argv = root, source dir, then the operations as JSON.
# Prints {"outcome": ..., "errno": ...}.
_NOBODY_TX = r"""
import json, sys
import fstx
root, src, ops = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def plan(tx):
    for op, *args in ops:
        if op == "write":
            tx.write_bytes(args[0], args[1].encode())
        elif op == "copy":
            tx.copy(src + "/" + args[0], args[1])
        else:
            getattr(tx, op)(*args)
try:
    tx = fstx.transaction(root)
except OSError as exc:
    print(json.dumps({"outcome": "open", "errno": exc.errno}))
    sys.exit()
try:
    plan(tx)
except OSError as exc:
    tx.rollback()
    print(json.dumps({"outcome": "plan", "errno": exc.errno}))
    sys.exit()
try:
    tx.commit()
except fstx.CommitError as exc:
    print(json.dumps({"outcome": "commit", "errno": getattr(exc.__cause__, "errno", None),
                      "message": str(exc)}))
else:
    print(json.dumps({"outcome": "committed"}))
"""

PERMISSION_CASES = [
    pytest.param("commit", [["write", "free/c.txt", "first\n"], ["write", "locked/a.txt", "new a\n"]],
                 id="replace-in-read-only-dir"),
    pytest.param("commit", [["write", "free/c.txt", "first\n"], ["delete", "locked/b.txt"]],
                 id="delete-in-read-only-dir"),
    pytest.param("commit", [["rename", "free/c.txt", "free/d.txt"], ["write", "locked/new.txt", "n\n"]],
                 id="create-in-read-only-dir"),
    pytest.param("commit", [["write", "free/c.txt", "first\n"], ["rename", "locked/a.txt", "free/a.txt"]],
                 id="move-out-of-read-only-dir"),
    pytest.param("plan", [["write", "free/c.txt", "first\n"], ["copy", "secret", "free/secret"]],
                 id="unreadable-source"),
    pytest.param("open", [["write", "free/c.txt", "x\n"]], id="root-not-writable"),
]  # fmt: skip


@pytest.mark.parametrize(("where", "ops"), PERMISSION_CASES)
def test_permission_denied_as_an_unprivileged_user(
    nobody: Nobody, where: str, ops: List[List[str]]
) -> None:
    base = tempfile.mkdtemp(prefix="fstx-nobody-")
    try:
        os.chmod(base, 0o755)
        root, src = os.path.join(base, "root"), os.path.join(base, "src")
        build(
            root, {"free/c.txt": b"c\n", "locked/a.txt": b"a\n", "locked/b.txt": b"b\n"}
        )
        build(src, {"secret": File(b"not for nobody\n", 0o600)})  # owned by root
        for top, _dirs, files in os.walk(root):
            for entry in (top, *(os.path.join(top, f) for f in files)):
                os.chown(entry, NOBODY, NOBODY)
        os.chmod(os.path.join(root, "locked"), 0o555)
        if where == "open":
            os.chmod(root, 0o555)  # no staging directory can be made
        workload = Workload("nobody", {}, {}, tuple(_op(op) for op in ops))
        before = snapshot(root)
        got = nobody.run(_NOBODY_TX, root, src, json.dumps(ops))
        assert got["outcome"] == where, got
        assert got["errno"] == errno.EACCES, got
        if where == "commit":
            assert "rolled back" in got["message"]
        assert snapshot(root) == before
        assert_clean(root)
        # The cause goes: the directory, source or root becomes writable or readable.
        os.chmod(os.path.join(root, "locked"), 0o755)
        os.chmod(root, 0o755)
        os.chmod(os.path.join(src, "secret"), 0o644)
        after = workload.expected(root, src)
        assert (
            nobody.run(
                "import fstx, json, sys; fstx.recover(sys.argv[1]); print('{}')", root
            )
            == {}
        )
        assert nobody.run(_NOBODY_TX, root, src, json.dumps(ops)) == {
            "outcome": "committed"
        }
        assert tree_of(root, after) == after
        assert_clean(root)
    finally:
        _force_rmtree(base)


def test_a_tree_with_read_only_directories_copied_as_an_unprivileged_user(
    nobody: Nobody,
) -> None:
    # A big tree is copied by threads; a read-only directory gets its mode
    # only once its files are in. As root that order would go unnoticed.
    base = tempfile.mkdtemp(prefix="fstx-nobody-")
    try:
        os.chmod(base, 0o755)
        root, src = os.path.join(base, "root"), os.path.join(base, "src")
        spec: Dict[str, Any] = {}
        for d in range(12):
            for f in range(4):
                # A big file in each directory: the threads take those.
                data = f"{d} {f}\n".encode() * (80_000 if f == 0 else 1)
                spec[f"pkg/d{d}/f{f}.py"] = File(data, 0o644)
        build(src, spec)
        build(root, {"keep.txt": b"k\n"})
        for d in range(0, 12, 3):
            os.chmod(os.path.join(src, "pkg", f"d{d}"), 0o555)
        for top, dirs, files in os.walk(base):
            for entry in (top, *(os.path.join(top, n) for n in dirs + files)):
                os.chown(entry, NOBODY, NOBODY, follow_symlinks=False)
        ops = [["copy", "pkg", "lib/pkg"]]
        got = nobody.run(_NOBODY_TX, root, src, json.dumps(ops))
        assert got == {"outcome": "committed"}
        for d in range(12):
            copied = os.path.join(root, "lib", "pkg", f"d{d}")
            assert stat.S_IMODE(os.stat(copied).st_mode) == (
                0o555 if d % 3 == 0 else 0o755
            )
            assert sorted(os.listdir(copied)) == [f"f{f}.py" for f in range(4)]
        assert_clean(root)
    finally:
        _force_rmtree(base)


def _op(op: List[str]) -> Any:
    kind, *args = op
    if kind == "write":
        return Write(args[0], args[1].encode())
    if kind == "copy":
        return Copy(args[0], args[1])
    if kind == "rename":
        return Rename(args[0], args[1])
    return Delete(args[0])


# -- immutable files (chattr +i, EPERM even for root) ------------------------------------------


@pytest.fixture
def immutable() -> Iterator[Callable[[str, bool], None]]:
    """``set(path, on)``: chattr +i / -i; every file still immutable is released at the end."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed (e2fsprogs)")
    held: List[str] = []

    def set_flag(path: str, on: bool) -> None:
        done = subprocess.run(["chattr", "+i" if on else "-i", path],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"chattr does not work here: {done.stderr.strip()}")
        if on:
            held.append(path)
        elif path in held:
            held.remove(path)

    try:
        yield set_flag
    finally:
        for path in held:
            subprocess.run(["chattr", "-i", path], capture_output=True, check=False)


IMMUTABLE_CASES = [
    pytest.param("a.txt", (Write("other.txt", b"first\n"), Write("a.txt", b"new\n")), id="replace-target"),
    pytest.param("a.txt", (Write("other.txt", b"first\n"), Delete("a.txt")), id="delete-target"),
    pytest.param("a.txt", (Rename("other.txt", "moved.txt"), Rename("a.txt", "b.txt")), id="rename-source"),
    pytest.param("dir", (Write("other.txt", b"first\n"), Write("dir/new.txt", b"new\n")), id="create-in-dir"),
    pytest.param("dir", (Write("other.txt", b"first\n"), Delete("dir")), id="delete-dir"),
]  # fmt: skip


@pytest.mark.parametrize(("target", "ops"), IMMUTABLE_CASES)
def test_immutable_file_fails_the_commit_and_rolls_back(
    target: str,
    ops: Tuple[Any, ...],
    immutable: Callable[[str, bool], None],
    tmp_path: Any,
) -> None:
    root = str(tmp_path / "root")
    workload = Workload(
        "immutable",
        {
            "a.txt": File(b"old a\n", 0o640),
            "other.txt": b"other\n",
            "dir/in.txt": b"in\n",
        },
        {},
        ops,
    )
    workload.setup(root, str(tmp_path / "src"))
    path = os.path.join(root, target)
    immutable(path, True)
    before = snapshot(root)
    after = workload.expected(root, "")
    assert attempt(workload, root, "", errno.EPERM) == "commit"
    settled(root, "commit", before, after, target)
    immutable(path, False)
    cause_gone(workload, root, "", "commit", after)


# -- moves across devices ------------------------------------------------------------------

CROSS = Workload(
    name="cross-device",
    before={
        "file.txt": File(b"a file that changes device\n", 0o640),
        "tree/a.txt": b"a\n",
        "tree/sub/b.bin": File(b"b" * (3 * PAGE), 0o600),
        "tree/sub": Dir(0o750),
        "tree/link": Dir(),
        "stays.txt": b"stays\n",
    },
    source={},
    ops=(
        Rename("file.txt", "mnt/file.txt"),
        Rename("tree", "mnt/tree"),
        Rename("mnt/there.txt", "back/here.txt"),
        Rename("mnt/there-dir", "there-dir"),
    ),
)
MOUNT_BEFORE: Spec = {
    "there.txt": File(b"from the mount\n", 0o604),
    "there-dir/x": b"x\n",
}


def test_cross_device_moves_of_files_and_trees(made: Mounts, tmp_path: Any) -> None:
    root = str(tmp_path / "root")
    CROSS.setup(root, str(tmp_path / "src"))
    mnt = made.tmpfs(os.path.join(root, "mnt"), size="1m")
    build(mnt, MOUNT_BEFORE)
    assert os.stat(mnt).st_dev != os.stat(root).st_dev
    after = CROSS.expected(root, "")
    with fstx.transaction(root) as tx:
        CROSS.plan(tx, "")
    # New inodes on the other device; mode bits, contents and mtimes kept.
    assert same_after(root, after, cross=True)
    assert_clean(root)
    assert not os.path.exists(os.path.join(mnt, STAGING))


@pytest.mark.parametrize("what", ["file", "tree"])
def test_cross_device_move_onto_a_full_device(
    what: str, made: Mounts, tmp_path: Any
) -> None:
    moved = "big.bin" if what == "file" else "tree"
    workload = Workload(
        "full-target",
        {"big.bin": File(b"B" * (8 * PAGE), 0o600), "tree/one.bin": b"1" * (3 * PAGE),
         "tree/two.bin": b"2" * (3 * PAGE), "tree/sub/three.txt": b"3\n", "keep": b"k\n"},
        {},
        (Write("keep", b"replaced first\n"), Write("mnt/small.txt", b"fits\n"),
         Rename(moved, "mnt/moved")),
    )  # fmt: skip
    tally: Dict[str, int] = {"open": 0, "plan": 0, "commit": 0, "committed": 0}
    free = 0
    while tally["committed"] == 0:
        assert free < 40, tally
        root = str(tmp_path / f"root-{free}")
        workload.setup(root, str(tmp_path / "src"))
        mnt = made.tmpfs(os.path.join(root, "mnt"), size="1m")
        build(mnt, {"small.txt": b"small\n"})
        before = snapshot(root)
        after = workload.expected(root, "")
        fill_bytes(mnt, free)
        outcome = attempt(workload, root, "", errno.ENOSPC)
        where = f"{what} with {free} pages free on the target"
        settled(root, outcome, before, after, where, cross=True, hide="mnt/filler")
        assert not os.path.exists(os.path.join(mnt, STAGING)), where
        unfill(mnt)
        cause_gone(workload, root, "", outcome, after, cross=True)
        made.unmount(mnt)
        tally[outcome] += 1
        free += 1
    print(f"\ncross-device onto a full device, {what}: {tally}")
    assert tally["plan"] > 0, tally


# -- names and paths -------------------------------------------------------------------------


def _name(kind: str, tag: str) -> str:
    """A name of exactly 255 bytes (or a short odd one) of the given kind."""
    if kind == "ascii-255":
        return (tag + "-" + "n" * 255)[:255]
    if kind == "utf8-255":
        text = tag + "-" + "\u00e9" * 127
        while len(os.fsencode(text)) > 255:
            text = text[:-1]
        return text + "x" * (255 - len(os.fsencode(text)))
    if kind == "non-utf8-255":
        return os.fsdecode(tag.encode() + b"-\xff\xfe" + b"z" * (255 - len(tag) - 3))
    return os.fsdecode(tag.encode() + b"-\xff\xfe\x80 odd")


NAME_KINDS = ["ascii-255", "utf8-255", "non-utf8-255", "non-utf8-short"]


def names_workload(kind: str) -> Workload:
    a, b, c, d, e = (_name(kind, t) for t in ("a", "b", "c", "d", "e"))
    return Workload(
        name=kind,
        before={f"{a}/{b}": File(b"old\n", 0o640), f"{a}/{c}": b"moves\n", d: b"goes\n", "plain": b"p\n"},
        source={f"{e}/{a}": b"copied\n", f"{e}/{b}/{c}": b"deep copied\n"},
        ops=(
            Write(f"{a}/{b}", b"replaced\n"),
            Rename(f"{a}/{c}", f"{b}/{c}"),
            Copy(e, f"{c}/{e}"),
            Mkdir(f"{b}/{e}"),
            Delete(d),
            Write("plain", b"last\n"),
        ),
    )  # fmt: skip


@attrs.define
class FailLastRename:
    """EIO from the last rename of the commit (counted on a clean run)."""

    at: int
    count: int = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in ("rename", "rename_noreplace"):
            self.count += 1
            if self.count == self.at:
                raise OSError(errno.EIO, "injected at the last rename")


@attrs.define
class KillAtRename:
    """SIGKILL this process just before its rename number ``at``."""

    at: int
    count: int = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in ("rename", "rename_noreplace"):
            self.count += 1
            if self.count == self.at:
                os.kill(os.getpid(), signal.SIGKILL)


class CountRenames:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in ("rename", "rename_noreplace"):
            self.count += 1


def crash_in_child(workload: Workload, root: str, src: str, at: int) -> None:
    """A forked child runs ``workload`` and is killed at rename ``at`` (SIGKILL, no clean-up)."""
    pid = os.fork()
    if pid == 0:
        try:
            _os.set_hook(KillAtRename(at))
            with fstx.transaction(root) as tx:
                workload.plan(tx, src)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL


def recover_fresh(root: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import fstx, sys; fstx.recover(sys.argv[1])", root],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def commit_fail_crash(
    workload: Workload, make: Callable[[str, str], None], look: Callable[[str], Snapshot],
    base: str,
) -> Tuple[int, int]:  # fmt: skip
    """Commit, fail at the last rename, and crash mid-commit: each on a fresh tree.

    Returns the number of renames the commit made and the crash point used.
    """
    roots = {
        w: (os.path.join(base, w, "root"), os.path.join(base, w, "src"))
        for w in ("ok", "fail", "crash")
    }
    root, src = roots["ok"]
    make(root, src)
    after = workload.expected(root, src) if look is snapshot else {}
    counter = CountRenames()
    with installed(counter), fstx.transaction(root) as tx:
        workload.plan(tx, src)
    if look is snapshot:
        assert tree_of(root, after) == after
    assert_clean(root)
    renames = counter.count
    assert renames >= 3
    # A failure at the last rename: every earlier one is undone.
    root, src = roots["fail"]
    make(root, src)
    before = look(root)
    with pytest.raises(fstx.CommitError):
        with installed(FailLastRename(renames)), fstx.transaction(root) as tx:
            workload.plan(tx, src)
    assert look(root) == before
    assert_clean(root)
    # A crash halfway through the renames, recovered by a fresh interpreter.
    root, src = roots["crash"]
    make(root, src)
    before = look(root)
    middle = (renames + 1) // 2 + 1
    crash_in_child(workload, root, src, middle)
    assert fstx.status(root).pending
    recover_fresh(root)
    assert look(root) == before
    assert_clean(root)
    return renames, middle


@pytest.mark.parametrize("kind", NAME_KINDS)
def test_long_and_non_utf8_names_commit_roll_back_and_recover(
    kind: str, tmp_path: Any
) -> None:
    workload = names_workload(kind)
    commit_fail_crash(workload, workload.setup, snapshot, str(tmp_path))


def test_a_name_one_byte_too_long_fails_cleanly(tmp_path: Any) -> None:
    root = str(tmp_path / "root")
    build(root, {"keep.txt": b"keep\n"})
    too_long = "x" * 256
    workload = Workload(
        "too-long",
        {},
        {},
        (Write("keep.txt", b"first\n"), Write(f"dir/{too_long}", b"no\n")),
    )
    before = snapshot(root)
    outcome = attempt(workload, root, "", errno.ENAMETOOLONG)
    assert outcome in ("plan", "commit"), outcome
    settled(root, outcome, before, {}, "a 256-byte name")


# -- paths longer than PATH_MAX ---------------------------------------------------------------

DEPTH = 18
COMPONENT = 240


def deep_parts() -> List[str]:
    return [f"{i:02d}" + "d" * (COMPONENT - 2) for i in range(DEPTH)]


def make_deep(root: str, src: str) -> None:
    """A tree whose deepest paths are longer than PATH_MAX, built through directory fds."""
    os.makedirs(root)
    os.makedirs(src, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in deep_parts():
            os.mkdir(part, dir_fd=fd)
            with _closing(
                os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            ) as sub:
                for name, data in (
                    ("old.txt", b"old\n"),
                    ("moves.txt", b"moves\n"),
                    ("goes.txt", b"goes\n"),
                ):
                    wfd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=sub)
                    os.write(wfd, data)
                    os.close(wfd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def fd_snapshot(root: str) -> Snapshot:
    """:func:`treeutil.snapshot` through directory fds, for paths past PATH_MAX."""
    out: Snapshot = {}

    def visit(dfd: int, rel: str) -> None:
        for name in sorted(os.listdir(dfd)):
            if not rel and name == STAGING:
                continue
            child = f"{rel}/{name}" if rel else name
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[child] = ("link", os.readlink(name, dir_fd=dfd))
            elif stat.S_ISDIR(st.st_mode):
                out[child] = ("dir", mode)
                with _closing(
                    os.open(
                        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd
                    )
                ) as sub:
                    visit(sub, child)
            else:
                with _closing(
                    os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                ) as ffd:
                    data = b""
                    while chunk := os.read(ffd, 1 << 16):
                        data += chunk
                out[child] = ("file", mode, data, st.st_ino, st.st_mtime_ns)

    with _closing(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) as top:
        visit(top, "")
    return out


def test_paths_longer_than_path_max_commit_roll_back_and_recover(tmp_path: Any) -> None:
    parts = deep_parts()
    deep = "/".join(parts)
    assert (
        len(os.fsencode(os.path.join(str(tmp_path), "ok", "root", deep, "new.txt")))
        > 4096
    )
    workload = Workload(
        "deep",
        {},
        {},
        (
            Write(f"{deep}/new.txt", b"new, past PATH_MAX\n"),
            Write(f"{deep}/old.txt", b"replaced\n"),
            Rename(f"{deep}/moves.txt", f"{'/'.join(parts[:-1])}/moved.txt"),
            Delete(f"{deep}/goes.txt"),
            Mkdir(f"{deep}/more/{'m' * 200}"),
            Write(f"{'/'.join(parts[:8])}/mid.txt", b"halfway\n"),
        ),
    )
    commit_fail_crash(workload, make_deep, fd_snapshot, str(tmp_path))
    # The committed tree, read back through directory fds.
    got = fd_snapshot(os.path.join(str(tmp_path), "ok", "root"))
    assert got[f"{deep}/new.txt"][:3] == (
        "file",
        0o666 & ~_umask(),
        b"new, past PATH_MAX\n",
    )
    assert got[f"{deep}/old.txt"][2] == b"replaced\n"
    assert f"{deep}/goes.txt" not in got
    assert f"{deep}/moves.txt" not in got
    assert got[f"{'/'.join(parts[:-1])}/moved.txt"][2] == b"moves\n"
    assert got[f"{deep}/more/{'m' * 200}"][0] == "dir"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
