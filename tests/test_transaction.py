"""Tests of the public transaction API (SPEC §1): operations, planning, commit."""

from __future__ import annotations

import errno
import os
import pathlib
import stat
import subprocess
import sys
import textwrap
import threading
import unicodedata
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import attrs
import pytest

import fstx
import mounts
from fstx._platform import impl
from treeutil import (
    Entry,
    FailAt,
    assert_clean,
    installed,
    make_tree,
    snapshot,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX semantics")

UMASK = 0o027
FILE = 0o666 & ~UMASK
DIR = 0o777 & ~UMASK
MTIME = 1_600_000_000_123_456_789
ATIME = 1_500_000_000_987_654_321

Plan = Callable[[fstx.Transaction], None]
Setup = Callable[[pathlib.Path, pathlib.Path], None]


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    """A umask other than the usual 022, so that "less the umask" is visible."""
    old = os.umask(UMASK)
    yield
    os.umask(old)


@pytest.fixture
def outside(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory beside the root (sources of copies, escape targets)."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "f").write_bytes(b"outside")
    return path


def F(data: bytes, mode: int = FILE) -> Entry:
    return ("file", mode, data)


def D(mode: int = DIR) -> Entry:
    return ("dir", mode)


def L(target: str) -> Entry:
    return ("link", target)


def check(root: pathlib.Path, expected: Dict[str, Entry]) -> None:
    """The tree is exactly ``expected`` and staging holds only its lock."""
    assert snapshot(root, inodes=False) == expected
    assert_clean(root)


def tx_on(root: pathlib.Path, **kwargs: Any) -> fstx.Transaction:
    """A transaction without fsync (fast), unless the test asks for durability."""
    kwargs.setdefault("durability", "none")
    return fstx.transaction(root, **kwargs)


def ino(path: pathlib.Path) -> int:
    return os.lstat(path).st_ino


def describe(top: pathlib.Path) -> Dict[str, Tuple[Any, ...]]:
    """Every entry below ``top`` with type, mode bits, content or target and mtime."""
    out: Dict[str, Tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, top)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(full, "rb") as f:
                    data = f.read()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), data, st.st_mtime_ns)
    st = os.lstat(top)
    out["."] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


def build_source_tree(base: pathlib.Path) -> pathlib.Path:
    """A tree with odd modes, every kind of symlink, an empty dir and set mtimes."""
    src = base / "src"
    make_tree(
        src,
        {
            "pkg/__init__.py": b"init",
            "pkg/tool": b"#!/bin/sh\n",
            "pkg/secret": b"s",
            "pkg/sub/deep/data.bin": bytes(range(256)),
            "pkg/empty": None,
        },
    )
    os.chmod(src / "pkg/tool", 0o755)
    os.chmod(src / "pkg/secret", 0o600)
    os.symlink("tool", src / "pkg/rel-link")
    os.symlink("/nonexistent/target", src / "pkg/abs-dangling")
    os.symlink("sub/deep", src / "pkg/dir-link")
    os.chmod(src / "pkg/sub", 0o711)
    for i, path in enumerate(
        ["pkg/__init__.py", "pkg/tool", "pkg/secret", "pkg/sub/deep/data.bin"]
    ):
        os.utime(src / path, ns=(ATIME, MTIME + i))
    for path in ["pkg/sub/deep", "pkg/sub", "pkg/empty", "pkg"]:
        os.utime(src / path, ns=(ATIME, MTIME - 7))
    return src / "pkg"


# -- copy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(0o755, id="0755"),
        pytest.param(0o600, id="0600"),
        pytest.param(0o444, id="0444-read-only"),
        pytest.param(0o4750, id="04750-setuid"),
    ],
)
def test_copy_file_from_outside_keeps_mode_and_mtime(
    root: pathlib.Path, outside: pathlib.Path, mode: int
) -> None:
    src = outside / "tool"
    src.write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src, mode)
    os.utime(src, ns=(ATIME, MTIME))
    with tx_on(root) as tx:
        tx.copy(src, "bin/tool")
    check(root, {"bin": D(), "bin/tool": F(b"#!/bin/sh\necho hi\n", mode)})
    assert os.lstat(root / "bin/tool").st_mtime_ns == MTIME
    assert os.lstat(src).st_ino != ino(root / "bin/tool")


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("f", id="relative"),
        pytest.param("/etc/passwd", id="absolute-outside"),
        pytest.param("../../nowhere", id="dangling"),
    ],
)
def test_copy_symlink_from_outside_copies_the_link(
    root: pathlib.Path, outside: pathlib.Path, target: str
) -> None:
    os.symlink(target, outside / "link")
    with tx_on(root) as tx:
        tx.copy(outside / "link", "lib/link")
    check(root, {"lib": D(), "lib/link": L(target)})


def test_copy_symlink_with_follow_symlinks_copies_the_target(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    os.chmod(outside / "f", 0o751)
    os.utime(outside / "f", ns=(ATIME, MTIME))
    os.symlink("f", outside / "link")
    with tx_on(root) as tx:
        tx.copy(outside / "link", "copied", follow_symlinks=True)
    check(root, {"copied": F(b"outside", 0o751)})
    assert os.lstat(root / "copied").st_mtime_ns == MTIME


def test_copy_tree_from_outside_is_exact(
    root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    src = build_source_tree(tmp_path)
    with tx_on(root) as tx:
        tx.copy(src, "site-packages/pkg")
    assert describe(root / "site-packages/pkg") == describe(src)
    assert snapshot(root, inodes=False)["site-packages"] == D()
    assert_clean(root)


def build_wide_tree(base: pathlib.Path, dirs: int, per_dir: int) -> pathlib.Path:
    """A tree big enough to be copied by threads: odd modes, set mtimes, links."""
    src = base / "wide"
    for d in range(dirs):
        sub = src / f"d{d % 7}" / f"s{d}"
        sub.mkdir(parents=True)
        for f in range(per_dir):
            path = sub / f"f{f}.py"
            path.write_bytes(f"{d}/{f}\n".encode() * (d + f + 1))
            os.chmod(path, 0o755 if f % 3 == 0 else 0o640)
            os.utime(path, ns=(ATIME, MTIME + d * 100 + f))
        os.symlink(f"f{per_dir - 1}.py", sub / "link")
        if d % 5 == 0:
            os.chmod(sub, 0o555)  # its files must go in before its mode does
        os.utime(sub, ns=(ATIME, MTIME - d), follow_symlinks=False)
    return src


@pytest.mark.parametrize(
    ("dirs", "per_dir"),
    [
        pytest.param(3, 10, id="one-batch"),
        pytest.param(150, 2, id="more-directories-than-a-batch-holds"),
    ],
)
def test_copy_of_a_big_tree_uses_threads_and_is_exact(
    root: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    dirs: int,
    per_dir: int,
) -> None:
    src = build_wide_tree(tmp_path, dirs, per_dir)
    threads: Set[str] = set()
    copy_file = fstx._transaction._copy_file

    def spy(job: Any, no_clone: Set[int], no_link: Set[int]) -> None:
        threads.add(threading.current_thread().name)
        copy_file(job, no_clone, no_link)

    monkeypatch.setattr(fstx._transaction, "_copy_file", spy)
    monkeypatch.setattr(fstx._transaction, "_POOL_MIN_SIZE", 0)  # small files too
    with tx_on(root) as tx:
        tx.copy(src, "pkg")
    assert describe(root / "pkg") == describe(src)
    assert_clean(root)
    if fstx._transaction._POOL_THREADS > 1:
        assert threads
        assert all(t.startswith("fstx-copy") for t in threads)


def test_a_failed_copy_in_a_thread_fails_the_call_and_leaves_the_plan(
    root: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = build_wide_tree(tmp_path, 4, 10)
    make_tree(root, {"kept": b"k"})
    before = snapshot(root)
    copy_file = fstx._transaction._copy_file

    def disk_full_at_one(job: Any, no_clone: Set[int], no_link: Set[int]) -> None:
        if job.name == "f5.py" and job.parent.path.endswith("s2"):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        copy_file(job, no_clone, no_link)

    monkeypatch.setattr(fstx._transaction, "_copy_file", disk_full_at_one)
    monkeypatch.setattr(fstx._transaction, "_POOL_MIN_SIZE", 0)
    tx = tx_on(root)
    tx.write_bytes("first", b"1")
    with pytest.raises(OSError) as info:
        tx.copy(src, "pkg")
    assert info.value.errno == errno.ENOSPC
    assert not isinstance(info.value, fstx.FstxError)
    assert [op.path for op in tx.operations] == ["first"]
    assert not tx.exists("pkg")
    staged = [
        name for area in (root / ".fstx").glob("tx-*") for name in os.listdir(area)
    ]
    assert len(staged) == 1  # "first" only: the half-copied tree is gone
    monkeypatch.setattr(fstx._transaction, "_copy_file", copy_file)
    tx.copy(src, "pkg")
    tx.commit()
    assert describe(root / "pkg") == describe(src)
    assert snapshot(root)["kept"] == before["kept"]
    assert_clean(root)


def _inode(path: pathlib.Path) -> Tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


@pytest.mark.parametrize(
    ("dirs", "per_dir"),
    [pytest.param(1, 3, id="few-files"), pytest.param(6, 8, id="threads")],
)
def test_copy_with_link_installs_the_cached_files_themselves(
    root: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    dirs: int,
    per_dir: int,
) -> None:
    monkeypatch.setattr(fstx._transaction, "_POOL_MIN_SIZE", 0)  # threads: any size
    cache = build_wide_tree(tmp_path, dirs, per_dir)
    (tmp_path / "single").write_bytes(b"one file")
    cached = describe(cache)
    make_tree(root, {"bin/tool": b"old tool"})
    with tx_on(root) as tx:
        tx.copy(cache, "lib/pkg", link=True)
        tx.copy(tmp_path / "single", "bin/tool", link=True)  # replaces a file
    assert describe(root / "lib/pkg") == cached
    assert describe(cache) == cached  # the cache is as it was
    files = [p for p in cache.rglob("*") if p.is_file() and not p.is_symlink()]
    assert files
    for path in files:
        installed = root / "lib/pkg" / path.relative_to(cache)
        assert _inode(installed) == _inode(path)
        assert os.lstat(path).st_nlink == 2
    assert _inode(root / "bin/tool") == _inode(tmp_path / "single")
    # Symlinks and directories are made anew; only regular files are shared.
    link = next(p for p in cache.rglob("link"))
    assert _inode(root / "lib/pkg" / link.relative_to(cache)) != _inode(link)
    assert_clean(root)


def test_a_rolled_back_linked_copy_leaves_the_cache_alone(
    root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    cache = build_wide_tree(tmp_path, 4, 5)
    cached = describe(cache)
    tx = tx_on(root)
    tx.copy(cache, "pkg", link=True)
    tx.rollback()
    assert describe(cache) == cached
    assert all(
        os.lstat(p).st_nlink == 1
        for p in cache.rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    assert sorted(os.listdir(root)) == [".fstx"]
    assert_clean(root)


@pytest.fixture
def made() -> Iterator[mounts.Mounts]:
    """Mounts for one test (root only), undone when it ends."""
    reason = mounts.why_no_mounts()
    if reason is not None:
        pytest.skip(reason)
    made = mounts.Mounts()
    try:
        yield made
    finally:
        made.close()


def test_copy_with_link_from_another_file_system_copies_and_asks_once(
    root: pathlib.Path, tmp_path: pathlib.Path, made: mounts.Mounts
) -> None:
    other = pathlib.Path(made.tmpfs(str(tmp_path / "cache")))
    cache = build_wide_tree(other, 2, 3)
    asked: List[str] = []

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name == "link_in" and phase == "before":
            asked.append(args[0])

    with installed(hook), tx_on(root) as tx:
        tx.copy(cache, "pkg", link=True)
    assert describe(root / "pkg") == describe(cache)
    assert len(asked) == 1  # EXDEV once: the other files were copied at once
    for path in cache.rglob("*.py"):
        assert _inode(root / "pkg" / path.relative_to(cache)) != _inode(path)
    assert_clean(root)


def test_a_link_to_a_file_swapped_since_it_was_looked_at_is_not_kept(
    root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # The cache entry was replaced between the stat and the link: the link
    # names another file, so it is removed again and the caller copies.
    (tmp_path / "looked-at").write_bytes(b"a")
    (tmp_path / "now-there").write_bytes(b"b")
    st = os.lstat(tmp_path / "looked-at")
    d = impl.open_root(str(root))
    try:
        linked = fstx._transaction._linked(
            str(tmp_path / "now-there"), d, "x", st, False, set()
        )
    finally:
        impl.close_dir(d)
    assert not linked
    assert os.listdir(root) == []


@pytest.mark.parametrize("works", [True, False], ids=["cloned", "refused"])
def test_copies_are_clones_where_the_platform_makes_them(
    root: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    works: bool,
) -> None:
    # macOS makes a file by fclonefileat(); Linux has no such call (it clones
    # inside copy_fd). Its logic, driven here through the seam with a stand-in.
    cache = build_wide_tree(tmp_path, 5, 6)
    (tmp_path / "single").write_bytes(b"single file")
    cloned: List[str] = []
    copied: List[int] = []
    asked: List[str] = []
    copy_fd = fstx._os.copy_fd

    def clone_into(src: int, d: Any, name: str) -> bool:
        asked.append(name)
        if not works:
            return False  # HFS+, another volume: ENOTSUP, EXDEV
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=d.fd)
        try:
            os.write(fd, os.pread(src, 1 << 20, 0))
        finally:
            os.close(fd)
        cloned.append(name)
        return True

    def counting_copy_fd(src: int, dst: int, clone: bool = True) -> bool:
        copied.append(dst)
        return copy_fd(src, dst, clone)

    monkeypatch.setattr(fstx._transaction, "_CLONE_FILES", True)
    monkeypatch.setattr(fstx._os, "clone_into", clone_into)
    monkeypatch.setattr(fstx._os, "copy_fd", counting_copy_fd)
    with tx_on(root) as tx:
        tx.copy(cache, "pkg")
        tx.copy(tmp_path / "single", "single")
    assert describe(root / "pkg") == describe(cache)
    assert (root / "single").read_bytes() == b"single file"
    files = 5 * 6 + 1
    if works:
        assert (len(cloned), len(copied)) == (files, 0)
    else:
        assert (len(asked), len(copied)) == (1, files)  # asked once per device
    assert_clean(root)


COPY_WITH_FEW_DESCRIPTORS = """
import os, resource, sys
import fstx
resource.setrlimit(resource.RLIMIT_NOFILE, (150, 150))
fstx._transaction._POOL_MIN_SIZE = 0  # every file to the threads, as big ones go
with fstx.transaction(sys.argv[1], durability="none") as tx:
    tx.copy(sys.argv[2], "pkg")
"""


def test_a_tree_copy_needs_few_descriptors(
    root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # 150 directories, a limit of 150 open files (macOS starts at 256): the
    # root keeps up to 64 directory handles, a batch of the copy 32 more, and
    # the threads a few files each. A handle per directory would not fit.
    src = build_wide_tree(tmp_path, 150, 2)
    run = subprocess.run(
        [sys.executable, "-c", COPY_WITH_FEW_DESCRIPTORS, str(root), str(src)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert describe(root / "pkg") == describe(src)
    assert_clean(root)


def test_copy_tree_with_follow_symlinks_copies_targets(
    root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    src = build_source_tree(tmp_path)
    os.unlink(src / "abs-dangling")
    with tx_on(root) as tx:
        tx.copy(src, "pkg", follow_symlinks=True)
    check(
        root,
        {
            "pkg": D(),
            "pkg/__init__.py": F(b"init"),
            "pkg/dir-link": D(),
            "pkg/dir-link/data.bin": F(bytes(range(256))),
            "pkg/empty": D(),
            "pkg/rel-link": F(b"#!/bin/sh\n", 0o755),
            "pkg/secret": F(b"s", 0o600),
            "pkg/sub": D(0o711),
            "pkg/sub/deep": D(),
            "pkg/sub/deep/data.bin": F(bytes(range(256))),
            "pkg/tool": F(b"#!/bin/sh\n", 0o755),
        },
    )


def test_exists_answers_for_the_planned_tree(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    (root / "keep").write_bytes(b"k")
    (root / "gone").mkdir()
    (root / "gone" / "f").write_bytes(b"f")
    (root / "moved").write_bytes(b"m")
    (root / "dangling").symlink_to("nowhere")
    (root / "link").symlink_to("gone")
    tx = tx_on(root)
    assert tx.exists("keep")
    assert tx.exists(root / "keep")  # absolute inside the root
    assert tx.exists(".")
    assert tx.exists(root)
    assert tx.exists("dangling")  # a symlink is itself
    assert tx.exists("link/f")  # a symlink in the parents is resolved
    assert not tx.exists("missing")
    assert not tx.exists("missing/below")
    tx.write_bytes("new/dir/file", b"x")
    tx.delete("gone")
    tx.rename("moved", "there/moved")
    tx.copy(outside, "tree")
    assert tx.exists("new")
    assert tx.exists("new/dir/file")
    assert not tx.exists("gone")
    assert not tx.exists("gone/f")
    assert not tx.exists("link/f")
    assert not tx.exists("moved")
    assert tx.exists("there/moved")
    assert tx.exists("tree/f")
    assert not tx.exists("tree/g")
    tx.rollback()
    assert not (root / "new").exists()


def test_exists_refuses_paths_it_cannot_answer_for(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    tx = tx_on(root)
    with pytest.raises(fstx.PlanError, match="outside the root"):
        tx.exists(outside / "f")
    with pytest.raises(fstx.PlanError, match="outside the root"):
        tx.exists("../outside/f")
    with pytest.raises(fstx.PlanError, match="staging"):
        tx.exists(".fstx/x")
    tx.rollback()
    with pytest.raises(fstx.PlanError, match="already committed or rolled back"):
        tx.exists("x")


def test_a_write_after_exists_sees_what_was_planned_between(
    root: pathlib.Path,
) -> None:
    # exists() lets the next write skip its own lookup: only while nothing
    # else was planned in between.
    tx = tx_on(root)
    assert not tx.exists("a/f")
    tx.mkdir("a/f")
    with pytest.raises(fstx.PlanError, match="directory is in the way"):
        tx.write_bytes("a/f", b"x")
    assert not tx.exists("b")
    tx.write_bytes("c", b"c")  # another path: looked up as usual
    tx.write_bytes("b", b"b")
    assert not tx.exists("d/e")
    with tx.open("d/e") as f:
        f.write(b"e")
    tx.commit()
    check(
        root,
        {"a": D(), "a/f": D(), "b": F(b"b"), "c": F(b"c"), "d": D(), "d/e": F(b"e")},
    )


def test_copy_reads_the_source_when_called(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    tx = tx_on(root)
    tx.copy(outside / "f", "f")
    (outside / "f").write_bytes(b"changed later")
    tx.commit()
    check(root, {"f": F(b"outside")})


def test_copy_asks_for_a_clone_once_per_source_device(
    root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # A file system that cannot clone (ext4, tmpfs) says so on the first file;
    # the others go straight to copy_file_range. One that can keeps cloning.
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(b"x" * (i + 1) * 1000)
    probe = impl.open_root(str(root))
    try:
        a = os.open(src / "f0", os.O_RDONLY)
        b = impl.open_file(probe, "probe", os.O_WRONLY | os.O_CREAT)
        try:
            can_clone = impl.copy_fd(a, b)
        finally:
            os.close(a)
            os.close(b)
        os.unlink(root / "probe")
    finally:
        impl.close_dir(probe)
    asked: List[bool] = []

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name == "copy_fd" and phase == "before":
            asked.append(args[2])

    tx = tx_on(root)
    with installed(hook):
        for i in range(4):
            tx.copy(src / f"f{i}", f"d/f{i}")
    tx.commit()
    assert asked == [True] * 4 if can_clone else [True, False, False, False]
    expected = {f"d/f{i}": F(b"x" * (i + 1) * 1000) for i in range(4)}
    check(root, {"d": D(), **expected})


def test_copy_inside_root_relative_and_absolute(root: pathlib.Path) -> None:
    make_tree(root, {"a.txt": b"A", "pkg/x.py": b"x", "pkg/sub/y.py": b"y"})
    os.chmod(root / "a.txt", 0o700)
    os.utime(root / "a.txt", ns=(ATIME, MTIME))
    os.symlink("a.txt", root / "link")
    with tx_on(root) as tx:
        tx.copy("a.txt", "b.txt")
        tx.copy(root / "pkg", "pkg2")
        tx.copy("link", "link2")
        tx.copy(pathlib.Path("link"), "deref", follow_symlinks=True)
    check(
        root,
        {
            "a.txt": F(b"A", 0o700),
            "b.txt": F(b"A", 0o700),
            "deref": F(b"A", 0o700),
            "link": L("a.txt"),
            "link2": L("a.txt"),
            "pkg": D(),
            "pkg/sub": D(),
            "pkg/sub/y.py": F(b"y"),
            "pkg/x.py": F(b"x"),
            "pkg2": D(),
            "pkg2/sub": D(),
            "pkg2/sub/y.py": F(b"y"),
            "pkg2/x.py": F(b"x"),
        },
    )
    for name in ("b.txt", "deref"):
        assert os.lstat(root / name).st_mtime_ns == MTIME
        assert ino(root / name) != ino(root / "a.txt")


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("inside", id="from-inside-root"),
        pytest.param("outside", id="from-outside"),
    ],
)
def test_copy_tree_follow_symlinks_follows_nested_links(
    root: pathlib.Path, outside: pathlib.Path, where: str
) -> None:
    base = root if where == "inside" else outside
    make_tree(base, {"pkg/real": b"R", "pkg/sub/deep": b"D"})
    os.chmod(base / "pkg/real", 0o700)
    os.symlink("real", base / "pkg/file-link")
    os.symlink("sub", base / "pkg/dir-link")
    os.symlink("pkg", base / "top-link")
    src = "top-link" if where == "inside" else str(outside / "top-link")
    before = snapshot(root, inodes=False)
    with tx_on(root) as tx:
        tx.copy(src, "copy", follow_symlinks=True)
    assert snapshot(root, inodes=False) == {
        **before,
        "copy": D(),
        "copy/dir-link": D(),
        "copy/dir-link/deep": F(b"D"),
        "copy/file-link": F(b"R", 0o700),
        "copy/real": F(b"R", 0o700),
        "copy/sub": D(),
        "copy/sub/deep": F(b"D"),
    }
    assert_clean(root)


@pytest.mark.parametrize(
    "existing",
    [
        pytest.param("file", id="over-file"),
        pytest.param("symlink", id="over-symlink"),
    ],
)
def test_copy_replaces_file_or_symlink(
    root: pathlib.Path, outside: pathlib.Path, existing: str
) -> None:
    make_tree(root, {"target.txt": b"T"})
    if existing == "file":
        (root / "dst").write_bytes(b"old")
    else:
        os.symlink("target.txt", root / "dst")
    with tx_on(root) as tx:
        tx.copy(outside / "f", "dst")
    check(root, {"dst": F(b"outside"), "target.txt": F(b"T")})


# -- rename ----------------------------------------------------------------------


def test_rename_file_dir_and_symlink_keep_their_inodes(root: pathlib.Path) -> None:
    make_tree(root, {"a.txt": b"A", "pkg/x.py": b"x", "pkg/sub/y": b"y"})
    os.chmod(root / "a.txt", 0o604)
    os.symlink("pkg/x.py", root / "link")
    before = {n: ino(root / n) for n in ("a.txt", "pkg", "link")}
    mtime = os.lstat(root / "a.txt").st_mtime_ns
    with tx_on(root) as tx:
        tx.rename("a.txt", "moved/b.txt")
        tx.rename("pkg", "lib/pkg")
        tx.rename("link", "link2")
    check(
        root,
        {
            "lib": D(),
            "lib/pkg": D(),
            "lib/pkg/sub": D(),
            "lib/pkg/sub/y": F(b"y"),
            "lib/pkg/x.py": F(b"x"),
            "link2": L("pkg/x.py"),
            "moved": D(),
            "moved/b.txt": F(b"A", 0o604),
        },
    )
    assert ino(root / "moved/b.txt") == before["a.txt"]
    assert os.lstat(root / "moved/b.txt").st_mtime_ns == mtime
    assert ino(root / "lib/pkg") == before["pkg"]
    assert ino(root / "link2") == before["link"]


@pytest.mark.parametrize(
    "existing",
    [
        pytest.param("file", id="over-file"),
        pytest.param("symlink", id="over-symlink"),
    ],
)
def test_rename_replaces_file_or_symlink(root: pathlib.Path, existing: str) -> None:
    make_tree(root, {"new.py": b"new", "other": b"other"})
    if existing == "file":
        (root / "old.py").write_bytes(b"old")
    else:
        os.symlink("other", root / "old.py")
    moved = ino(root / "new.py")
    with tx_on(root) as tx:
        tx.rename("new.py", "old.py")
    check(root, {"old.py": F(b"new"), "other": F(b"other")})
    assert ino(root / "old.py") == moved


def test_rename_onto_itself_changes_nothing(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    with tx_on(root) as tx:
        tx.rename("a", "a")
    assert snapshot(root) == before
    assert_clean(root)


# -- delete ----------------------------------------------------------------------


def test_delete_file_tree_and_symlinks_never_their_targets(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    make_tree(
        root,
        {"a.txt": b"A", "keep/k": b"k", "pkg/x.py": b"x", "pkg/sub/deep/y": b"y"},
    )
    os.symlink("keep/k", root / "file-link")
    os.symlink("keep", root / "dir-link")
    os.symlink(str(outside), root / "out-link")
    os.symlink("missing", root / "dangling")
    os.symlink(str(outside), root / "pkg/inner-out-link")
    outside_before = snapshot(outside)
    with tx_on(root) as tx:
        for name in ("a.txt", "pkg", "file-link", "dir-link", "out-link", "dangling"):
            tx.delete(name)
    check(root, {"keep": D(), "keep/k": F(b"k")})
    assert snapshot(outside) == outside_before


def test_delete_missing_ok(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    with tx_on(root) as tx:
        tx.delete("missing", missing_ok=True)
        tx.delete("no/such/dir", missing_ok=True)
    assert snapshot(root) == before
    assert_clean(root)


# -- write -------------------------------------------------------------------------


def test_write_new_files_get_default_mode(root: pathlib.Path) -> None:
    with tx_on(root) as tx:
        tx.write_bytes("bin/data", b"\x00\x01")
        tx.write_text("etc/conf.txt", "caf\u00e9\n")
    check(
        root,
        {
            "bin": D(),
            "bin/data": F(b"\x00\x01"),
            "etc": D(),
            "etc/conf.txt": F("caf\u00e9\n".encode()),
        },
    )


def test_write_replaced_file_keeps_its_mode(root: pathlib.Path) -> None:
    make_tree(root, {"tool": b"old", "conf": b"old"})
    os.chmod(root / "tool", 0o751)
    os.chmod(root / "conf", 0o400)
    old = ino(root / "tool")
    with tx_on(root) as tx:
        tx.write_bytes("tool", b"new tool")
        tx.write_text("conf", "new conf")
    check(root, {"conf": F(b"new conf", 0o400), "tool": F(b"new tool", 0o751)})
    assert ino(root / "tool") != old


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(0o755, id="0755"),
        pytest.param(0o600, id="0600"),
        pytest.param(0o777, id="0777-not-masked"),
    ],
)
def test_write_with_explicit_mode(root: pathlib.Path, mode: int) -> None:
    make_tree(root, {"old": b"x"})
    os.chmod(root / "old", 0o640)
    with tx_on(root) as tx:
        tx.write_bytes("new", b"n", mode=mode)
        tx.write_text("old", "o", mode=mode)
    check(root, {"new": F(b"n", mode), "old": F(b"o", mode)})


def test_write_text_encoding(root: pathlib.Path) -> None:
    with tx_on(root) as tx:
        tx.write_text("latin", "caf\u00e9", encoding="latin-1")
        tx.write_text("utf16", "hi", encoding="utf-16-le")
    check(root, {"latin": F(b"caf\xe9"), "utf16": F(b"h\x00i\x00")})


def test_write_replaces_symlink_not_its_target(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    os.chmod(outside / "f", 0o700)
    os.symlink(str(outside / "f"), root / "link")
    with tx_on(root) as tx:
        tx.write_bytes("link", b"now a file")
    check(root, {"link": F(b"now a file")})
    assert (outside / "f").read_bytes() == b"outside"


# -- open ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kwargs", "payload", "expected"),
    [
        pytest.param("wb", {}, b"\x00bin\xff", b"\x00bin\xff", id="binary"),
        pytest.param("w", {}, "caf\u00e9", "caf\u00e9".encode(), id="text-utf8"),
        pytest.param(
            "wt", {"encoding": "latin-1"}, "caf\u00e9", b"caf\xe9", id="text-latin1"
        ),
    ],
)
def test_open_writes_content(
    root: pathlib.Path,
    mode: str,
    kwargs: Dict[str, Any],
    payload: Any,
    expected: bytes,
) -> None:
    with tx_on(root) as tx:
        with tx.open("dir/out", mode, **kwargs) as f:
            f.write(payload)
    check(root, {"dir": D(), "dir/out": F(expected)})


def test_open_file_mode_and_replaced_mode(root: pathlib.Path) -> None:
    make_tree(root, {"kept": b"old"})
    os.chmod(root / "kept", 0o701)
    with tx_on(root) as tx:
        with tx.open("exe", file_mode=0o755) as f:
            f.write(b"#!")
        with tx.open("kept") as f:
            f.write(b"new")
    check(root, {"exe": F(b"#!", 0o755), "kept": F(b"new", 0o701)})


def test_open_exception_in_block_stages_nothing(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    tx = tx_on(root)
    boom = KeyError("boom")
    with pytest.raises(KeyError) as info:
        with tx.open("new/dir/f") as f:
            f.write(b"partial")
            raise boom
    assert info.value is boom
    with pytest.raises(RuntimeError):
        with tx.open("a", "w") as f:
            f.write("partial")
            raise RuntimeError
    assert tx.operations == ()
    tx.commit()
    assert snapshot(root) == before
    assert_clean(root)


def test_open_refuses_a_read_mode(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    tx = tx_on(root)
    with pytest.raises(fstx.PlanError) as info:
        with tx.open("a", "rb"):
            pass  # pragma: no cover - never entered
    assert info.value.operation == "open"
    tx.rollback()
    assert snapshot(root) == before
    assert_clean(root)


# -- mkdir and chmod ---------------------------------------------------------------


def test_mkdir_parents_mode_and_existing(root: pathlib.Path) -> None:
    make_tree(root, {"old/f": b"f"})
    os.chmod(root / "old", 0o700)
    with tx_on(root) as tx:
        tx.mkdir("a/b/c", mode=0o775)
        tx.mkdir("old", mode=0o777)
        tx.mkdir("plain")
        tx.mkdir("a/b")  # planned already: fine too
    check(
        root,
        {
            "a": D(),
            "a/b": D(),
            "a/b/c": D(0o775 & ~UMASK),
            "old": D(0o700),
            "old/f": F(b"f"),
            "plain": D(),
        },
    )


def test_chmod_existing_items(root: pathlib.Path) -> None:
    make_tree(root, {"f": b"f", "d/x": b"x"})
    old = ino(root / "f")
    with tx_on(root) as tx:
        tx.chmod("f", 0o755)
        tx.chmod("d", 0o700)
        tx.chmod("d/x", 0o4711)
    check(
        root,
        {"d": D(0o700), "d/x": F(b"x", 0o4711), "f": F(b"f", 0o755)},
    )
    assert ino(root / "f") == old


def test_chmod_planned_items(root: pathlib.Path, outside: pathlib.Path) -> None:
    make_tree(root, {"pkg/x": b"x", "kept": b"k"})
    with tx_on(root) as tx:
        tx.write_bytes("new", b"n")
        tx.chmod("new", 0o700)
        tx.copy(outside, "copied")
        tx.chmod("copied/f", 0o711)
        tx.chmod("copied", 0o751)
        tx.rename("pkg", "moved")
        tx.chmod("moved/x", 0o600)
        tx.mkdir("made/deep")
        tx.chmod("made", 0o701)
        tx.chmod("kept", 0o604)
        tx.write_bytes("kept", b"replaced")  # keeps the planned mode
    check(
        root,
        {
            "copied": D(0o751),
            "copied/f": F(b"outside", 0o711),
            "kept": F(b"replaced", 0o604),
            "made": D(0o701),
            "made/deep": D(),
            "moved": D(),
            "moved/x": F(b"x", 0o600),
            "new": F(b"n", 0o700),
        },
    )


# -- planning rules ----------------------------------------------------------------


def _new_pkg(root: pathlib.Path, outside: pathlib.Path) -> None:
    make_tree(outside, {"newpkg/mod.py": b"new"})


PLANNED = [
    pytest.param(
        {"pkg/old.py": b"old", "pkg/sub/o": b"o"},
        lambda tx, out: (tx.delete("pkg"), tx.copy(out / "newpkg", "pkg")),
        {"pkg": D(), "pkg/mod.py": F(b"new")},
        id="delete-then-copy-same-name",
    ),
    pytest.param(
        {},
        lambda tx, out: (tx.write_bytes("a", b"A"), tx.rename("a", "dir/b")),
        {"dir": D(), "dir/b": F(b"A")},
        id="write-then-rename",
    ),
    pytest.param(
        {"pkg/x": b"x"},
        lambda tx, out: (
            tx.rename("pkg", "lib/pkg"),
            tx.write_bytes("lib/pkg/new", b"N"),
            tx.write_bytes("lib/pkg/x", b"X2"),
        ),
        {"lib": D(), "lib/pkg": D(), "lib/pkg/new": F(b"N"), "lib/pkg/x": F(b"X2")},
        id="rename-then-write-inside",
    ),
    pytest.param(
        {"pkg/x": b"x", "pkg/gone": b"g"},
        lambda tx, out: (
            tx.write_bytes("pkg/planned", b"P"),
            tx.delete("pkg/gone"),
            tx.chmod("pkg/x", 0o700),
            tx.copy("pkg", "pkg-copy"),
        ),
        {
            "pkg": D(),
            "pkg/planned": F(b"P"),
            "pkg/x": F(b"x", 0o700),
            "pkg-copy": D(),
            "pkg-copy/planned": F(b"P"),
            "pkg-copy/x": F(b"x", 0o700),
        },
        id="copy-of-planned-subtree",
    ),
    pytest.param(
        {"a": b"A"},
        lambda tx, out: (tx.rename("a", "b"), tx.rename("b", "c"), tx.rename("c", "d")),
        {"d": F(b"A")},
        id="chained-renames",
    ),
    pytest.param(
        {"a": b"A", "b": b"B"},
        lambda tx, out: (tx.rename("a", "t"), tx.rename("b", "a"), tx.rename("t", "b")),
        {"a": F(b"B"), "b": F(b"A")},
        id="swap-through-temp",
    ),
    pytest.param(
        {"a": b"A"},
        lambda tx, out: (tx.rename("a", "b"), tx.write_bytes("a", b"new A")),
        {"a": F(b"new A"), "b": F(b"A")},
        id="rename-then-write-old-name",
    ),
    pytest.param(
        {"keep": b"k"},
        lambda tx, out: (tx.write_bytes("d/f", b"x"), tx.delete("d")),
        {"keep": F(b"k")},
        id="write-then-delete-parent",
    ),
    pytest.param(
        {"d/f": b"x"},
        lambda tx, out: (tx.delete("d"), tx.write_bytes("d", b"file now")),
        {"d": F(b"file now")},
        id="delete-dir-then-write-file",
    ),
    pytest.param(
        {"f": b"x"},
        lambda tx, out: (tx.delete("f"), tx.mkdir("f/sub")),
        {"f": D(), "f/sub": D()},
        id="delete-file-then-mkdir",
    ),
    pytest.param(
        {"a/x": b"x"},
        lambda tx, out: (
            tx.rename("a", "b"),
            tx.rename("b/x", "a2/x"),
            tx.rename("b", "c"),
        ),
        {"a2": D(), "a2/x": F(b"x"), "c": D()},
        id="rename-out-of-renamed-dir",
    ),
    pytest.param(
        {"a": b"1"},
        lambda tx, out: (
            tx.write_bytes("a", b"2"),
            tx.write_bytes("a", b"3"),
            tx.copy("a", "b"),
        ),
        {"a": F(b"3"), "b": F(b"3")},
        id="rewrites-then-copy-sees-last",
    ),
    pytest.param(
        {"pkg/x": b"x"},
        lambda tx, out: (
            tx.copy(out / "newpkg", "pkg/vendored"),
            tx.rename("pkg", "pkg2"),
            tx.delete("pkg2/x"),
        ),
        {"pkg2": D(), "pkg2/vendored": D(), "pkg2/vendored/mod.py": F(b"new")},
        id="copy-into-dir-then-move-dir",
    ),
]


@pytest.mark.parametrize(("setup", "plan", "expected"), PLANNED)
def test_each_operation_sees_the_planned_state(
    root: pathlib.Path,
    outside: pathlib.Path,
    setup: Dict[str, Optional[bytes]],
    plan: Callable[[fstx.Transaction, pathlib.Path], Any],
    expected: Dict[str, Entry],
) -> None:
    make_tree(root, setup)
    _new_pkg(root, outside)
    before = snapshot(root)
    tx = tx_on(root)
    plan(tx, outside)
    assert snapshot(root) == before  # planning changes nothing under the root
    tx.commit()
    check(root, expected)


def test_relative_sources_are_relative_to_the_root(
    root: pathlib.Path, outside: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(root, {"a.txt": b"root A", "b.txt": b"root B"})
    make_tree(outside, {"a.txt": b"cwd A", "b.txt": b"cwd B"})
    monkeypatch.chdir(outside)
    with tx_on(root) as tx:
        tx.copy("a.txt", "copy.txt")
        tx.rename(pathlib.Path("b.txt"), "moved.txt")
    check(
        root,
        {"a.txt": F(b"root A"), "copy.txt": F(b"root A"), "moved.txt": F(b"root B")},
    )
    assert (outside / "b.txt").read_bytes() == b"cwd B"


def test_absolute_paths_inside_root_and_through_a_root_symlink(
    root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    make_tree(root, {"a": b"A"})
    alias = tmp_path / "alias"
    os.symlink(root, alias)
    with tx_on(alias) as tx:
        tx.write_bytes(root / "via-real", b"1")
        tx.write_bytes(alias / "via-alias", b"2")
        tx.rename(str(root / "a"), str(alias / "b"))
    check(root, {"b": F(b"A"), "via-alias": F(b"2"), "via-real": F(b"1")})


def test_symlink_inside_root_used_as_parent(root: pathlib.Path) -> None:
    make_tree(root, {"pkg/x": b"x"})
    os.symlink("pkg", root / "alias")
    with tx_on(root) as tx:
        tx.write_bytes("alias/new", b"N")
        tx.rename("alias/x", "alias/y")
    check(
        root,
        {"alias": L("pkg"), "pkg": D(), "pkg/new": F(b"N"), "pkg/y": F(b"x")},
    )


# -- plan errors -------------------------------------------------------------------


def _links_out(root: pathlib.Path, outside: pathlib.Path) -> None:
    make_tree(root, {"a.txt": b"A", "d/f": b"f", "pkg/x": b"x"})
    os.symlink(str(outside), root / "out")
    os.symlink("../outside", root / "rel-out")
    os.symlink("../../outside", root / "d/up")
    os.symlink("out", root / "chain")
    os.symlink(".fstx", root / "to-staging")
    os.symlink("a.txt", root / "file-link")
    (root.parent / "root2").mkdir()
    (root.parent / "root2/f").write_bytes(b"sibling")


def _op(path: str) -> Plan:
    return lambda tx: tx.write_bytes(path, b"x")


PLAN_ERRORS = [
    # a missing source
    pytest.param(
        lambda tx: tx.copy("missing", "b"), "copy", "missing", id="copy-missing-inside"
    ),
    pytest.param(
        lambda tx: tx.copy("/nonexistent/src", "b"),
        "copy",
        "/nonexistent/src",
        id="copy-missing-outside",
    ),
    pytest.param(
        lambda tx: tx.rename("missing", "b"), "rename", "missing", id="rename-missing"
    ),
    pytest.param(
        lambda tx: tx.delete("missing"), "delete", "missing", id="delete-missing"
    ),
    pytest.param(
        lambda tx: tx.delete("d/f/below"),
        "delete",
        "d/f/below",
        id="delete-below-a-file",
    ),
    pytest.param(
        lambda tx: tx.chmod("missing", 0o600), "chmod", "missing", id="chmod-missing"
    ),
    pytest.param(
        [lambda tx: tx.delete("a.txt"), lambda tx: tx.copy("a.txt", "b")],
        "copy",
        "a.txt",
        id="copy-planned-deleted",
    ),
    pytest.param(
        [lambda tx: tx.rename("a.txt", "z"), lambda tx: tx.rename("a.txt", "b")],
        "rename",
        "a.txt",
        id="rename-planned-moved",
    ),
    pytest.param(
        [lambda tx: tx.delete("d"), lambda tx: tx.chmod("d/f", 0o600)],
        "chmod",
        "d/f",
        id="chmod-planned-deleted",
    ),
    # '..' leading out of the root
    pytest.param(_op("../x"), "write", "../x", id="dotdot-write"),
    pytest.param(_op("d/../../x"), "write", "d/../../x", id="dotdot-nested"),
    pytest.param(
        lambda tx: tx.copy("a.txt", "../x"), "copy", "../x", id="dotdot-copy-dst"
    ),
    pytest.param(
        lambda tx: tx.rename("a.txt", "../a.txt"),
        "rename",
        "../a.txt",
        id="dotdot-rename-dst",
    ),
    pytest.param(
        lambda tx: tx.rename("../outside/f", "x"),
        "rename",
        "../outside/f",
        id="dotdot-rename-src",
    ),
    pytest.param(
        lambda tx: tx.delete("../outside"), "delete", "../outside", id="dotdot-delete"
    ),
    pytest.param(
        lambda tx: tx.mkdir("../newdir"), "mkdir", "../newdir", id="dotdot-mkdir"
    ),
    pytest.param(
        lambda tx: tx.chmod("../outside", 0o700),
        "chmod",
        "../outside",
        id="dotdot-chmod",
    ),
    # an absolute path outside the root
    pytest.param(
        lambda tx: tx.write_bytes(str(tx.root) + "/../outside/x", b""),
        "write",
        None,
        id="abs-dotdot",
    ),
    pytest.param(
        lambda tx: tx.write_bytes(os.path.dirname(tx.root) + "/outside/x", b""),
        "write",
        None,
        id="abs-outside",
    ),
    pytest.param(
        lambda tx: tx.write_bytes(tx.root + "2/f", b""),
        "write",
        None,
        id="abs-sibling-prefix",
    ),
    pytest.param(
        lambda tx: tx.delete(os.path.dirname(tx.root) + "/outside/f"),
        "delete",
        None,
        id="abs-delete",
    ),
    pytest.param(
        lambda tx: tx.rename(os.path.dirname(tx.root) + "/outside/f", "x"),
        "rename",
        None,
        id="abs-rename-src",
    ),
    pytest.param(
        lambda tx: tx.mkdir("/tmp/fstx-should-not-exist"),
        "mkdir",
        "/tmp/fstx-should-not-exist",
        id="abs-mkdir",
    ),
    pytest.param(
        lambda tx: tx.chmod(os.path.dirname(tx.root) + "/outside", 0o700),
        "chmod",
        None,
        id="abs-chmod",
    ),
    # through a symlink inside the root that points out of it
    pytest.param(_op("out/x"), "write", "out/x", id="link-abs-write"),
    pytest.param(_op("rel-out/x"), "write", "rel-out/x", id="link-rel-write"),
    pytest.param(_op("d/up/x"), "write", "d/up/x", id="link-nested-write"),
    pytest.param(_op("chain/x"), "write", "chain/x", id="link-chain-write"),
    pytest.param(lambda tx: tx.delete("out/f"), "delete", "out/f", id="link-delete"),
    pytest.param(
        lambda tx: tx.rename("out/f", "g"), "rename", "out/f", id="link-rename-src"
    ),
    pytest.param(
        lambda tx: tx.rename("a.txt", "out/a"), "rename", "out/a", id="link-rename-dst"
    ),
    pytest.param(lambda tx: tx.copy("out/f", "g"), "copy", "out/f", id="link-copy-src"),
    pytest.param(
        lambda tx: tx.copy("a.txt", "out/g"), "copy", "out/g", id="link-copy-dst"
    ),
    pytest.param(lambda tx: tx.mkdir("out/new"), "mkdir", "out/new", id="link-mkdir"),
    pytest.param(
        lambda tx: tx.chmod("out/f", 0o700), "chmod", "out/f", id="link-chmod"
    ),
    pytest.param(
        lambda tx: tx.open("out/f").__enter__(), "write", "out/f", id="link-open"
    ),
    pytest.param(
        [
            lambda tx: tx.copy("out", "new-link"),
            lambda tx: tx.write_bytes("new-link/x", b""),
        ],
        "write",
        "new-link/x",
        id="link-planned",
    ),
    # a target inside the staging directory
    pytest.param(_op(".fstx/x"), "write", ".fstx/x", id="staging-write"),
    pytest.param(_op("d/../.fstx/x"), "write", "d/../.fstx/x", id="staging-dotdot"),
    pytest.param(_op("to-staging/x"), "write", "to-staging/x", id="staging-via-link"),
    pytest.param(
        lambda tx: tx.write_bytes(tx.root + "/.fstx/lock", b""),
        "write",
        None,
        id="staging-abs",
    ),
    pytest.param(lambda tx: tx.delete(".fstx"), "delete", ".fstx", id="staging-delete"),
    pytest.param(
        lambda tx: tx.delete(".fstx/lock"),
        "delete",
        ".fstx/lock",
        id="staging-delete-lock",
    ),
    pytest.param(
        lambda tx: tx.mkdir(".fstx/d"), "mkdir", ".fstx/d", id="staging-mkdir"
    ),
    pytest.param(
        lambda tx: tx.copy("a.txt", ".fstx/a"), "copy", ".fstx/a", id="staging-copy"
    ),
    pytest.param(
        lambda tx: tx.rename("a.txt", ".fstx/a"),
        "rename",
        ".fstx/a",
        id="staging-rename-dst",
    ),
    pytest.param(
        lambda tx: tx.rename(".fstx/lock", "a"),
        "rename",
        ".fstx/lock",
        id="staging-rename-src",
    ),
    pytest.param(
        lambda tx: tx.chmod(".fstx", 0o777), "chmod", ".fstx", id="staging-chmod"
    ),
    # a directory replaced by a file or the reverse, without a delete first
    pytest.param(
        lambda tx: tx.write_bytes("d", b""), "write", "d", id="file-over-dir-write"
    ),
    pytest.param(
        lambda tx: tx.write_text("pkg", ""),
        "write",
        "pkg",
        id="file-over-dir-write-text",
    ),
    pytest.param(
        lambda tx: tx.open("pkg").__enter__(), "write", "pkg", id="file-over-dir-open"
    ),
    pytest.param(
        lambda tx: tx.copy("a.txt", "d"), "copy", "d", id="file-over-dir-copy"
    ),
    pytest.param(
        lambda tx: tx.rename("a.txt", "pkg"), "rename", "pkg", id="file-over-dir-rename"
    ),
    pytest.param(
        lambda tx: tx.copy("pkg", "a.txt"), "copy", "a.txt", id="dir-over-file-copy"
    ),
    pytest.param(
        lambda tx: tx.rename("pkg", "a.txt"),
        "rename",
        "a.txt",
        id="dir-over-file-rename",
    ),
    pytest.param(
        lambda tx: tx.mkdir("a.txt"), "mkdir", "a.txt", id="dir-over-file-mkdir"
    ),
    pytest.param(
        lambda tx: tx.mkdir("a.txt/sub"),
        "mkdir",
        "a.txt/sub",
        id="dir-below-file-mkdir",
    ),
    pytest.param(_op("a.txt/x"), "write", "a.txt/x", id="file-below-file"),
    pytest.param(
        [lambda tx: tx.mkdir("new"), lambda tx: tx.write_bytes("new", b"")],
        "write",
        "new",
        id="file-over-planned-dir",
    ),
    pytest.param(
        [lambda tx: tx.write_bytes("new", b""), lambda tx: tx.mkdir("new")],
        "mkdir",
        "new",
        id="dir-over-planned-file",
    ),
    # other refusals
    pytest.param(
        lambda tx: tx.rename("pkg", "pkg/sub/pkg"),
        "rename",
        "pkg/sub/pkg",
        id="dir-into-itself-rename",
    ),
    pytest.param(
        lambda tx: tx.copy("pkg", "pkg/sub"),
        "copy",
        "pkg/sub",
        id="dir-into-itself-copy",
    ),
    pytest.param(
        lambda tx: tx.chmod("file-link", 0o700),
        "chmod",
        "file-link",
        id="chmod-symlink",
    ),
    pytest.param(_op(""), "write", "", id="empty-path"),
    pytest.param(lambda tx: tx.delete("."), "delete", ".", id="the-root-itself"),
]


def _fifo_source(base: pathlib.Path) -> None:
    # Beside the root, not in "outside": a snapshot would block reading the fifo.
    make_tree(base, {"fifo-src/a": b"a", "fifo-src/sub/b": b"b"})
    os.mkfifo(base / "fifo-src/sub/pipe")


PLAN_ERRORS += [
    pytest.param(
        lambda tx: tx.copy(os.path.dirname(tx.root) + "/fifo-src", "new/deep/pkg"),
        "copy",
        None,
        id="copy-tree-holding-a-fifo",
    ),
]


@pytest.mark.parametrize(("plan", "operation", "path"), PLAN_ERRORS)
def test_plan_error_changes_nothing(
    tmp_path: pathlib.Path,
    root: pathlib.Path,
    outside: pathlib.Path,
    plan: Union[Plan, List[Plan]],
    operation: str,
    path: Optional[str],
) -> None:
    *prelude, call = plan if isinstance(plan, list) else [plan]
    _links_out(root, outside)
    _fifo_source(root.parent)
    before = snapshot(root)
    before_out = [snapshot(outside), snapshot(root.parent / "root2")]
    tx = tx_on(root)
    for step in prelude:
        step(tx)
    planned = tx.operations
    with pytest.raises(fstx.PlanError) as info:
        call(tx)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.operation == operation
    if path is not None:
        assert err.path == path
        assert repr(path) in str(err)
    assert tx.operations == planned
    assert snapshot(root) == before
    # The refused call left no trace in the plan: committing gives what the
    # other calls alone give.
    tx.commit()
    reference = tmp_path / "reference" / "root"
    reference.mkdir(parents=True)
    _links_out(reference, outside)
    with tx_on(reference) as ref:
        for step in prelude:
            step(ref)
    assert snapshot(root, inodes=False) == snapshot(reference, inodes=False)
    if not prelude:
        assert snapshot(root) == before
    assert [snapshot(outside), snapshot(root.parent / "root2")] == before_out
    assert_clean(root)
    assert not os.path.exists("/tmp/fstx-should-not-exist")


SPENT = [
    pytest.param(lambda tx: tx.copy("a", "b"), "copy", id="copy"),
    pytest.param(lambda tx: tx.rename("a", "b"), "rename", id="rename"),
    pytest.param(lambda tx: tx.delete("a"), "delete", id="delete"),
    pytest.param(lambda tx: tx.write_bytes("b", b""), "write", id="write_bytes"),
    pytest.param(lambda tx: tx.write_text("b", ""), "write", id="write_text"),
    pytest.param(lambda tx: tx.open("b").__enter__(), "open", id="open"),
    pytest.param(lambda tx: tx.mkdir("b"), "mkdir", id="mkdir"),
    pytest.param(lambda tx: tx.chmod("a", 0o700), "chmod", id="chmod"),
    pytest.param(lambda tx: tx.commit(), "commit", id="commit"),
    pytest.param(lambda tx: tx.rollback(), "roll back", id="rollback"),
]


@pytest.mark.parametrize("finish", ["commit", "rollback"])
@pytest.mark.parametrize(("plan", "operation"), SPENT)
def test_spent_transaction_refuses_everything(
    root: pathlib.Path, finish: str, plan: Plan, operation: str
) -> None:
    make_tree(root, {"a": b"A"})
    tx = tx_on(root)
    tx.write_bytes("planned", b"P")
    getattr(tx, finish)()
    after = snapshot(root)
    assert tx.spent
    with pytest.raises(fstx.PlanError) as info:
        plan(tx)
    assert info.value.operation == operation
    assert snapshot(root) == after
    expected = {"a": F(b"A")}
    if finish == "commit":
        expected["planned"] = F(b"P")
    check(root, expected)


# -- operations, progress, context manager, report -----------------------------------


def test_operations_is_a_dry_run(root: pathlib.Path, outside: pathlib.Path) -> None:
    make_tree(root, {"a": b"A", "old": b"o", "pkg/x": b"x"})
    before = snapshot(root)
    tx = tx_on(root)
    tx.copy(outside / "f", "lib/f")
    tx.rename("a", "b")
    tx.delete("pkg")
    tx.delete("nothing", missing_ok=True)
    tx.write_bytes("bin/tool", b"#!", mode=0o755)
    tx.write_text("old", "new")
    with tx.open("opened") as f:
        f.write(b"o")
    tx.mkdir("m/n", mode=0o700)
    tx.chmod("b", 0o600)
    ops = tx.operations
    assert ops == (
        fstx.Operation("copy", "lib/f", source=str(outside / "f")),
        fstx.Operation("rename", "b", source="a"),
        fstx.Operation("delete", "pkg"),
        fstx.Operation("delete", "nothing"),
        fstx.Operation("write", "bin/tool", mode=0o755),
        fstx.Operation("write", "old"),
        fstx.Operation("write", "opened"),
        fstx.Operation("mkdir", "m/n", mode=0o700),
        fstx.Operation("chmod", "b", mode=0o600),
    )
    assert isinstance(ops, tuple)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ops[0].path = "elsewhere"  # type: ignore[misc]
    assert [str(op) for op in ops[1:3]] == ["rename a -> b", "delete pkg"]
    assert snapshot(root) == before
    tx.rollback()
    assert snapshot(root) == before
    assert_clean(root)


def test_on_progress_counts_up_to_the_total(root: pathlib.Path) -> None:
    calls: List[Tuple[int, int]] = []
    with tx_on(root, on_progress=lambda done, total: calls.append((done, total))) as tx:
        for name in "abcde":
            tx.write_bytes(name, name.encode())
    assert calls, "on_progress was never called"
    assert calls[-1] == (5, 5)
    assert all(total == 5 for _, total in calls)
    dones = [done for done, _ in calls]
    assert dones == sorted(dones)
    assert all(0 <= d <= 5 for d in dones)
    check(root, {n: F(n.encode()) for n in "abcde"})


def test_context_manager_commits(root: pathlib.Path) -> None:
    with fstx.transaction(root) as tx:
        assert isinstance(tx, fstx.Transaction)
        tx.write_bytes("f", b"F")
    assert tx.spent
    check(root, {"f": F(b"F")})


def test_context_manager_rolls_back_and_reraises(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A", "d/x": b"x"})
    before = snapshot(root)
    error = ValueError("stop")
    with pytest.raises(ValueError) as info:
        with fstx.transaction(root) as tx:
            tx.write_bytes("a", b"changed")
            tx.delete("d")
            tx.mkdir("new")
            raise error
    assert info.value is error
    assert tx.spent
    assert snapshot(root) == before
    assert_clean(root)


class Interrupt(BaseException):
    """Like KeyboardInterrupt, without upsetting pytest."""


def test_context_manager_rolls_back_on_base_exception(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    with pytest.raises(Interrupt):
        with tx_on(root) as tx:
            tx.delete("a")
            raise Interrupt
    assert snapshot(root) == before
    assert_clean(root)


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        pytest.param(
            ValueError("progress bar broke"), fstx.CommitError, id="exception"
        ),
        pytest.param(Interrupt(), Interrupt, id="base-exception"),
    ],
)
def test_on_progress_raising_rolls_back(
    root: pathlib.Path, error: BaseException, raised: type
) -> None:
    make_tree(root, {"a": b"A", "d/x": b"x"})
    before = snapshot(root)

    def progress(done: int, total: int) -> None:
        if done == 2:
            raise error

    tx = tx_on(root, on_progress=progress)
    tx.write_bytes("a", b"B")
    tx.delete("d")
    tx.write_bytes("c", b"C")
    with pytest.raises(raised):
        tx.commit()
    assert tx.spent
    assert snapshot(root) == before
    assert_clean(root)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: None, id="missing"),
        pytest.param(lambda p: p.write_bytes(b""), id="a-file"),
    ],
)
def test_root_must_be_a_directory(
    tmp_path: pathlib.Path, make: Callable[[pathlib.Path], Any]
) -> None:
    path = tmp_path / "root"
    make(path)
    with pytest.raises(fstx.PlanError) as info:
        fstx.transaction(path)
    assert repr(str(path)) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == (["root"] if path.exists() else [])


def test_staging_name_taken_by_a_file(root: pathlib.Path) -> None:
    (root / ".fstx").write_bytes(b"not ours")
    before = snapshot(root)
    with pytest.raises(fstx.PlanError):
        fstx.transaction(root)
    assert fstx.recover(root) == fstx.RecoveryReport()
    assert fstx.status(root).clean
    assert (root / ".fstx").read_bytes() == b"not ours"
    assert snapshot(root) == before


def test_context_manager_after_explicit_commit(root: pathlib.Path) -> None:
    with tx_on(root) as tx:
        tx.write_bytes("f", b"F")
        report = tx.commit()
    assert report.operations == 1
    check(root, {"f": F(b"F")})


def test_commit_report(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A", "d/x": b"x"})
    tx = fstx.transaction(root)
    tx.write_bytes("a", b"B")
    tx.delete("d")
    tx.delete("missing", missing_ok=True)
    tx.mkdir("m")
    report = tx.commit()
    assert isinstance(report, fstx.CommitReport)
    assert report.operations == 4 == len(tx.operations)
    assert report.deferred == ()
    assert report.retries == 0
    assert isinstance(report.elapsed, float)
    assert report.elapsed >= 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        report.operations = 0  # type: ignore[misc]
    check(root, {"a": F(b"B"), "m": D()})


def test_empty_transaction_commits(root: pathlib.Path) -> None:
    report = fstx.transaction(root).commit()
    assert report.operations == 0
    assert report.deferred == ()
    check(root, {})


# -- faults during commit ------------------------------------------------------------


def _fault_setup(root: pathlib.Path) -> None:
    make_tree(
        root,
        {"bin/tool": b"old tool", "lib/a.py": b"a", "lib/sub/b.py": b"b", "x": b"x"},
    )
    os.chmod(root / "bin/tool", 0o751)
    os.symlink("x", root / "link")


def _fault_plan(tx: fstx.Transaction, outside: pathlib.Path) -> None:
    tx.write_bytes("bin/tool", b"new tool")
    tx.copy(outside, "share/data")
    tx.rename("lib/sub", "lib2/sub")
    tx.delete("lib/a.py")
    tx.write_bytes("link", b"was a link")
    tx.chmod("x", 0o600)
    tx.mkdir("empty/dir")


_FAULT_AFTER = {
    "bin": D(),
    "bin/tool": F(b"new tool", 0o751),
    "empty": D(),
    "empty/dir": D(),
    "lib": D(),
    "lib2": D(),
    "lib2/sub": D(),
    "lib2/sub/b.py": F(b"b"),
    "link": F(b"was a link"),
    "share": D(),
    "share/data": D(),
    "share/data/f": F(b"outside"),
    "x": F(b"x", 0o600),
}


def _count_commit_calls(
    tmp_path: pathlib.Path, outside: pathlib.Path, durability: str
) -> int:
    root = tmp_path / "count"
    root.mkdir()
    _fault_setup(root)
    tx = tx_on(root, durability=durability)
    _fault_plan(tx, outside)
    with installed(FailAt(1 << 30)) as hook:
        tx.commit()
    check(root, _FAULT_AFTER)
    assert isinstance(hook, FailAt)
    return hook.count


@pytest.mark.parametrize("durability", ["none", "full"])
def test_fault_at_every_commit_call_rolls_back_exactly(
    tmp_path: pathlib.Path, outside: pathlib.Path, durability: str
) -> None:
    total = _count_commit_calls(tmp_path, outside, durability)
    outcomes = {"rolled back": 0, "committed": 0}
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}"
        root.mkdir()
        _fault_setup(root)
        before = snapshot(root)
        tx = tx_on(root, durability=durability)
        _fault_plan(tx, outside)
        error: Optional[fstx.CommitError] = None
        try:
            with installed(FailAt(k)):
                report = tx.commit()
        except fstx.CommitError as exc:
            error = exc
        if error is not None:
            outcomes["rolled back"] += 1
            assert isinstance(error.__cause__, OSError), k
            assert error.__cause__.errno == errno.EIO, k
            assert snapshot(root) == before, k
            assert_clean(root)
        else:
            # The fault hit a call with a fallback (a hard-link backup) or the
            # clean-up after the commit point: the commit stands, and what
            # could not be removed waits in the trash for the next recovery.
            outcomes["committed"] += 1
            assert snapshot(root, inodes=False) == _FAULT_AFTER, k
            if report.deferred:
                assert fstx.status(root).deferred == report.deferred
                fstx.recover(root)
            check(root, _FAULT_AFTER)
    assert outcomes["rolled back"] > 0
    assert outcomes["committed"] > 0


def _failing(
    match: Callable[[str, Tuple[Any, ...]], bool], times: int = 1
) -> fstx._os.Hook:
    """A hook that fails the first ``times`` calls that ``match`` with ``EIO``."""
    left = [times]

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and left[0] > 0 and match(name, args):
            left[0] -= 1
            raise OSError(errno.EIO, "injected I/O error")

    return hook


def _renamed_to(target: str) -> Callable[[str, Tuple[Any, ...]], bool]:
    return lambda name, args: (
        name in ("rename", "rename_noreplace", "exchange", "link") and args[3] == target
    )


def _renamed_from(source: str) -> Callable[[str, Tuple[Any, ...]], bool]:
    return lambda name, args: name == "rename" and args[1] == source


FAILING_STEPS = [
    pytest.param(
        lambda tx: tx.write_bytes("bin/tool", b"T"),
        _renamed_to("tool"),
        "write",
        "bin/tool",
        id="write-new",
    ),
    pytest.param(
        lambda tx: tx.write_bytes("a.txt", b"T"),
        _renamed_to("a.txt"),
        "write",
        "a.txt",
        id="write-replace",
    ),
    pytest.param(
        lambda tx: tx.copy("a.txt", "c.txt"),
        _renamed_to("c.txt"),
        "copy",
        "c.txt",
        id="copy",
    ),
    pytest.param(
        lambda tx: tx.rename("a.txt", "r.txt"),
        _renamed_to("r.txt"),
        "rename",
        "r.txt",
        id="rename",
    ),
    pytest.param(
        lambda tx: tx.delete("pkg"), _renamed_from("pkg"), "delete", "pkg", id="delete"
    ),
    pytest.param(
        lambda tx: tx.mkdir("newdir"),
        _renamed_to("newdir"),
        "mkdir",
        "newdir",
        id="mkdir",
    ),
    pytest.param(
        lambda tx: tx.chmod("a.txt", 0o700),
        lambda name, args: name == "chmod" and args[1] == "a.txt",
        "chmod",
        "a.txt",
        id="chmod",
    ),
]


@pytest.mark.parametrize(("plan", "match", "operation", "path"), FAILING_STEPS)
def test_commit_error_names_operation_and_path(
    root: pathlib.Path,
    plan: Plan,
    match: Callable[[str, Tuple[Any, ...]], bool],
    operation: str,
    path: str,
) -> None:
    make_tree(root, {"a.txt": b"A", "pkg/x": b"x", "zz": b"z"})
    before = snapshot(root)
    tx = tx_on(root)
    tx.write_bytes("first", b"applied before the failure")
    plan(tx)
    tx.delete("zz")
    with installed(_failing(match)), pytest.raises(fstx.CommitError) as info:
        tx.commit()
    err = info.value
    full = os.path.join(str(root), *path.split("/"))
    assert err.operation == operation
    assert err.path == full
    assert repr(full) in str(err)
    assert operation in str(err)
    assert isinstance(err.__cause__, OSError)
    assert err.__cause__.errno == errno.EIO
    assert tx.spent
    assert snapshot(root) == before
    assert_clean(root)


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(b'"committing"', id="before-any-step"),
        pytest.param(b'"committed"', id="after-every-step"),
    ],
)
def test_commit_error_in_the_journal_blames_the_journal_not_a_step(
    root: pathlib.Path, state: bytes
) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    tx = tx_on(root)
    tx.write_bytes("a", b"B")
    tx.mkdir("last/op")
    hook = _failing(lambda name, args: name == "write" and state in bytes(args[1]))
    with installed(hook), pytest.raises(fstx.CommitError) as info:
        tx.commit()
    assert info.value.operation == "journal"
    assert info.value.path == str(root)
    assert repr(str(root)) in str(info.value)
    assert snapshot(root) == before
    assert_clean(root)


def test_os_error_while_staging_is_raised_as_is(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    make_tree(root, {"a": b"A"})
    before = snapshot(root)
    tx = tx_on(root)
    tx.write_bytes("kept", b"k")
    with installed(_failing(lambda name, args: name == "write")):
        with pytest.raises(OSError) as info:
            tx.write_bytes("new/dir/f", b"data")
    assert type(info.value) is OSError
    assert info.value.errno == errno.EIO
    with installed(_failing(lambda name, args: name == "copy_fd")):
        with pytest.raises(OSError) as info:
            tx.copy(outside, "copied")
    assert not isinstance(info.value, fstx.FstxError)
    assert snapshot(root) == before
    tx.rollback()
    assert snapshot(root) == before
    assert_clean(root)


def _open_and_write(tx: fstx.Transaction) -> None:
    with tx.open("new/dir/f") as f:
        f.write(b"data")


STAGING_CALLS = [
    pytest.param(lambda tx: tx.write_bytes("new/dir/f", b"data"), id="write"),
    pytest.param(_open_and_write, id="open"),
    pytest.param(lambda tx: tx.copy("a", "new/dir/f"), id="copy-file"),
    pytest.param(lambda tx: tx.copy("tree", "new/dir/t"), id="copy-tree"),
    pytest.param(lambda tx: tx.mkdir("new/dir/sub"), id="mkdir"),
    pytest.param(lambda tx: tx.rename("a", "new/dir/a"), id="rename"),
]


@pytest.mark.parametrize("call", STAGING_CALLS)
def test_failed_staging_leaves_the_plan_unchanged(
    tmp_path: pathlib.Path, call: Plan
) -> None:
    def attempt(k: int) -> Tuple[pathlib.Path, FailAt, Optional[OSError]]:
        root = tmp_path / f"k{k}"
        make_tree(root, {"a": b"A", "tree/x": b"x", "tree/sub/y": b"y"})
        tx = tx_on(root)
        tx.write_bytes("kept", b"k")
        hook = FailAt(k)
        error: Optional[OSError] = None
        try:
            with installed(hook):
                call(tx)
        except OSError as exc:
            error = exc
        if error is not None:
            assert [op.path for op in tx.operations] == ["kept"]
        tx.commit()
        return root, hook, error

    _, counter, _ = attempt(1 << 30)
    assert counter.count > 0
    for k in range(1, counter.count + 1):
        root, hook, error = attempt(k)
        assert error is not None, (k, hook.calls)
        assert error.errno == errno.EIO
        # The failed call left nothing behind: no empty new/dir after commit.
        check(
            root,
            {
                "a": F(b"A"),
                "kept": F(b"k"),
                "tree": D(),
                "tree/sub": D(),
                "tree/sub/y": F(b"y"),
                "tree/x": F(b"x"),
            },
        )


def test_refused_cross_device_rename_leaves_the_plan_unchanged(
    root: pathlib.Path, made: mounts.Mounts
) -> None:
    made.tmpfs(str(root / "mnt"))
    make_tree(root, {"tree/a": b"a", "tree/sub/b": b"b"})
    os.mkfifo(root / "tree/sub/pipe")  # cannot be copied across devices
    tx = tx_on(root)
    tx.write_bytes("mnt/other", b"o")
    with pytest.raises(fstx.PlanError):
        tx.rename("tree", "mnt/new/deep/tree")
    assert [op.path for op in tx.operations] == ["mnt/other"]
    tx.commit()
    assert sorted(os.listdir(root / "mnt")) == ["other"]
    assert sorted(os.listdir(root / "tree/sub")) == ["b", "pipe"]
    assert_clean(root)


# -- durability ------------------------------------------------------------------------


SYNC_CALLS = frozenset({"fsync", "fsync_dir", "syncfs"})


def _run_counting_syncs(root: pathlib.Path, durability: str) -> int:
    make_tree(root, {"a": b"A", "d/x": b"x"})
    synced: List[str] = []

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in SYNC_CALLS:
            synced.append(name)

    with installed(hook):
        with fstx.transaction(root, durability=durability) as tx:
            tx.write_bytes("a", b"B")
            tx.delete("d")
            tx.mkdir("new/dir")
            tx.rename("a", "b")
        with fstx.transaction(root, durability=durability) as tx:
            tx.write_bytes("c", b"C")
            tx.rollback()
    check(root, {"b": F(b"B"), "new": D(), "new/dir": D()})
    return len(synced)


def test_durability_none_never_syncs(root: pathlib.Path) -> None:
    assert _run_counting_syncs(root, "none") == 0


def test_durability_full_syncs(root: pathlib.Path) -> None:
    assert _run_counting_syncs(root, "full") > 0


# -- names -----------------------------------------------------------------------------


NAMES = [
    pytest.param(os.fsdecode(b"caf\xe9-latin1"), id="non-utf8"),
    pytest.param(os.fsdecode(b"\xff\xfe\x80"), id="non-utf8-only"),
    pytest.param("a" * 255, id="255-ascii"),
    pytest.param("\u00e9" * 127 + "a", id="255-bytes-utf8"),
    pytest.param("new\nline", id="newline"),
    pytest.param("back\\slash", id="backslash"),
    pytest.param("-rf", id="leading-dash"),
    pytest.param(" spaced \t", id="spaces-tab"),
    pytest.param("\U0001f389 \u4e2d\u6587", id="emoji-cjk"),
    pytest.param('quote"s', id="quotes"),
    pytest.param("..dots..", id="dots"),
]


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip(root: pathlib.Path, outside: pathlib.Path, name: str) -> None:
    assert len(os.fsencode(name)) <= 255
    (outside / name).write_bytes(b"outside")
    with fstx.transaction(root) as tx:
        tx.write_bytes(name, b"1")
        tx.copy(outside, "copied")
        tx.mkdir(f"dirs/{name}")
    check(
        root,
        {
            name: F(b"1"),
            "copied": D(),
            "copied/f": F(b"outside"),
            f"copied/{name}": F(b"outside"),
            "dirs": D(),
            f"dirs/{name}": D(),
        },
    )
    with fstx.transaction(root) as tx:
        tx.write_bytes(name, b"2")  # a replacement: the old file has a backup
        tx.rename(name, f"dirs/{name}/{name}")
        tx.delete(f"copied/{name}")
        tx.chmod(f"dirs/{name}", 0o700)
    check(
        root,
        {
            "copied": D(),
            "copied/f": F(b"outside"),
            "dirs": D(),
            f"dirs/{name}": D(0o700),
            f"dirs/{name}/{name}": F(b"2"),
        },
    )
    before = snapshot(root)
    tx = tx_on(root)
    tx.delete("dirs")
    tx.write_bytes(f"copied/{name}", b"3")
    with installed(_failing(lambda call, args: call == "rename_noreplace")):
        with pytest.raises(fstx.CommitError):
            tx.commit()
    assert snapshot(root) == before
    assert_clean(root)


def test_paths_deeper_than_the_handle_cache(root: pathlib.Path) -> None:
    deep = "/".join(f"n{i}" for i in range(80))
    make_tree(root, {f"{deep}/old": b"old", "src/top": b"top", "gone/x": b"x"})
    with tx_on(root) as tx:
        tx.rename("src/top", f"{deep}/top")  # first: nothing deep is cached yet
        tx.write_bytes(f"{deep}/old", b"replaced")
        tx.write_bytes(f"{deep}/more/new", b"new")
        tx.rename(f"{deep}/old", "old-from-deep")
        tx.delete("gone")
    expected: Dict[str, Entry] = {"old-from-deep": F(b"replaced"), "src": D()}
    for i in range(80):
        expected["/".join(f"n{j}" for j in range(i + 1))] = D()
    expected[f"{deep}/top"] = F(b"top")
    expected[f"{deep}/more"] = D()
    expected[f"{deep}/more/new"] = F(b"new")
    check(root, expected)


def test_unicode_normalization_forms_are_distinct(root: pathlib.Path) -> None:
    nfc = unicodedata.normalize("NFC", "caf\u00e9")
    nfd = unicodedata.normalize("NFD", "caf\u00e9")
    assert nfc != nfd
    with tx_on(root) as tx:
        tx.write_bytes(nfc, b"composed")
        tx.write_bytes(nfd, b"decomposed")
        tx.mkdir(f"{nfc}-dir")
        tx.copy(nfc, f"{nfd}-dir")
    check(
        root,
        {
            nfc: F(b"composed"),
            nfd: F(b"decomposed"),
            f"{nfc}-dir": D(),
            f"{nfd}-dir": F(b"composed"),
        },
    )
    with tx_on(root) as tx:
        tx.delete(nfd)
        tx.rename(f"{nfd}-dir", f"{nfc}-dir/x")
    check(
        root, {nfc: F(b"composed"), f"{nfc}-dir": D(), f"{nfc}-dir/x": F(b"composed")}
    )


# -- locking and recovery on open ------------------------------------------------------


HOLDER = textwrap.dedent(
    """
    import sys
    import fstx
    tx = fstx.transaction(sys.argv[1], durability="none")
    tx.write_bytes("held", b"x")
    print("ready", flush=True)
    sys.stdin.readline()
    tx.rollback()
    """
)


def test_lock_timeout_while_another_process_holds_the_root(root: pathlib.Path) -> None:
    make_tree(root, {"a": b"A"})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(fstx.LockTimeout) as info:
            fstx.transaction(root, lock_timeout=0.2)
        assert info.value.root == str(root)
        assert info.value.timeout == 0.2
        assert isinstance(info.value, TimeoutError)
        assert fstx.status(root).pending is False  # a live transaction is not pending
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    with fstx.transaction(root, lock_timeout=5) as tx:
        tx.write_bytes("b", b"B")
    check(root, {"a": F(b"A"), "b": F(b"B")})


def test_lock_timeout_in_the_same_process_and_waiting_in_a_thread(
    root: pathlib.Path,
) -> None:
    first = tx_on(root)
    first.write_bytes("a", b"A")
    with pytest.raises(fstx.LockTimeout):
        fstx.transaction(root, lock_timeout=0.2)
    errors: List[BaseException] = []

    def second() -> None:
        try:
            with tx_on(root) as tx:  # waits (lock_timeout=None) for the first
                tx.copy("a", "a-copy")  # sees what the first committed
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    first.commit()
    thread.join(60)
    assert not thread.is_alive()
    assert errors == []
    check(root, {"a": F(b"A"), "a-copy": F(b"A")})


class Crash(BaseException):
    """Stands for the process dying: nothing below catches it as an error."""


def crash_after_renames(n: int) -> fstx._os.Hook:
    """Let ``n`` renames happen, then "die" at every later change (no undo runs)."""
    done = [0]

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name not in fstx._os.MUTATING:
            return
        if phase == "before" and done[0] >= n:
            raise Crash
        if phase == "after" and name in ("rename", "rename_noreplace"):
            done[0] += 1

    return hook


def test_transaction_recovers_an_interrupted_one_first(
    root: pathlib.Path, outside: pathlib.Path
) -> None:
    _fault_setup(root)
    before = snapshot(root)
    tx = tx_on(root)
    _fault_plan(tx, outside)
    with installed(crash_after_renames(3)), pytest.raises((Crash, fstx.RollbackError)):
        tx.commit()
    assert snapshot(root) != before  # half applied
    assert fstx.status(root).pending
    with tx_on(root) as tx2:
        assert snapshot(root) == before  # recovered before planning
        tx2.write_bytes("after", b"recovery")
    assert snapshot(root) == {**before, "after": snapshot(root)["after"]}
    assert snapshot(root, inodes=False)["after"] == F(b"recovery")
    assert_clean(root)
