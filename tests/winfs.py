"""A FUSE passthrough filesystem with Windows-like sharing rules, for tests.

fstx must cope with files that Windows will not let it touch while another
process has them open. Linux lets anyone delete or replace an open file, so
this module mounts a filesystem that behaves like Windows instead, and drives
it with real processes holding real handles (research/semantics.md §1.3-1.4).

Every operation passes through to a backing directory. While a file has an
open handle through the mount (FUSE open/create until release), it is *held*,
and the hold is kept per inode, so it follows the file through renames and
covers all of its hard links:

=========================================  ===================  ==============
operation on a held file                   ordinary file        program image
=========================================  ===================  ==============
unlink (any of its names)                  EBUSY                EBUSY
rename it (or RENAME_EXCHANGE it)          EBUSY                allowed
rename or exchange another file onto it    EBUSY                EBUSY
open for writing, O_TRUNC, truncate(path)  EBUSY                EBUSY
open for reading, stat, chmod, utime, link allowed              allowed
=========================================  ===================  ==============

A *program image* is a file whose handle was opened under a name ending in
``.exe``, ``.dll`` or ``.pyd`` (any case): the model of a running program or
a loaded extension, which Windows lets you rename but not delete, replace or
write. The flag belongs to the handle, so a renamed-away image stays one; a
held file can be renamed only if every handle on it is an image handle.
Renaming a directory with a held file anywhere below it gives EBUSY (Windows
gives 5 or 32; semantics.md §1.4 marks the exact NTFS rule unverified).

Who holds what can be read through two virtual extended attributes:
``user.winfs.holders`` on a file (see :func:`holders`) and
``user.winfs.all_holders`` on any path of the mount, each a space-separated
list of process ids.

Errno mapping. Windows answers these cases with winerror 32 (sharing
violation) or 5 (access denied: deleting a running image, replacing an open
target). Both are transient for fstx, so every refusal here is ``EBUSY``,
which the POSIX side of fstx classifies as transient too
(``fstx._retry._POSIX_TRANSIENT``); ``ETXTBSY`` would also do but says less.

Simplifications, on purpose:

* Any open handle blocks, the caller's own included: on Windows your own
  handle without FILE_SHARE_DELETE blocks your own delete as well.
* Directory handles (``opendir``, ``os.open(d, O_DIRECTORY)``) never hold
  anything: fstx's POSIX engine works through directory descriptors, which
  its Windows side does not have.
* ``rmdir`` needs no rule: a directory with a held file below it is not
  empty, so it fails with ENOTEMPTY, as Windows fails with
  ERROR_DIR_NOT_EMPTY (145).
* With ``share_write=False`` (the default) a held ordinary file refuses
  writers, like a holder that shares only reading. Python's own ``open()`` on
  Windows shares writing; pass ``share_write=True`` to model that (lock files
  opened with ``O_TRUNC`` by several processes need it).

The daemon is single-threaded on purpose. The kernel queues RELEASE during
``close()`` but does not wait for the answer; one thread serves requests in
order, so an operation issued after a ``close()`` sees the handle gone. (The
kernel may hold RELEASE back behind many outstanding background requests;
the rare result is a transient EBUSY, which is what fstx retries anyway.)
Attribute, entry and negative caching are off, ``st_ino`` is the backing
inode, and libfuse's ``hard_remove`` is on, so nothing is hidden behind
``.fuse_hidden*`` names.

Run the filesystem in the foreground with
``python tests/winfs.py BACKING MOUNTPOINT``; tests use :func:`mount` (or the
``winfs`` fixture of ``conftest_winfs``) and :func:`hold`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import importlib
import logging
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    final,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "HOLDERS_XATTR",
    "IMAGE_SUFFIXES",
    "MOUNT_HOLDERS_XATTR",
    "Holder",
    "WinFS",
    "WinOperations",
    "hold",
    "holders",
    "is_mounted",
    "main",
    "mount",
    "serve",
    "unavailable",
    "unmount",
]

StrPath = Union[str, "os.PathLike[str]"]

#: Extended attribute listing, space-separated, the pids holding one file.
HOLDERS_XATTR = "user.winfs.holders"
#: Extended attribute listing the pids holding any file on the mount.
MOUNT_HOLDERS_XATTR = "user.winfs.all_holders"

IMAGE_SUFFIXES = (".exe", ".dll", ".pyd")

_log = logging.getLogger("winfs")

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_ENCODING = ("utf-8", "surrogateescape")  # how mfusepy decodes paths


_STATVFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_flag",
    "f_namemax",
)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# --------------------------------------------------------------------------
# The filesystem (runs in the daemon process)


class _Handle:
    """One open file handle through the mount."""

    __slots__ = ("image", "key", "pid")

    def __init__(self, key: Tuple[int, int], pid: int, image: bool) -> None:
        self.key = key
        self.pid = pid
        self.image = image


def _busy(op: str, path: str) -> OSError:
    _log.debug("refused %s %r: in use", op, path)
    return OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)


def _key(st: os.stat_result) -> Tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _tgid(tid: int) -> int:
    """The process id of thread ``tid`` (FUSE reports the calling thread)."""
    try:
        with open(f"/proc/{tid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass  # the thread is gone already: its id is the best we have
    return tid


class WinOperations:
    """mfusepy operations: passthrough to ``backing``, with sharing rules.

    Args:
        backing: the directory whose tree the mount shows.
        context: returns the caller's ``(uid, gid, pid)`` (mfusepy's
            ``fuse_get_context``).
        share_write: let a held ordinary file be opened for writing.
        exchange: support ``RENAME_EXCHANGE`` (Windows has nothing like it;
            False makes it fail with EINVAL, as on a filesystem without it).
    """

    use_ns = True  # mfusepy: times in integer nanoseconds

    def __init__(
        self,
        backing: StrPath,
        context: Callable[[], Tuple[int, int, int]],
        *,
        share_write: bool = False,
        exchange: bool = True,
    ) -> None:
        self._root = os.fsencode(os.path.realpath(backing)).rstrip(b"/")
        self._context = context
        self._share_write = share_write
        self._exchange = exchange
        self._handles: Dict[int, _Handle] = {}
        self._libc = ctypes.CDLL(None, use_errno=True)

    # -- helpers --------------------------------------------------------

    def _b(self, path: str) -> bytes:
        return self._root + path.encode(*_ENCODING)

    def _held(self, key: Tuple[int, int]) -> List[_Handle]:
        return [h for h in self._handles.values() if h.key == key]

    def _held_below(self, top: bytes) -> bool:
        held = {h.key for h in self._handles.values()}
        if not held:
            return False
        stack = [top]
        while stack:
            try:
                entries = os.scandir(stack.pop())
            except OSError:
                continue  # vanished or unreadable: nothing held through it
            with entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed from the backing directory meanwhile
                    if _key(st) in held:
                        return True
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
        return False

    def _check_movable(self, path: str, op: str) -> None:
        """Refuse to move ``path`` away if a handle forbids it."""
        try:
            st = os.lstat(self._b(path))
        except OSError:
            return  # the real call reports it
        if stat.S_ISDIR(st.st_mode):
            if self._held_below(self._b(path)):
                raise _busy(op, path)
        elif any(not h.image for h in self._held(_key(st))):
            raise _busy(op, path)

    def _check_unheld(self, path: str, op: str) -> None:
        """Refuse to delete, replace or write ``path`` while it is held."""
        try:
            st = os.lstat(self._b(path))
        except OSError:
            return
        if not stat.S_ISDIR(st.st_mode) and self._held(_key(st)):
            raise _busy(op, path)

    def _own(self, path: bytes) -> None:
        """Give a new entry to the caller, as a kernel filesystem would."""
        uid, gid, _pid = self._context()
        if os.geteuid() != 0 or (uid, gid) == (0, 0):
            return
        if os.stat(os.path.dirname(path)).st_mode & stat.S_ISGID:
            gid = -1  # a set-group-ID directory passes its group on
        os.lchown(path, uid, gid)

    def _open(self, path: str, flags: int, mode: Optional[int]) -> int:
        """Open (``mode`` None) or create a file and record its handle."""
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        # O_TRUNC waits until the holds are checked; the kernel places appends.
        oflags = (flags & os.O_ACCMODE) | os.O_CLOEXEC | os.O_NOFOLLOW
        bpath = self._b(path)
        created = False
        if mode is not None:
            try:
                fd = os.open(bpath, oflags | os.O_CREAT | os.O_EXCL, mode)
                created = True
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
        if not created:  # open(), or create() losing a race to another creator
            fd = os.open(bpath, oflags)
        try:
            key = _key(os.fstat(fd))
            if write and any(h.image or not self._share_write for h in self._held(key)):
                raise _busy("open for writing", path)
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
            if created:
                self._own(bpath)
        except BaseException:
            os.close(fd)
            raise
        _uid, _gid, tid = self._context()
        image = path.lower().endswith(IMAGE_SUFFIXES)
        self._handles[fd] = _Handle(key, _tgid(tid), image)
        return fd

    def _holder_pids(self, key: Optional[Tuple[int, int]]) -> bytes:
        pids = {h.pid for h in self._handles.values() if key is None or h.key == key}
        return " ".join(str(p) for p in sorted(pids)).encode("ascii")

    # -- metadata -------------------------------------------------------

    def getattr(self, path: Optional[str], fh: Optional[int] = None) -> Dict[str, int]:
        """Stat ``path`` (never following a symlink), or the open ``fh``."""
        if fh is not None:
            st = os.fstat(fh)
        else:
            assert path is not None  # libfuse gives a path when there is no handle
            st = os.lstat(self._b(path))
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_rdev": st.st_rdev,
            "st_size": st.st_size,
            "st_blksize": st.st_blksize,
            "st_blocks": st.st_blocks,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def chmod(self, path: str, mode: int) -> int:
        """Change mode bits (the kernel has resolved any symlink)."""
        os.chmod(self._b(path), stat.S_IMODE(mode))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        """Change owner and group; -1 leaves one as it is."""
        os.lchown(self._b(path), uid, gid)
        return 0

    def utimens(
        self, path: str, times: Optional[Tuple[Tuple[int, int], Tuple[int, int]]]
    ) -> int:
        """Set times from raw ``(sec, nsec)`` pairs, UTIME_NOW/OMIT included."""
        buf = None
        if times is not None:
            buf = (_Timespec * 2)(_Timespec(*times[0]), _Timespec(*times[1]))
        if self._libc.utimensat(_AT_FDCWD, self._b(path), buf, _AT_SYMLINK_NOFOLLOW):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return 0

    def readlink(self, path: str) -> str:
        """The target of a symlink."""
        return os.readlink(self._b(path)).decode(*_ENCODING)

    def statfs(self, path: str) -> Dict[str, int]:
        """Statistics of the backing filesystem."""
        sv = os.statvfs(self._b(path))
        return {name: getattr(sv, name) for name in _STATVFS_FIELDS}

    def getxattr(self, path: str, name: str, *_position: int) -> bytes:
        """Read an extended attribute; two virtual ones list holders."""
        if name == MOUNT_HOLDERS_XATTR:
            return self._holder_pids(None)
        if name == HOLDERS_XATTR:
            return self._holder_pids(_key(os.lstat(self._b(path))))
        return os.getxattr(self._b(path), name, follow_symlinks=False)

    def listxattr(self, path: str) -> List[str]:
        """List the real extended attributes (not the virtual ones)."""
        return os.listxattr(self._b(path), follow_symlinks=False)

    def setxattr(
        self, path: str, name: str, value: bytes, options: int, *_position: int
    ) -> int:
        """Set an extended attribute."""
        os.setxattr(self._b(path), name, value, options, follow_symlinks=False)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        """Remove an extended attribute."""
        os.removexattr(self._b(path), name, follow_symlinks=False)
        return 0

    # -- namespace ------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        """Make a directory."""
        os.mkdir(self._b(path), mode)
        self._own(self._b(path))
        return 0

    def rmdir(self, path: str) -> int:
        """Remove an empty directory (a held file below makes it non-empty)."""
        os.rmdir(self._b(path))
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        """Make a FIFO, socket or device node."""
        os.mknod(self._b(path), mode, dev)
        self._own(self._b(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        """Create symlink ``target`` whose content is ``source`` (mfusepy order)."""
        os.symlink(source.encode(*_ENCODING), self._b(target))
        self._own(self._b(target))
        return 0

    def link(self, target: str, source: str) -> int:
        """Create hard link ``target`` to ``source`` (mfusepy order)."""
        os.link(self._b(source), self._b(target), follow_symlinks=False)
        return 0

    def unlink(self, path: str) -> int:
        """Delete a name, unless its file is held."""
        self._check_unheld(path, "unlink")
        os.unlink(self._b(path))
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        """Rename, replace, or with ``flags`` renameat2 it, obeying the holds."""
        if flags & _RENAME_EXCHANGE:
            if not self._exchange:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), old)
            self._check_movable(old, "exchange")
            self._check_movable(new, "exchange")
        else:
            self._check_movable(old, "rename")
            if not flags & _RENAME_NOREPLACE:
                self._check_unheld(new, "replace")
        if flags:
            if self._libc.renameat2(
                _AT_FDCWD, self._b(old), _AT_FDCWD, self._b(new), flags
            ):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), old)
        else:
            os.rename(self._b(old), self._b(new))
        return 0

    # -- files ----------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        """Open an existing file; the handle holds it until release."""
        return self._open(path, flags, None)

    def create(self, path: str, mode: int, flags: int) -> int:
        """Create and open a file."""
        return self._open(path, flags, mode)

    def read(self, path: Optional[str], size: int, offset: int, fh: int) -> bytes:
        """Read from an open handle."""
        return os.pread(fh, size, offset)

    def write(self, path: Optional[str], data: bytes, offset: int, fh: int) -> int:
        """Write through an open handle (the kernel has placed appends)."""
        return os.pwrite(fh, data, offset)

    def truncate(
        self, path: Optional[str], length: int, fh: Optional[int] = None
    ) -> int:
        """``ftruncate`` through the caller's handle, or ``truncate`` by path."""
        if fh is not None:
            os.ftruncate(fh, length)
            return 0
        assert path is not None  # libfuse gives a path when there is no handle
        self._check_unheld(path, "truncate")
        os.truncate(self._b(path), length)
        return 0

    def flush(self, path: Optional[str], fh: int) -> int:
        """Called at every ``close()``; data already went straight through."""
        return 0

    def fsync(self, path: Optional[str], datasync: int, fh: int) -> int:
        """Flush a file to the backing disk."""
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def release(self, path: Optional[str], fh: int) -> int:
        """The last reference to an open file went away: drop the hold."""
        self._handles.pop(fh, None)
        os.close(fh)
        return 0

    # -- directories ----------------------------------------------------

    def opendir(self, path: str) -> int:
        """Open a directory; directory handles hold nothing."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(self._b(path), flags)

    def readdir(
        self, path: Optional[str], fh: int
    ) -> List[Tuple[str, Dict[str, int], int]]:
        """List an open directory, even one renamed since it was opened."""
        st = os.fstat(fh)
        out = [(".", {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0)]
        out.append(("..", {"st_mode": stat.S_IFDIR}, 0))
        with os.scandir(fh) as entries:
            for entry in entries:
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed from the backing directory meanwhile
                attrs = {"st_mode": est.st_mode, "st_ino": est.st_ino}
                out.append((entry.name, attrs, 0))
        return out

    def fsyncdir(self, path: Optional[str], datasync: int, fh: int) -> int:
        """Flush a directory to the backing disk."""
        os.fsync(fh)
        return 0

    def releasedir(self, path: Optional[str], fh: int) -> int:
        """Close a directory handle."""
        os.close(fh)
        return 0


def serve(
    backing: StrPath,
    mountpoint: StrPath,
    *,
    share_write: bool = False,
    exchange: bool = True,
    debug: bool = False,
) -> None:
    """Mount the filesystem and serve it in this process until unmounted."""
    mfusepy: Any = importlib.import_module("mfusepy")
    if mfusepy.fuse_version_major != 3:
        raise RuntimeError("winfs needs libfuse 3 (Debian: fuse3)")

    def decode(path: Optional[bytes]) -> Optional[str]:
        return None if path is None else path.decode(*_ENCODING)

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]  # mfusepy has no type hints
        """mfusepy drops what fstx needs: rename flags, ftruncate's handle, UTIME_OMIT."""

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return int(self.operations.rename(decode(old), decode(new), flags))

        def truncate_fuse_3(self, path: Optional[bytes], length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return int(self.operations.truncate(decode(path), length, fh))

        def utimens_fuse_3(self, path: Optional[bytes], buf: Any, fip: Any) -> int:
            times = None
            if buf:
                a, m = buf.contents.actime, buf.contents.modtime
                times = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
            return int(self.operations.utimens(decode(path), times))

    os.umask(0)  # the kernel has applied the caller's umask already
    ops = WinOperations(
        backing,
        mfusepy.fuse_get_context,
        share_write=share_write,
        exchange=exchange,
    )
    Fuse(
        ops,
        os.fspath(mountpoint),
        foreground=True,
        nothreads=True,  # keeps RELEASE ordered before later requests
        debug=debug,
        fsname="winfs",
        subtype="winfs",
        default_permissions=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        use_ino=True,  # st_ino is the backing inode: stable, shared by hard links
        hard_remove=True,  # else libfuse renames open files to .fuse_hidden*
        auto_unmount=True,  # a daemon that dies takes its mount with it
    )


# --------------------------------------------------------------------------
# Mounting, from the test process


def unavailable() -> Optional[str]:
    """Why winfs cannot run here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "FUSE with libfuse 3 is only set up on Linux"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    os.close(fd)
    if not any(
        os.access(os.path.join(d, "fusermount3"), os.X_OK)
        for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
    ):
        return "fusermount3 is not on PATH (Debian: apt-get install fuse3)"
    try:
        mfusepy: Any = importlib.import_module("mfusepy")
    except Exception as exc:  # ImportError, or OSError when libfuse is missing
        return f"mfusepy is not importable: {exc!r}"
    if mfusepy.fuse_version_major != 3:
        return "mfusepy did not load libfuse 3"
    return None


def _unescape_mountinfo(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def is_mounted(mountpoint: StrPath) -> bool:
    """Whether anything is mounted on ``mountpoint``, dead FUSE mounts included.

    ``os.path.ismount`` says False for a FUSE mount whose daemon died (stat
    fails with ENOTCONN), so this reads ``/proc/self/mountinfo`` instead.
    """
    want = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(_unescape_mountinfo(line.split()[4]) == want for line in f)


def _fusermount(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["fusermount3", *args], capture_output=True, check=False, timeout=30
    )


def unmount(mountpoint: StrPath, *, timeout: float = 5.0) -> None:
    """Unmount, waiting up to ``timeout`` for it to stop being busy, then lazily."""
    mp = os.path.realpath(mountpoint)
    deadline = time.monotonic() + timeout
    while is_mounted(mp):
        result = _fusermount("-u", mp)
        if result.returncode == 0 or not is_mounted(mp):
            return
        if time.monotonic() >= deadline:
            _log.warning("lazy unmount of busy %r: %s", mp, result.stderr.decode())
            lazy = _fusermount("-u", "-z", mp)
            if lazy.returncode != 0 and is_mounted(mp):
                raise OSError(errno.EBUSY, lazy.stderr.decode().strip(), mp)
            return
        time.sleep(0.05)


class WinFS:
    """A running winfs mount.

    Attributes:
        backing: the directory holding the real files.
        mountpoint: where the filesystem with sharing rules is mounted.
        log: the daemon's output (errors in the operations land here).
        pid: the daemon's process id.
    """

    def __init__(self, backing: Path, mountpoint: Path, log: Path, pid: int) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log = log
        self.pid = pid

    def __repr__(self) -> str:
        return f"WinFS(backing={self.backing!r}, mountpoint={self.mountpoint!r})"

    def holders(self, path: StrPath) -> List[int]:
        """The pids holding ``path`` open through this mount."""
        return holders(path)


@contextlib.contextmanager
def mount(
    backing: StrPath,
    mountpoint: StrPath,
    *,
    log: Optional[StrPath] = None,
    share_write: bool = False,
    exchange: bool = True,
    timeout: float = 10.0,
) -> Iterator[WinFS]:
    """Mount winfs in a daemon process; unmount it on exit, whatever happened.

    Holders left running under the mount are killed first, so that the
    unmount is not busy.

    Args:
        backing: directory of real files (created if missing).
        mountpoint: empty directory to mount on (created if missing).
        log: where the daemon writes its output; beside the mountpoint if None.
        share_write: see :class:`WinOperations`.
        exchange: see :class:`WinOperations`.
        timeout: seconds to wait for the mount to appear.

    Raises:
        RuntimeError: the daemon exited or did not mount in time (its log
            is quoted).
    """
    backing_p = Path(os.path.realpath(backing))
    mount_p = Path(os.path.realpath(mountpoint))
    backing_p.mkdir(parents=True, exist_ok=True)
    mount_p.mkdir(parents=True, exist_ok=True)
    log_p = Path(log) if log is not None else mount_p.with_name(mount_p.name + ".log")
    cmd = [sys.executable, os.path.abspath(__file__), str(backing_p), str(mount_p)]
    cmd += ["--share-write"] if share_write else []
    cmd += [] if exchange else ["--no-exchange"]
    with open(log_p, "wb") as log_f:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout
        while not (is_mounted(mount_p) and os.path.ismount(mount_p)):
            if proc.poll() is not None or time.monotonic() >= deadline:
                why = "exited" if proc.returncode is not None else "did not mount"
                text = log_p.read_text(errors="replace")
                raise RuntimeError(f"winfs daemon {why} ({mount_p}):\n{text}")
            time.sleep(0.01)
        yield WinFS(backing_p, mount_p, log_p, proc.pid)
    finally:
        for holder in list(_live_holders):
            if mount_p in holder.path.parents:
                holder.kill()
        try:
            unmount(mount_p, timeout=2.0)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the daemon; after a lazy unmount it may need a push."""
    for push in (None, proc.terminate, proc.kill):
        if push is not None:
            push()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            continue
        return
    proc.wait()


# --------------------------------------------------------------------------
# Holder processes

_HOLDER_CODE = """\
import os, select, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
except OSError as exc:
    print("error", exc.errno, flush=True)
    sys.exit(1)
print("ready", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]) if sys.argv[2] else None)
"""

_live_holders: Set[Holder] = set()


def holders(path: StrPath) -> List[int]:
    """The pids holding ``path`` open through a winfs mount."""
    raw = os.getxattr(path, HOLDERS_XATTR, follow_symlinks=False)
    return [int(p) for p in raw.split()]


def _mount_root(path: Path) -> Path:
    for candidate in path.parents:
        if os.path.ismount(candidate):
            return candidate
    return Path(path.anchor)


@final
class Holder:
    """A child process that keeps one file open, as a program in use would.

    Use it as a context manager, or call :meth:`release` yourself.

    Attributes:
        path: the file held (as given, absolute).
        pid: the holding process.
    """

    def __init__(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.pid = proc.pid
        self._proc = proc
        self._root = _mount_root(path)

    def __repr__(self) -> str:
        return f"Holder(path={self.path!r}, pid={self.pid})"

    def __enter__(self) -> Holder:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.release()

    @property
    def alive(self) -> bool:
        """Whether the holder process is still running."""
        return self._proc.poll() is None

    def release(self, timeout: float = 10.0) -> None:
        """Tell the holder to close the file and exit; wait until the mount knows.

        Raises:
            TimeoutError: the filesystem still counts the handle after ``timeout``.
        """
        self._stop(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                raw = os.getxattr(self._root, MOUNT_HOLDERS_XATTR)
            except OSError:
                return  # not on a winfs mount, or the mount is gone
            if str(self.pid).encode() not in raw.split():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"winfs still counts a handle of {self!r}")
            time.sleep(0.01)

    def kill(self) -> None:
        """Kill the holder at once (clean-up after a failed test)."""
        if self.alive:
            self._proc.kill()
        self._stop(10.0)

    def _stop(self, timeout: float) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()  # EOF: the holder's select() returns
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        _live_holders.discard(self)


def hold(
    path: StrPath, *, seconds: Optional[float] = None, timeout: float = 10.0
) -> Holder:
    """Start a process that opens ``path`` for reading and keeps it open.

    Returns once the file is open in the child. The child exits when released
    (or when the returned :class:`Holder` leaves its ``with`` block), or after
    ``seconds`` if given. A running ``tool.exe`` is modelled by holding
    ``tool.exe`` open: winfs then applies the program-image rules.

    Raises:
        OSError: the child could not open ``path`` (its errno, e.g.
            ``FileNotFoundError``).
        TimeoutError: the child did not report within ``timeout`` seconds.
    """
    abspath = Path(os.path.abspath(path))
    argv = [sys.executable, "-I", "-S", "-c", _HOLDER_CODE, str(abspath)]
    argv.append("" if seconds is None else repr(float(seconds)))
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    holder = Holder(abspath, proc)
    _live_holders.add(holder)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().split() if ready else []
    if line == [b"ready"]:
        return holder
    holder.kill()
    if line[:1] == [b"error"]:
        err = int(line[1])
        raise OSError(err, os.strerror(err), str(abspath))
    raise TimeoutError(
        f"holder of {str(abspath)!r} did not report within {timeout} s"
        f" (exit status {proc.returncode}, said {line!r})"
    )


# --------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: serve BACKING on MOUNTPOINT in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--share-write", action="store_true")
    parser.add_argument("--no-exchange", dest="exchange", action="store_false")
    parser.add_argument("--debug", action="store_true", help="libfuse request trace")
    parser.add_argument("-v", "--verbose", action="store_true", help="log refusals")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="winfs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # mfusepy logs every errno it returns at DEBUG; only winfs's own lines help
        logging.getLogger("fuse").setLevel(logging.WARNING)
    serve(
        args.backing,
        args.mountpoint,
        share_write=args.share_write,
        exchange=args.exchange,
        debug=args.debug,
    )


if __name__ == "__main__":
    main()
