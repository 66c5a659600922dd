"""The POSIX primitives, on the real file systems of this machine."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List

import pytest


def _skip_on_windows() -> None:
    if sys.platform == "win32":  # the POSIX module refuses to load there
        pytest.skip("POSIX primitives only", allow_module_level=True)


_skip_on_windows()
assert sys.platform != "win32"  # for mypy --platform win32: skip the rest

from fstx._platform import _posix  # noqa: E402

if TYPE_CHECKING:
    from fstx._platform._types import Dir

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc"
)


@pytest.fixture
def dir_root(tmp_path: Path) -> Iterator[Dir]:
    d = _posix.open_root(str(tmp_path))
    try:
        yield d
    finally:
        _posix.close_dir(d)


def _tmpfs_dir() -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    path = Path(tempfile.mkdtemp(dir=shm, prefix="fstx-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(params=["tmp_path", "tmpfs"])
def any_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dir]:
    """A root on the test's file system and one on tmpfs."""
    with contextlib.ExitStack() as stack:
        if request.param == "tmpfs":
            base = stack.enter_context(contextlib.contextmanager(_tmpfs_dir)())
        else:
            base = tmp_path
        d = _posix.open_root(str(base))
        stack.callback(_posix.close_dir, d)
        yield d


# --- holders ------------------------------------------------------------------

HOLD_OPEN = """
import sys
f = open(sys.argv[1], "rb")
print("ready", flush=True)
sys.stdin.read()
"""

HOLD_MAPPED = """
import ctypes, os, sys
# libc mmap, not the mmap module: that keeps a duplicate of the descriptor.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
addr = libc.mmap(None, 8192, 1, 2, fd, 0)  # PROT_READ, MAP_PRIVATE
assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)
print("ready", flush=True)  # no descriptor left; only the mapping holds it
sys.stdin.read()
"""


@contextlib.contextmanager
def child_holding(script: str, path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def _pids(path: Path) -> List[int]:
    return [pid for pid, _name in _posix.holders(str(path))]


@linux_only
def test_holders_finds_a_child_with_the_file_open(tmp_path: Path) -> None:
    target = tmp_path / "held.bin"
    target.write_bytes(b"x" * 100)
    with child_holding(HOLD_OPEN, target) as proc:
        found = _posix.holders(str(target))
        assert proc.pid in [pid for pid, _ in found]
        name = dict(found)[proc.pid]
        assert name.startswith("python"), name
    assert proc.pid not in _pids(target)


@linux_only
def test_holders_finds_a_child_that_only_maps_the_file(tmp_path: Path) -> None:
    target = tmp_path / "lib.so"
    target.write_bytes(b"\0" * 8192)
    with child_holding(HOLD_MAPPED, target) as proc:
        # No descriptor of the child refers to it: the maps check must find it.
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        want = target.stat()
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):  # ENOENT: fd closed meanwhile
                st = fd.stat()
                assert (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino)
        assert proc.pid in _pids(target)


@linux_only
def test_holders_ignores_a_child_holding_another_file(tmp_path: Path) -> None:
    held, other = tmp_path / "held", tmp_path / "other"
    held.write_bytes(b"a")
    other.write_bytes(b"b")
    with child_holding(HOLD_OPEN, held) as proc:
        assert proc.pid not in _pids(other)
        assert proc.pid in _pids(held)


@linux_only
def test_holders_includes_this_process(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.write_bytes(b"a")
    with target.open("rb"):
        assert os.getpid() in _pids(target)


def test_holders_of_a_missing_path_is_empty(tmp_path: Path) -> None:
    assert _posix.holders(str(tmp_path / "missing")) == []


DEV = os.makedev(0xFE, 0x01)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            b"7f0000-7f1000 r--p 00000000 fe:01 4242   /venv/lib/x.so\n",
            True,
            id="same-device-and-inode",
        ),
        pytest.param(
            b"7f0000-7f1000 r--p 00000000 08:02 4242   /other/fs/y.so\n",
            False,
            id="same-inode-other-device",
        ),
        pytest.param(
            b"7f0000-7f1000 r--p 00000000 fe:01 4243   /venv/lib/z.so\n",
            False,
            id="same-device-other-inode",
        ),
        pytest.param(
            b"7f0000-7f1000 r--p 00000000 00:2a 99   /venv/lib/x.so\n",
            True,
            id="backing-device-same-path",
        ),
        pytest.param(
            b"7f0000-7f1000 r--p 00000000 00:2a 99   /venv/lib/x.so (deleted)\n",
            False,
            id="backing-device-deleted",
        ),
        pytest.param(b"7f0000-7f1000 rw-p 00000000 00:00 0 \n", False, id="anonymous"),
        pytest.param(
            b"7ffd0000-7ffd1000 rw-p 00000000 00:00 0   [stack]\n",
            False,
            id="stack",
        ),
        pytest.param(b"garbage\n", False, id="short"),
        pytest.param(b"a b c zz:01 4242 /x\n", False, id="bad-device"),
        pytest.param(
            b"7f0000-7f1000 r--p 00000000 fe:01 4242   /venv/lib/with space.so\n",
            True,
            id="path-with-space",
        ),
    ],
)
def test_maps_line_matches(line: bytes, expected: bool) -> None:
    assert _posix._maps_line_matches(line, DEV, 4242, b"/venv/lib/x.so") is expected


# --- rename, exchange ------------------------------------------------------------


def test_rename_noreplace_refuses_an_existing_destination(any_root: Dir) -> None:
    base = Path(any_root.path)
    (base / "a").write_bytes(b"A")
    (base / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        _posix.rename_noreplace(any_root, "a", any_root, "b")
    assert (base / "a").read_bytes() == b"A"
    assert (base / "b").read_bytes() == b"B"
    _posix.rename_noreplace(any_root, "a", any_root, "c")
    assert not (base / "a").exists()
    assert (base / "c").read_bytes() == b"A"


def test_rename_noreplace_fallback_without_renameat2(
    dir_root: Dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_renameat2(*args: object) -> None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")

    monkeypatch.setattr(_posix, "_renameat2", no_renameat2)
    base = Path(dir_root.path)
    (base / "a").write_bytes(b"A")
    (base / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        _posix.rename_noreplace(dir_root, "a", dir_root, "b")
    assert (base / "a").read_bytes() == b"A"
    _posix.rename_noreplace(dir_root, "a", dir_root, "c")
    assert sorted(os.listdir(base)) == ["b", "c"]


def test_rename_replaces(dir_root: Dir) -> None:
    base = Path(dir_root.path)
    (base / "a").write_bytes(b"A")
    (base / "b").write_bytes(b"B")
    inode = (base / "a").stat().st_ino
    _posix.rename(dir_root, "a", dir_root, "b")
    assert (base / "b").read_bytes() == b"A"
    assert (base / "b").stat().st_ino == inode
    assert not (base / "a").exists()


def test_exchange_swaps_or_says_it_cannot(any_root: Dir) -> None:
    base = Path(any_root.path)
    (base / "f").write_bytes(b"file")
    (base / "d").mkdir()
    (base / "d" / "inner").write_bytes(b"inner")
    refused = None
    try:
        _posix.exchange(any_root, "f", any_root, "d")
    except OSError as exc:
        refused = exc.errno
    if refused is None:
        assert (base / "d").read_bytes() == b"file"
        assert (base / "f" / "inner").read_bytes() == b"inner"
    else:  # the kernel or file system lacks RENAME_EXCHANGE: nothing moved
        assert refused in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP)
        assert (base / "f").read_bytes() == b"file"


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux only")
def test_exchange_of_a_missing_name(dir_root: Dir) -> None:
    (Path(dir_root.path) / "a").write_bytes(b"a")
    with pytest.raises(OSError) as info:
        _posix.exchange(dir_root, "a", dir_root, "missing")
    assert info.value.errno in (errno.ENOENT, errno.ENOSYS)
    assert info.value.filename == os.path.join(dir_root.path, "a")


# --- directories and links ------------------------------------------------------------


def test_open_dir_refuses_a_symlink(dir_root: Dir, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(OSError) as info:
        _posix.open_dir(dir_root, "link")
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    d = _posix.open_dir(dir_root, "real")
    try:
        assert d.path == os.path.join(dir_root.path, "real")
        assert _posix.is_dir_stat(_posix.stat_dir(d))
        assert not _posix.same_dir(d, dir_root)
    finally:
        _posix.close_dir(d)


def test_open_dir_refuses_a_symlink_to_outside(dir_root: Dir, tmp_path: Path) -> None:
    outside = tempfile.mkdtemp()
    try:
        (tmp_path / "escape").symlink_to(outside)
        with pytest.raises(OSError) as info:
            _posix.open_dir(dir_root, "escape")
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    finally:
        os.rmdir(outside)


def test_open_dir_of_a_file(dir_root: Dir, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        _posix.open_dir(dir_root, "f")


def test_open_file_refuses_a_symlink(dir_root: Dir, tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"keep")
    (tmp_path / "link").symlink_to("target")
    with pytest.raises(OSError) as info:
        _posix.open_file(dir_root, "link", os.O_WRONLY | os.O_TRUNC)
    assert info.value.errno == errno.ELOOP
    assert (tmp_path / "target").read_bytes() == b"keep"


def test_is_dir_stat_does_not_follow(dir_root: Dir, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("d")
    assert _posix.is_dir_stat(_posix.lstat(dir_root, "d"))
    assert not _posix.is_dir_stat(_posix.lstat(dir_root, "l"))


def test_small_primitives(dir_root: Dir, tmp_path: Path) -> None:
    _posix.mkdir(dir_root, "d", 0o755)
    _posix.symlink("d", dir_root, "l")
    assert _posix.readlink(dir_root, "l") == "d"
    fd = _posix.open_file(dir_root, "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"data")
        _posix.fsync(fd)
    finally:
        os.close(fd)
    _posix.link(dir_root, "f", dir_root, "g")
    assert (tmp_path / "g").stat().st_ino == (tmp_path / "f").stat().st_ino
    _posix.chmod(dir_root, "f", 0o640)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    _posix.utime(dir_root, "l", (1_000_000_000, 2_000_000_000))
    assert os.lstat(tmp_path / "l").st_mtime_ns == 2_000_000_000
    assert sorted(_posix.listdir(dir_root)) == ["d", "f", "g", "l"]
    _posix.unlink(dir_root, "l")
    _posix.unlink(dir_root, "g")
    _posix.rmdir(dir_root, "d")
    assert _posix.listdir(dir_root) == ["f"]
    assert not _posix.is_readonly_blocker(dir_root, "f")
    _posix.clear_readonly(dir_root, "f")
    _posix.set_readonly(dir_root, "f")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert _posix.schedule_delete_on_reboot(str(tmp_path / "f")) is False


# --- copy and durability ----------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(0, id="empty"),
        pytest.param(5, id="small"),
        pytest.param((3 << 20) + 17, id="3MiB"),
    ],
)
@pytest.mark.parametrize("clone", [True, False], ids=["clone", "no-clone"])
def test_copy_fd_copies_content(
    any_root: Dir, tmp_path: Path, size: int, clone: bool
) -> None:
    data = os.urandom(size)
    src = tmp_path / "src.bin"  # on the test file system; any_root may be tmpfs
    src.write_bytes(data)
    fs = os.open(src, os.O_RDONLY)
    fd = _posix.open_file(any_root, "dst.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        cloned = _posix.copy_fd(fs, fd, clone)
    finally:
        os.close(fs)
        os.close(fd)
    assert (Path(any_root.path) / "dst.bin").read_bytes() == data
    assert clone or not cloned


def test_fsync_dir_and_syncfs(any_root: Dir) -> None:
    (Path(any_root.path) / "f").write_bytes(b"x")
    _posix.fsync_dir(any_root)
    assert _posix.syncfs(any_root) is sys.platform.startswith("linux")


def test_open_root_follows_a_symlinked_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to("real")
    d = _posix.open_root(str(tmp_path / "alias"))
    try:
        real = _posix.open_root(str(tmp_path / "real"))
        try:
            assert _posix.same_dir(d, real)
        finally:
            _posix.close_dir(real)
    finally:
        _posix.close_dir(d)
