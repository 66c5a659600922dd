"""POSIX primitives (Linux, macOS, BSD): every name is resolved in an open directory.

Each function takes a :class:`Dir` and a single name component, and never
follows a symlink in that component, so the engine can walk from the root
descriptor and stay inside it (the ``shutil.rmtree`` approach; Rust's
CVE-2022-21658 was the race this avoids).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import sys
from typing import Callable, List, Optional, Tuple

from fstx._platform._types import Dir

# Never imported on Windows (fstx._platform chooses); this also tells mypy
# --platform win32 to skip the rest of the module.
assert sys.platform != "win32"

_log = logging.getLogger("fstx")

LINK_BACKUPS = True
"""Where it cannot be swapped out (below), a replaced file is hard-linked into
staging, then renamed over: readers never find the name missing."""

EXCHANGE_REPLACES = sys.platform == "linux"
"""A replaced file is swapped with its staged successor in one call
(``renameat2(RENAME_EXCHANGE)``); the old file is left in staging."""

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC

_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2


def _load_libc() -> Optional[ctypes.CDLL]:
    # The symbols the interpreter already has loaded (libc among them):
    # ctypes.util.find_library would cost milliseconds at import (it may run
    # ldconfig), and no other C library is wanted.
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # a static or unusual libc: the callers have fallbacks
        return None


_libc = _load_libc()


def open_root(path: str) -> Dir:
    """Open the transaction root (following symlinks: the root is the user's choice)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return Dir(fd, path)


def open_dir(parent: Dir, name: str) -> Dir:
    """Open a subdirectory, refusing a symlink (``ELOOP``/``ENOTDIR``)."""
    fd = os.open(name, _O_DIR, dir_fd=parent.fd)
    return Dir(fd, os.path.join(parent.path, name))


def mount_id(d: Dir) -> int:
    """The id of the mount ``d`` is on (Linux ``fdinfo``), or 0 where unknown.

    Two mounts of one file system (a bind mount) share ``st_dev`` but not a
    rename: staging must be chosen per mount, not per device.
    """
    try:
        with open(f"/proc/self/fdinfo/{d.fd}", "rb") as info:
            for line in info:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass  # not Linux, or /proc is not mounted: st_dev alone decides
    return 0


def close_dir(d: Dir) -> None:
    """Close a directory opened by :func:`open_dir` or :func:`open_root`."""
    os.close(d.fd)


def same_dir(a: Dir, b: Dir) -> bool:
    """Whether two handles refer to one directory."""
    sa, sb = os.fstat(a.fd), os.fstat(b.fd)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def stat_dir(d: Dir) -> os.stat_result:
    """``fstat`` of an open directory."""
    return os.fstat(d.fd)


def lstat(d: Dir, name: str) -> os.stat_result:
    """``lstat`` of ``name`` in ``d``."""
    return os.stat(name, dir_fd=d.fd, follow_symlinks=False)


def listdir(d: Dir) -> List[str]:
    """Names in ``d`` (CPython duplicates the descriptor, so ``d`` stays usable)."""
    return os.listdir(d.fd)


def mkdir(d: Dir, name: str, mode: int) -> None:
    """Create directory ``name`` in ``d``."""
    os.mkdir(name, mode, dir_fd=d.fd)


def rmdir(d: Dir, name: str) -> None:
    """Remove the empty directory ``name`` from ``d``."""
    os.rmdir(name, dir_fd=d.fd)


def unlink(d: Dir, name: str) -> None:
    """Remove the file or symlink ``name`` from ``d``."""
    os.unlink(name, dir_fd=d.fd)


def rename(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Atomically rename, replacing a file or symlink at the destination."""
    os.rename(sn, dn, src_dir_fd=sd.fd, dst_dir_fd=dd.fd)


def _renameat2(sd: Dir, sn: str, dd: Dir, dn: str, flags: int) -> None:
    # None on other systems, without libc, or with glibc < 2.28.
    func = getattr(_libc, "renameat2", None)
    if func is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", sn)
    rc = func(sd.fd, os.fsencode(sn), dd.fd, os.fsencode(dn), flags)
    if rc != 0:
        err = ctypes.get_errno()
        src, dst = os.path.join(sd.path, sn), os.path.join(dd.path, dn)
        raise OSError(err, os.strerror(err), src, None, dst)


def rename_noreplace(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Rename, failing with ``FileExistsError`` if the destination exists.

    Uses ``renameat2(RENAME_NOREPLACE)`` on Linux; elsewhere, and on file
    systems without it, a hard link plus unlink (files only).
    """
    if sys.platform == "linux":
        try:
            _renameat2(sd, sn, dd, dn, _RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                raise
        else:
            return
    os.link(sn, dn, src_dir_fd=sd.fd, dst_dir_fd=dd.fd, follow_symlinks=False)
    os.unlink(sn, dir_fd=sd.fd)


def exchange(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Atomically swap two names (``renameat2(RENAME_EXCHANGE)``).

    Raises:
        OSError: ``ENOSYS``/``EINVAL`` where the kernel or file system lacks it.
    """
    if sys.platform == "linux":
        _renameat2(sd, sn, dd, dn, _RENAME_EXCHANGE)
        return
    raise OSError(errno.ENOSYS, "atomic exchange is not available", sn)


def link(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Create hard link ``dn`` to ``sn`` (never following a symlink)."""
    os.link(sn, dn, src_dir_fd=sd.fd, dst_dir_fd=dd.fd, follow_symlinks=False)


def link_in(src: str, d: Dir, name: str, follow: bool) -> None:
    """Hard-link ``name`` in ``d`` to the file at path ``src`` (anywhere).

    ``follow``: link what a symlink at ``src`` points to, not the symlink.
    """
    os.link(src, name, dst_dir_fd=d.fd, follow_symlinks=follow)


def symlink(target: str, d: Dir, name: str) -> None:
    """Create symlink ``name`` pointing at ``target``."""
    os.symlink(target, name, dir_fd=d.fd)


def readlink(d: Dir, name: str) -> str:
    """Target of symlink ``name``."""
    return os.readlink(name, dir_fd=d.fd)


def open_file(d: Dir, name: str, flags: int, mode: int = 0o666) -> int:
    """``openat`` without following a symlink in ``name``."""
    return os.open(name, flags | _O_FILE_FLAGS, mode, dir_fd=d.fd)


def chmod(d: Dir, name: str, mode: int) -> None:
    """Change the mode bits of a file or directory (the caller checked: no symlink)."""
    os.chmod(name, mode, dir_fd=d.fd)


def utime(d: Dir, name: str, ns: Tuple[int, int]) -> None:
    """Set access and modification times without following a symlink."""
    os.utime(name, ns=ns, dir_fd=d.fd, follow_symlinks=False)


def fsync(fd: int) -> None:
    """Flush a file to stable storage (``F_FULLFSYNC`` on macOS: fsync does not)."""
    if sys.platform == "darwin":
        import fcntl  # noqa: PLC0415 - POSIX-only module, imported where used

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        except OSError as exc:
            # Some file systems (network, FUSE) refuse F_FULLFSYNC; fsync is all
            # that is left.
            if exc.errno not in (errno.ENOTSUP, errno.EINVAL, errno.ENOTTY):
                raise
        else:
            return
    os.fsync(fd)


def fsync_dir(d: Dir) -> None:
    """Make ``d``'s entries durable; file systems that cannot are tolerated, not EIO."""
    try:
        fsync(d.fd)
    except OSError as exc:
        # fsync(2): EINVAL "fd is bound to a special file which does not support
        # synchronization"; seen for directories on some FUSE and network mounts.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
        _log.debug("directory fsync not supported on %r", d.path)


def syncfs(d: Dir) -> bool:
    """Flush the whole file system holding ``d`` in one call; False if unsupported."""
    func = getattr(_libc, "syncfs", None)  # Linux only
    if func is None:
        return False
    if func(d.fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), d.path)
    return True


def _copy_range(src: int, dst: int, size: int) -> bool:
    copy_file_range: Optional[Callable[..., int]] = getattr(os, "copy_file_range", None)
    if copy_file_range is None:
        return False
    done = 0
    try:
        while done < size:
            n = copy_file_range(src, dst, size - done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if done == 0 and exc.errno in (
            errno.EXDEV,
            errno.ENOSYS,
            errno.EINVAL,
            errno.EOPNOTSUPP,
            errno.EBADF,
            errno.EPERM,
        ):
            return False
        raise
    return done >= size


_CLONE_NOFOLLOW = 0x0001  # sys/clonefile.h
CLONE_FILES = sys.platform == "darwin"
"""Whether :func:`clone_into` can make a file (else it always returns False)."""


def clone_into(src: int, d: Dir, name: str) -> bool:
    """Make ``name`` in ``d`` a copy-on-write clone of open file ``src``.

    ``fclonefileat`` on macOS (APFS): data, mode and flags in one call, no
    bytes copied. Returns False where there is no such call (Linux clones
    inside :func:`copy_fd` instead) or the file system refuses (HFS+,
    another volume): the caller copies.
    """
    func = getattr(_libc, "fclonefileat", None) if sys.platform == "darwin" else None
    if func is None:
        return False
    if func(src, d.fd, os.fsencode(name), _CLONE_NOFOLLOW) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err), os.path.join(d.path, name))


def copy_fd(src: int, dst: int, clone: bool = True) -> bool:
    """Copy all data of ``src`` into the empty file ``dst``.

    A copy-on-write clone where the file system offers one (``FICLONE`` on
    btrfs and xfs) unless ``clone`` is false, else ``copy_file_range``, else
    plain reads and writes. Returns whether the data was cloned.
    """
    if sys.platform == "linux":
        import fcntl  # noqa: PLC0415 - POSIX-only module, imported where used

        if clone:
            try:
                fcntl.ioctl(dst, _FICLONE, src)
            except OSError:
                pass  # no reflinks here (ext4, tmpfs, across devices): copy instead
            else:
                return True
        size = os.fstat(src).st_size
        if size and _copy_range(src, dst, size):
            return False
        os.lseek(src, 0, os.SEEK_SET)
        os.lseek(dst, 0, os.SEEK_SET)
        os.ftruncate(dst, 0)
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return False
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def holders(path: str) -> List[Tuple[int, str]]:
    """Processes holding ``path`` open or mapped, this one included, as ``(pid, name)``.

    Read from ``/proc/*/fd`` and ``/proc/*/maps`` (Linux); processes of other
    users are not visible without privileges. Empty where there is no
    ``/proc`` (macOS) or ``path`` is gone: this only improves an error message.
    """
    try:
        want = os.stat(path, follow_symlinks=False)
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    real = os.fsencode(os.path.realpath(path))
    return [(int(pid), _process_name(pid)) for pid in pids if _holds(pid, want, real)]


def _holds(pid: str, want: os.stat_result, real: bytes) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # the process ended, or is not ours to look at
        fds = []
    for fd in fds:
        try:
            st = os.stat(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    try:  # a mapped image (executable, shared library) counts as held too
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return any(
                _maps_line_matches(line, want.st_dev, want.st_ino, real)
                for line in maps
            )
    except OSError:
        return False


def _maps_line_matches(line: bytes, dev: int, ino: int, path: bytes) -> bool:
    """Whether a ``/proc/PID/maps`` line maps the file with ``st_dev``/``st_ino``.

    A line reads ``address perms offset MAJOR:MINOR inode pathname``, the
    device in hex (proc(5)). Inode numbers repeat across file systems, so the
    device must match too. btrfs subvolumes and overlayfs can show there a
    device or inode other than ``stat`` gives (the backing one), so the exact
    path of a live mapping also counts.
    """
    fields = line.split(maxsplit=5)
    if len(fields) < 5:
        return False
    try:
        major, minor = (int(part, 16) for part in fields[3].split(b":"))
        inode = int(fields[4])
    except ValueError:
        return False
    if inode == 0:  # anonymous memory, the heap, the stack
        return False
    if inode == ino and os.makedev(major, minor) == dev:
        return True
    return len(fields) == 6 and fields[5].rstrip(b"\n") == path


def _process_name(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def is_readonly_blocker(d: Dir, name: str) -> bool:
    """Windows only: whether a read-only attribute blocks a delete. Never on POSIX."""
    del d, name
    return False


def clear_readonly(d: Dir, name: str) -> None:
    """Windows only: clear the read-only attribute. Nothing to do on POSIX."""
    del d, name


def set_readonly(d: Dir, name: str) -> None:
    """Windows only: set the read-only attribute. Nothing to do on POSIX."""
    del d, name


def schedule_delete_on_reboot(path: str) -> bool:
    """Windows only: nothing on POSIX holds a file against deletion; always False."""
    del path
    return False


def is_dir_stat(st: os.stat_result) -> bool:
    """Whether an ``lstat`` result is a real directory (not a link to one)."""
    return stat.S_ISDIR(st.st_mode)
