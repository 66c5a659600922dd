"""Tests of winfs, the FUSE filesystem with Windows-like sharing rules.

Each rule is checked with a real holder process, then checked to lift as soon
as the holder has gone; plain passthrough operations are checked without any.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

import fstx
from winfs import WinFS, hold, holders, is_mounted, mount, unavailable

pytest_plugins = ["conftest_winfs"]
pytestmark = pytest.mark.fuse

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

Op = Callable[[Path, Path], object]


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, bytes(src), _AT_FDCWD, bytes(dst), flags):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def assert_busy(op: Op, d: Path, p: Path) -> None:
    with pytest.raises(OSError) as info:
        op(d, p)
    assert info.value.errno == errno.EBUSY
    assert fstx.is_transient(info.value)


@pytest.fixture
def fuse_ok() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def mnt(winfs: WinFS) -> Path:
    return winfs.mountpoint


def _other(d: Path) -> Path:
    other = d / "other"
    other.write_bytes(b"other")
    return other


def _replace_onto(d: Path, p: Path) -> None:
    os.replace(_other(d), p)


def _unlink_alias(d: Path, p: Path) -> None:
    os.link(p, d / "alias")
    os.unlink(d / "alias")


def _open(mode: str) -> Op:
    def op(d: Path, p: Path) -> None:
        with open(p, mode):
            pass

    return op


def _exchange(d: Path, p: Path) -> None:
    renameat2(_other(d), p, _RENAME_EXCHANGE)


def _rename_into_subdir(d: Path, p: Path) -> None:
    (d / "sub").mkdir()
    os.rename(p, d / "sub" / "moved")


# Refused for every held file, ordinary or program image.
REFUSED_ALWAYS = [
    pytest.param(lambda d, p: os.unlink(p), id="unlink"),
    pytest.param(_unlink_alias, id="unlink-hard-link"),
    pytest.param(_replace_onto, id="replace-onto"),
    pytest.param(_open("r+b"), id="open-rw"),
    pytest.param(_open("wb"), id="open-trunc"),
    pytest.param(_open("ab"), id="open-append"),
    pytest.param(lambda d, p: os.truncate(p, 0), id="truncate"),
]

# Refused for a held ordinary file, allowed for a held program image.
REFUSED_UNLESS_IMAGE = [
    pytest.param(lambda d, p: os.rename(p, d / "moved"), id="rename"),
    pytest.param(_rename_into_subdir, id="rename-into-subdir"),
    pytest.param(_exchange, id="exchange"),
]

ORDINARY = ["data.txt", "tool.exe.bak", "lib.so"]
IMAGES = ["tool.exe", "Core.DLL", "_speedups.cp311-win_amd64.pyd"]


# --- plain operations -------------------------------------------------------


def test_create_write_read_listdir(winfs: WinFS) -> None:
    f = winfs.mountpoint / "a.txt"
    f.write_bytes(b"hello")
    with open(f, "ab") as out:
        out.write(b" world")
    assert f.read_bytes() == b"hello world"
    assert (winfs.backing / "a.txt").read_bytes() == b"hello world"
    assert os.listdir(winfs.mountpoint) == ["a.txt"]
    assert f.stat().st_ino == (winfs.backing / "a.txt").stat().st_ino


def test_create_mode_is_exact(mnt: Path) -> None:
    old = os.umask(0o022)
    try:
        fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.close(fd)
        os.mkdir(mnt / "d", 0o750)
    finally:
        os.umask(old)
    assert stat.S_IMODE((mnt / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((mnt / "d").stat().st_mode) == 0o750


def test_exclusive_create_of_existing_file_fails(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        os.open(mnt / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def test_mkdir_rmdir_and_directory_fsync(mnt: Path) -> None:
    (mnt / "a" / "b").mkdir(parents=True)
    fd = os.open(mnt / "a", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
        assert os.listdir(fd) == ["b"]
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / "a")
    assert info.value.errno == errno.ENOTEMPTY
    os.rmdir(mnt / "a" / "b")
    os.rmdir(mnt / "a")
    assert os.listdir(mnt) == []


def test_o_nofollow_on_symlink_to_directory(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "link").symlink_to("d")
    with pytest.raises(OSError) as info:
        os.open(mnt / "link", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_rename_and_replace_keep_the_inode(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"a")
    (mnt / "b").write_bytes(b"b")
    ino = (mnt / "a").stat().st_ino
    os.replace(mnt / "a", mnt / "b")
    assert (mnt / "b").read_bytes() == b"a"
    assert (mnt / "b").stat().st_ino == ino
    (mnt / "d").mkdir()
    os.rename(mnt / "b", mnt / "d" / "c")
    os.rename(mnt / "d", mnt / "e")
    assert (mnt / "e" / "c").stat().st_ino == ino
    assert sorted(os.listdir(mnt)) == ["e"]


def test_rename_noreplace_and_exchange(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"a")
    (mnt / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        renameat2(mnt / "a", mnt / "b", _RENAME_NOREPLACE)
    assert (mnt / "b").read_bytes() == b"b"
    renameat2(mnt / "a", mnt / "c", _RENAME_NOREPLACE)
    renameat2(mnt / "b", mnt / "c", _RENAME_EXCHANGE)
    assert (mnt / "b").read_bytes() == b"a"
    assert (mnt / "c").read_bytes() == b"b"


def test_hard_links_share_the_inode(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"one")
    os.link(mnt / "a", mnt / "b")
    a, b = (mnt / "a").stat(), (mnt / "b").stat()
    assert a.st_ino == b.st_ino
    assert a.st_nlink == b.st_nlink == 2
    (mnt / "b").write_bytes(b"two")
    assert (mnt / "a").read_bytes() == b"two"
    os.unlink(mnt / "a")
    assert (mnt / "b").stat().st_nlink == 1


def test_symlinks(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"x")
    (mnt / "to-d").symlink_to("d")
    (mnt / "dangling").symlink_to("../nowhere")
    assert os.readlink(mnt / "to-d") == "d"
    assert os.readlink(mnt / "dangling") == "../nowhere"
    assert stat.S_ISLNK(os.lstat(mnt / "to-d").st_mode)
    assert (mnt / "to-d" / "f").read_bytes() == b"x"
    os.unlink(mnt / "to-d")
    assert (mnt / "d" / "f").exists()


def test_non_utf8_names_round_trip(mnt: Path) -> None:
    name = b"caf\xe9-\xff"
    root = os.fsencode(mnt)
    with open(root + b"/" + name, "wb") as f:
        f.write(b"x")
    os.symlink(name, root + b"/link")
    assert sorted(os.listdir(root)) == sorted([name, b"link"])
    assert os.readlink(root + b"/link") == name


def test_chmod(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x")
    os.chmod(mnt / "f", 0o751)
    assert stat.S_IMODE((mnt / "f").stat().st_mode) == 0o751
    os.chmod(mnt / "f", 0o4755)
    assert stat.S_IMODE((mnt / "f").stat().st_mode) == 0o4755


def test_utime_keeps_nanoseconds(winfs: WinFS) -> None:
    f = winfs.mountpoint / "f"
    f.write_bytes(b"x")
    atime, mtime = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321
    os.utime(f, ns=(atime, mtime))
    for st in (f.stat(), (winfs.backing / "f").stat()):
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)


def test_utime_on_symlink_itself(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x")
    (mnt / "link").symlink_to("f")
    before = (mnt / "f").stat().st_mtime_ns
    os.utime(mnt / "link", ns=(1_000_000_001, 2_000_000_002), follow_symlinks=False)
    assert os.lstat(mnt / "link").st_mtime_ns == 2_000_000_002
    assert (mnt / "f").stat().st_mtime_ns == before


def test_utime_omit_and_now(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x")
    os.utime(mnt / "f", ns=(1_000_000_001, 2_000_000_002))
    # touch -m: atime UTIME_OMIT, mtime UTIME_NOW
    times = (ctypes.c_long * 4)(0, (1 << 30) - 2, 0, (1 << 30) - 1)
    assert _libc.utimensat(_AT_FDCWD, bytes(mnt / "f"), times, 0) == 0
    st = (mnt / "f").stat()
    assert st.st_atime_ns == 1_000_000_001
    assert st.st_mtime_ns > 2_000_000_002
    os.utime(mnt / "f")  # both now
    assert (mnt / "f").stat().st_atime_ns > 1_000_000_001


def test_truncate_ftruncate_and_fsync(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"0123456789")
    os.truncate(mnt / "f", 4)
    assert (mnt / "f").read_bytes() == b"0123"
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        os.ftruncate(fd, 2)  # through the caller's own handle: allowed
        os.pwrite(fd, b"ab", 2)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert (mnt / "f").read_bytes() == b"01ab"


def test_directory_relative_operations(mnt: Path) -> None:
    (mnt / "d").mkdir()
    dfd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
        os.write(fd, b"x")
        os.fsync(fd)
        os.close(fd)
        os.mkdir("sub", dir_fd=dfd)
        os.rename("f", "sub/g", src_dir_fd=dfd, dst_dir_fd=dfd)
        os.symlink("sub/g", "s", dir_fd=dfd)
        os.link("sub/g", "h", src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        os.rename(mnt / "d", mnt / "moved")  # the descriptor follows the directory
        assert sorted(os.listdir(dfd)) == ["h", "s", "sub"]
        os.unlink("h", dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (mnt / "moved" / "sub" / "g").read_bytes() == b"x"


def test_statvfs(mnt: Path) -> None:
    sv = os.statvfs(mnt)
    assert sv.f_bsize > 0
    assert sv.f_namemax >= 255


def test_xattrs_pass_through(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x")
    try:
        os.setxattr(mnt / "f", "user.k", b"v")
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:
            pytest.skip("the backing filesystem has no user xattrs")
        raise
    assert os.getxattr(mnt / "f", "user.k") == b"v"
    assert os.listxattr(mnt / "f") == ["user.k"]
    os.removexattr(mnt / "f", "user.k")
    assert os.listxattr(mnt / "f") == []


# --- sharing rules ------------------------------------------------------------


def _clear_leftovers(mnt: Path, keep: str) -> None:
    """Remove what a refused operation set up, so that it can run again."""
    for entry in os.scandir(mnt):
        if entry.name != keep:
            (os.rmdir if entry.is_dir(follow_symlinks=False) else os.unlink)(entry.path)


@pytest.mark.parametrize("name", ORDINARY + IMAGES)
@pytest.mark.parametrize("op", REFUSED_ALWAYS)
def test_held_file_refuses(mnt: Path, name: str, op: Op) -> None:
    f = mnt / name
    f.write_bytes(b"old")
    with hold(f):
        assert_busy(op, mnt, f)
        assert f.read_bytes() == b"old"
    _clear_leftovers(mnt, keep=name)
    op(mnt, f)  # allowed as soon as the holder has exited


@pytest.mark.parametrize("name", ORDINARY)
@pytest.mark.parametrize("op", REFUSED_UNLESS_IMAGE)
def test_held_ordinary_file_cannot_be_moved(mnt: Path, name: str, op: Op) -> None:
    f = mnt / name
    f.write_bytes(b"old")
    with hold(f):
        assert_busy(op, mnt, f)
        assert f.read_bytes() == b"old"
    _clear_leftovers(mnt, keep=name)
    op(mnt, f)


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("op", REFUSED_UNLESS_IMAGE)
def test_held_image_can_be_renamed_away(mnt: Path, name: str, op: Op) -> None:
    f = mnt / name
    f.write_bytes(b"old")
    ino = f.stat().st_ino
    with hold(f) as h:
        op(mnt, f)
        moved = next(
            p
            for p in (mnt / "moved", mnt / "sub" / "moved", mnt / "other")
            if p.exists() and p.stat().st_ino == ino
        )
        # The hold went with the file: still not deletable or writable.
        assert holders(moved) == [h.pid]
        assert_busy(lambda d, p: os.unlink(p), mnt, moved)
        assert_busy(_open("r+b"), mnt, moved)
        os.rename(moved, mnt / "trash-1")  # and it can move again
    os.unlink(mnt / "trash-1")


@pytest.mark.parametrize("name", ORDINARY + IMAGES)
def test_held_file_allows_reading_and_metadata(mnt: Path, name: str) -> None:
    f = mnt / name
    f.write_bytes(b"data")
    with hold(f):
        assert f.read_bytes() == b"data"
        os.chmod(f, 0o600)
        os.utime(f, ns=(1, 2))
        os.link(f, mnt / "alias")
        assert (mnt / "alias").stat().st_ino == f.stat().st_ino
        (mnt / "sibling").write_bytes(b"free")
        os.replace(mnt / "sibling", mnt / "sibling2")
        os.unlink(mnt / "sibling2")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert f.stat().st_mtime_ns == 2


@pytest.mark.parametrize("name", ["data.txt", "tool.exe"])
def test_directory_with_held_file_below(mnt: Path, name: str) -> None:
    (mnt / "top" / "mid" / "leaf").mkdir(parents=True)
    (mnt / "side").mkdir()
    f = mnt / "top" / "mid" / "leaf" / name
    f.write_bytes(b"x")
    with hold(f):
        for d in (mnt / "top", mnt / "top" / "mid", mnt / "top" / "mid" / "leaf"):
            assert_busy(lambda _d, p: os.rename(p, mnt / "moved"), mnt, d)
        assert_busy(
            lambda _d, p: renameat2(p, mnt / "side", _RENAME_EXCHANGE), mnt, mnt / "top"
        )
        os.rename(mnt / "side", mnt / "side2")  # a directory without holds moves
        with pytest.raises(OSError) as info:
            os.rmdir(mnt / "top" / "mid" / "leaf")
        assert info.value.errno == errno.ENOTEMPTY  # as Windows: not empty, first
    os.rename(mnt / "top", mnt / "moved")


def test_own_handle_blocks_too(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"x")
    with open(f, "rb"):
        assert_busy(lambda d, p: os.unlink(p), mnt, f)
        assert holders(f) == [os.getpid()]
    os.unlink(f)


def test_holder_pid_is_the_process_not_the_thread(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"x")
    fds: list[int] = []
    worker = threading.Thread(target=lambda: fds.append(os.open(f, os.O_RDONLY)))
    worker.start()
    worker.join()
    try:
        assert holders(f) == [os.getpid()]
    finally:
        os.close(fds[0])
    assert holders(f) == []


def test_directory_handles_hold_nothing(mnt: Path) -> None:
    (mnt / "d").mkdir()
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(mnt / "d", mnt / "e")
        os.rmdir(mnt / "e")
    finally:
        os.close(fd)


def test_two_holders(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"x")
    with hold(f) as first, hold(f) as second:
        assert holders(f) == sorted([first.pid, second.pid])
        first.release()
        assert holders(f) == [second.pid]
        assert_busy(lambda d, p: os.unlink(p), mnt, f)
    assert holders(f) == []
    os.unlink(f)


def test_hold_through_a_hard_link(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"x")
    os.link(mnt / "a", mnt / "b")
    with hold(mnt / "a") as h:
        assert holders(mnt / "b") == [h.pid]
        assert_busy(lambda d, p: os.unlink(p), mnt, mnt / "b")
        assert_busy(_replace_onto, mnt, mnt / "b")
    os.unlink(mnt / "b")


def test_holder_with_seconds_exits_by_itself(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"x")
    h = hold(f, seconds=0.2)
    assert holders(f) == [h.pid]
    assert_busy(lambda d, p: os.unlink(p), mnt, f)
    deadline = time.monotonic() + 10
    while holders(f) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holders(f) == []
    assert not h.alive
    os.unlink(f)
    h.release()  # reaps the exited process


def test_hold_missing_file_raises(mnt: Path) -> None:
    with pytest.raises(FileNotFoundError):
        hold(mnt / "missing")


def test_holder_left_running_is_killed_at_unmount(
    tmp_path: Path, fuse_ok: None
) -> None:
    with mount(tmp_path / "b", tmp_path / "m") as fs:
        (fs.mountpoint / "f").write_bytes(b"x")
        h = hold(fs.mountpoint / "f")  # never released by the test
        assert is_mounted(fs.mountpoint)
    assert not h.alive
    assert not is_mounted(tmp_path / "m")
    assert (tmp_path / "b" / "f").read_bytes() == b"x"


def test_share_write_lets_writers_in(tmp_path: Path, fuse_ok: None) -> None:
    with mount(tmp_path / "b", tmp_path / "m", share_write=True) as fs:
        f, exe = fs.mountpoint / "f", fs.mountpoint / "tool.exe"
        f.write_bytes(b"x")
        exe.write_bytes(b"MZ")
        with hold(f), hold(exe):
            f.write_bytes(b"y")
            assert_busy(_open("wb"), fs.mountpoint, exe)  # images never share writing
            assert_busy(lambda d, p: os.unlink(p), fs.mountpoint, f)
        assert f.read_bytes() == b"y"


def test_exchange_can_be_turned_off(tmp_path: Path, fuse_ok: None) -> None:
    with mount(tmp_path / "b", tmp_path / "m", exchange=False) as fs:
        (fs.mountpoint / "a").write_bytes(b"a")
        (fs.mountpoint / "b").write_bytes(b"b")
        with pytest.raises(OSError) as info:
            renameat2(fs.mountpoint / "a", fs.mountpoint / "b", _RENAME_EXCHANGE)
        assert info.value.errno == errno.EINVAL


def test_fixture_unmounts(winfs: WinFS) -> None:
    assert is_mounted(winfs.mountpoint)
    assert os.path.ismount(winfs.mountpoint)
    assert winfs.log.exists()
