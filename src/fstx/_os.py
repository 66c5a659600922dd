"""The narrow OS layer: every filesystem call of the engine goes through here.

Commit, rollback, recovery and staging call these functions and nothing else
that touches the disk. A test can install a hook that sees every call before
and after it happens, and can raise an ``OSError`` or end the process there:
that is how "fail at call k" and "crash at call k" are driven.
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Any, Callable, Optional, Tuple, TypeVar, cast

from fstx._platform import Dir, impl

__all__ = [
    "MUTATING",
    "NO_EXCHANGE",
    "Dir",
    "Hook",
    "chmod",
    "clone_into",
    "close",
    "close_dir",
    "copy_fd",
    "exchange",
    "fsync",
    "fsync_dir",
    "get_hook",
    "link",
    "link_in",
    "listdir",
    "lstat",
    "mkdir",
    "open_dir",
    "open_file",
    "open_root",
    "readlink",
    "rename",
    "rename_noreplace",
    "rmdir",
    "set_hook",
    "symlink",
    "syncfs",
    "unlink",
    "utime",
    "write",
]

Hook = Callable[[str, str, Tuple[Any, ...]], None]
"""``hook(name, phase, args)`` with ``phase`` ``"before"`` or ``"after"``."""

_F = TypeVar("_F", bound=Callable[..., Any])
_hook: Optional[Hook] = None

MUTATING = frozenset(
    {
        "chmod",
        "clone_into",
        "copy_fd",
        "exchange",
        "fsync",
        "fsync_dir",
        "link",
        "link_in",
        "mkdir",
        "open_file",
        "rename",
        "rename_noreplace",
        "rmdir",
        "symlink",
        "syncfs",
        "unlink",
        "utime",
        "write",
    }
)
"""Calls that change the disk or its durability (the ones crash sweeps step through)."""


NO_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
"""What :func:`exchange` raises where there is no atomic swap: ``ENOSYS``
without the call (or off Linux), ``EINVAL`` on file systems that do not
implement it (rename(2) man page)."""


def set_hook(hook: Optional[Hook]) -> Optional[Hook]:
    """Install ``hook`` (or remove it with None); returns the previous one."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def get_hook() -> Optional[Hook]:
    """The hook in force, if any."""
    return _hook


def _seam(name: str, func: _F) -> _F:
    @functools.wraps(func)
    def call(*args: Any) -> Any:
        hook = _hook
        if hook is None:
            return func(*args)
        hook(name, "before", args)
        result = func(*args)
        hook(name, "after", args)
        return result

    return cast("_F", call)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


open_root = _seam("open_root", impl.open_root)
open_dir = _seam("open_dir", impl.open_dir)
close_dir = _seam("close_dir", impl.close_dir)
lstat = _seam("lstat", impl.lstat)
listdir = _seam("listdir", impl.listdir)
mkdir = _seam("mkdir", impl.mkdir)
rmdir = _seam("rmdir", impl.rmdir)
unlink = _seam("unlink", impl.unlink)
rename = _seam("rename", impl.rename)
rename_noreplace = _seam("rename_noreplace", impl.rename_noreplace)
exchange = _seam("exchange", impl.exchange)
link = _seam("link", impl.link)
link_in = _seam("link_in", impl.link_in)
symlink = _seam("symlink", impl.symlink)
readlink = _seam("readlink", impl.readlink)
open_file = _seam("open_file", impl.open_file)
chmod = _seam("chmod", impl.chmod)
utime = _seam("utime", impl.utime)
fsync = _seam("fsync", impl.fsync)
fsync_dir = _seam("fsync_dir", impl.fsync_dir)
syncfs = _seam("syncfs", impl.syncfs)
copy_fd = _seam("copy_fd", impl.copy_fd)
clone_into = _seam("clone_into", impl.clone_into)
write = _seam("write", _write)
close = _seam("close", os.close)
