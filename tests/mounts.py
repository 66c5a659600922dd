"""Real mounts for the root-only suites: loop images, tmpfs, remounts, power cuts.

Loop images are copied from a pristine template made once per process and
file system type (``mkfs`` runs once, a sparse copy per use). Every mount
goes through :class:`Mounts`, which unmounts what it mounted, in reverse
order, when it is closed; a mount that stays busy is detached lazily, so no
test leaves a mount behind. Mount points are fresh temporary directories, so
two test processes (pytest-xdist workers) never share one.

``FS_IOC_SHUTDOWN`` with ``FS_GOING_DOWN_NOLOGFLUSH`` is a power cut that
ext4 and xfs can take without device-mapper: from that instant nothing more
reaches the disk; the next mount replays the file system's journal.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence

FS_IOC_SHUTDOWN = 0x8004587D  # linux/fs.h: _IOR('X', 125, __u32)
FS_GOING_DOWN_NOLOGFLUSH = 2  # drop the log too: what was not durable is lost

IMAGE_SIZE = 64 << 20
"""Bytes in a loop image (sparse: only what the file system writes takes space)."""

MOUNT_OPTIONS: Dict[str, Sequence[str]] = {
    # auto_da_alloc would flush a file renamed over another and hide a
    # missing fsync before rename (research/crash.md, section 0).
    "ext4": ("noauto_da_alloc",),
    "xfs": (),
}

_MKFS: Dict[str, Sequence[str]] = {
    # A journal (the default), no reserved blocks, tables written now rather
    # than by a background thread after the mount.
    "ext4": ("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", "-I", "256",
             "-E", "lazy_itable_init=0,lazy_journal_init=0"),
    "xfs": ("mkfs.xfs", "-q", "-f"),
}  # fmt: skip

# mkfs.xfs (xfsprogs >= 5.19) refuses file systems under 300 MB unless it is
# run by fstests, which it recognises by these variables (xfs_mkfs.c).
_XFS_SMALL_ENV = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


class MountError(RuntimeError):
    """A mount command failed (its stderr is in the message)."""


def run(*argv: str, env: Optional[Dict[str, str]] = None) -> str:
    """Run a command; its stdout, or :class:`MountError` with its stderr."""
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=env, timeout=120
    )
    if done.returncode != 0:
        raise MountError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


# -- what this machine can do ------------------------------------------------


def why_no_mounts() -> Optional[str]:
    """Why this process cannot mount a tmpfs here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "mounts are tested on Linux only"
    if os.geteuid() != 0:
        return "mounting needs root"
    for tool in ("mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def why_no_loop(fstype: str) -> Optional[str]:
    """Why a loop image of ``fstype`` cannot be made and mounted here, or None."""
    reason = why_no_mounts()
    if reason is not None:
        return reason
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    if shutil.which(_MKFS[fstype][0]) is None:
        return f"{_MKFS[fstype][0]} is not installed (apt-get install " + (
            "xfsprogs)" if fstype == "xfs" else "e2fsprogs)"
        )
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            known = {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return "cannot read /proc/filesystems"
    if fstype not in known:
        return f"the kernel has no {fstype} driver"
    return None


def is_mounted(path: str) -> bool:
    """Whether ``path`` is a mount point now (from /proc/self/mountinfo)."""
    want = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash in octal.
            text = os.fsdecode(point.decode("unicode_escape").encode("latin-1"))
            if text == want:
                return True
    return False


# -- templates ---------------------------------------------------------------

_templates: Dict[str, str] = {}
_scratch: List[str] = []


def scratch_dir(prefix: str) -> str:
    """A fresh directory on tmpfs where there is one (images copy fast there)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def _remove_templates() -> None:
    for path in _scratch:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_remove_templates)


def template(fstype: str) -> str:
    """A pristine image of ``fstype``, made once per process."""
    path = _templates.get(fstype)
    if path is not None and os.path.exists(path):
        return path
    if not _scratch:
        _scratch.append(scratch_dir("fstx-templates-"))
    path = os.path.join(_scratch[0], f"{fstype}.img")
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    env = dict(os.environ, **_XFS_SMALL_ENV) if fstype == "xfs" else None
    run(*_MKFS[fstype], path, env=env)
    _templates[fstype] = path
    return path


def copy_image(src: str, dst: str) -> None:
    """A sparse copy of an image (holes stay holes)."""
    run("cp", "--sparse=always", src, dst)


# -- power cuts and syncs ------------------------------------------------------


def shutdown(mountpoint: str, flag: int = FS_GOING_DOWN_NOLOGFLUSH) -> None:
    """Cut the power to the file system mounted at ``mountpoint`` (ext4, xfs)."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", flag))
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def syncfs(path: str) -> None:
    """Make everything on the file system holding ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


# -- mounts ------------------------------------------------------------------

_live: List[Mounts] = []


class Mounts:
    """The mounts one test made; :meth:`close` undoes them all, newest first.

    Args:
        base: where mount points and images are created (a fresh directory
            is made inside it, so nothing is shared with another process).
    """

    def __init__(self, base: Optional[str] = None) -> None:
        self.base = tempfile.mkdtemp(prefix="fstx-mounts-", dir=base)
        self.points: List[str] = []
        _live.append(self)

    def point(self, name: str) -> str:
        """A fresh, empty directory to mount on."""
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self.base)

    def _mount(self, where: str, argv: Sequence[str]) -> str:
        os.makedirs(where, exist_ok=True)
        run("mount", *argv, where)
        self.points.append(where)
        return where

    def tmpfs(
        self,
        where: str,
        *,
        size: Optional[str] = None,
        nr_inodes: Optional[int] = None,
        mode: str = "0755",
    ) -> str:
        """Mount a tmpfs at ``where`` (created if missing)."""
        options = [f"mode={mode}"]
        if size is not None:
            options.append(f"size={size}")
        if nr_inodes is not None:
            options.append(f"nr_inodes={nr_inodes}")
        return self._mount(where, ("-t", "tmpfs", "-o", ",".join(options), "tmpfs"))

    def loop(self, image: str, where: str, fstype: str) -> str:
        """Mount ``image`` at ``where`` through a loop device (freed on unmount)."""
        options = ",".join(("loop", *MOUNT_OPTIONS[fstype]))
        return self._mount(where, ("-t", fstype, "-o", options, image))

    def fresh_image(self, fstype: str, name: str = "fs") -> str:
        """A new image of ``fstype``, copied from the template."""
        image = os.path.join(
            tempfile.mkdtemp(prefix=f"{name}-img-", dir=self.base), "fs.img"
        )
        copy_image(template(fstype), image)
        return image

    @staticmethod
    def remount(where: str, *options: str) -> None:
        """Change the options of a mount (``ro``, ``rw``...)."""
        run("mount", "-o", ",".join(("remount", *options)), where)

    def unmount(self, where: str) -> None:
        """Unmount ``where`` (the newest mount there); lazily if it stays busy."""
        if where in self.points:
            index = len(self.points) - 1 - self.points[::-1].index(where)
            del self.points[index]
        for attempt in range(20):
            try:
                run("umount", where)
            except MountError:
                if not is_mounted(where):
                    return
                if attempt == 19:
                    break
                time.sleep(0.05)  # udev or blkid probing a new loop device
            else:
                return
        run("umount", "-l", where)

    def close(self) -> None:
        """Undo every mount still in place, newest first, then remove the scratch."""
        errors: List[Exception] = []
        while self.points:
            try:
                self.unmount(self.points[-1])
            except MountError as exc:
                errors.append(exc)
        if self in _live:
            _live.remove(self)
        if errors:
            raise MountError("; ".join(str(e) for e in errors))
        _force_rmtree(self.base)


def _force_rmtree(path: str) -> None:
    # A test may leave read-only directories or immutable files behind on
    # failure; open them up first so that the scratch always goes.
    for top, dirs, _files in os.walk(path):
        for name in dirs:
            full = os.path.join(top, name)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):  # EPERM: not ours to change
                    os.chmod(full, 0o755)
    shutil.rmtree(path, ignore_errors=True)


@atexit.register
def _close_all() -> None:
    for mounts in list(_live):
        with contextlib.suppress(MountError):  # best effort at interpreter exit
            mounts.close()


@contextlib.contextmanager
def mounts(base: Optional[str] = None) -> Iterator[Mounts]:
    """A :class:`Mounts` closed at the end of the block."""
    made = Mounts(base)
    try:
        yield made
    finally:
        made.close()
