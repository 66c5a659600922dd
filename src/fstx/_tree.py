"""The tree under a root, reached only through directory handles.

Every path is a tuple of name components relative to the root. To act on
``a/b/c`` we open ``a`` in the root, then ``b`` in ``a``, never following a
symlink, and act on ``c`` in ``b``. A directory swapped for a symlink makes
the walk fail instead of leading out of the root. Open handles are cached
(least recently used first out) and forgotten when a rename or removal may
have moved the directory they point at.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

from fstx import _os
from fstx._os import Dir

__all__ = ["Rel", "RootFS", "join", "split"]

Rel = Tuple[str, ...]

_CACHE_SIZE = 64


def join(rel: Rel) -> str:
    """``/``-joined form of a relative path, for messages and the journal."""
    return "/".join(rel)


def split(text: str) -> Rel:
    """Inverse of :func:`join`."""
    return tuple(text.split("/"))


class RootFS:
    """Operations on paths relative to an open root directory.

    Args:
        root: the root directory's path (absolute).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.top = _os.open_root(root)
        self._dirs: OrderedDict[Rel, Dir] = OrderedDict()
        self._pinned: Optional[Rel] = None
        # How many cached handles lie at or below each path: forget() runs on
        # every rename, and most renamed items have no handle below them.
        self._below: Dict[Rel, int] = {}

    def close(self) -> None:
        """Close every handle."""
        for d in self._dirs.values():
            _os.close_dir(d)
        self._dirs.clear()
        self._below.clear()
        _os.close_dir(self.top)

    def abspath(self, rel: Rel) -> str:
        """The absolute path of ``rel`` (for messages and errors)."""
        return os.path.join(self.root, *rel) if rel else self.root

    # -- handles -----------------------------------------------------------

    def dir(self, rel: Rel) -> Dir:
        """An open handle on directory ``rel``, never through a symlink."""
        if not rel:
            return self.top
        d = self._dirs.get(rel)
        if d is not None:
            self._dirs.move_to_end(rel)
            return d
        parent = self.dir(rel[:-1])
        try:
            d = _os.open_dir(parent, rel[-1])
        except NotADirectoryError as exc:
            # O_DIRECTORY|O_NOFOLLOW on a symlink gives ENOTDIR too. A symlink
            # where a directory was is not "absent": what lies behind it is
            # outside our reach, and undo must stop there, not skip a step.
            st = _os.lstat(parent, rel[-1])
            if stat.S_ISLNK(st.st_mode):
                raise OSError(
                    errno.ELOOP,
                    "a symlink stands where a directory was",
                    self.abspath(rel),
                ) from exc
            raise
        self._dirs[rel] = d
        self._count(rel, 1)
        if len(self._dirs) > _CACHE_SIZE:
            if next(iter(self._dirs)) == self._pinned:
                self._dirs.move_to_end(self._pinned)  # in use by a two-path call
            key, old = self._dirs.popitem(last=False)
            self._count(key, -1)
            _os.close_dir(old)
        return d

    def _count(self, rel: Rel, delta: int) -> None:
        below = self._below
        for i in range(1, len(rel) + 1):
            top = rel[:i]
            n = below.get(top, 0) + delta
            if n:
                below[top] = n
            else:
                del below[top]

    def forget(self, rel: Rel) -> None:
        """Drop cached handles on ``rel`` and below (it may have moved)."""
        if rel and rel not in self._below:
            return  # no handle at or below it: nothing to scan for
        n = len(rel)
        stale = [k for k in self._dirs if k[:n] == rel]
        for key in stale:
            self._count(key, -1)
            _os.close_dir(self._dirs.pop(key))

    def _at(self, rel: Rel) -> Tuple[Dir, str]:
        if not rel:
            raise OSError(errno.EINVAL, "the root itself cannot be changed", self.root)
        return self.dir(rel[:-1]), rel[-1]

    def _at2(self, src: Rel, dst: Rel) -> Tuple[Dir, str, Dir, str]:
        # Resolving a deep dst may evict (close) src's handle: keep it pinned.
        sd, sn = self._at(src)
        self._pinned = src[:-1]
        try:
            dd, dn = self._at(dst)
        finally:
            self._pinned = None
        return sd, sn, dd, dn

    # -- queries -------------------------------------------------------------

    def lstat(self, rel: Rel) -> Optional[os.stat_result]:
        """``lstat`` of ``rel``, or None if it (or a parent) does not exist."""
        if not rel:
            return os.fstat(self.top.fd) if self.top.fd >= 0 else os.stat(self.root)
        try:
            d, name = self._at(rel)
            return _os.lstat(d, name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        # A parent swapped for a symlink raises ELOOP (see dir()): the path
        # cannot be reached inside the root, which is not the same as absent.

    def exists(self, rel: Rel) -> bool:
        """Whether ``rel`` exists (a dangling symlink exists)."""
        return self.lstat(rel) is not None

    def is_dir(self, rel: Rel) -> bool:
        """Whether ``rel`` is a directory (not a symlink to one)."""
        st = self.lstat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def listdir(self, rel: Rel) -> List[str]:
        """Names in directory ``rel``."""
        return _os.listdir(self.dir(rel))

    def readlink(self, rel: Rel) -> str:
        """Target of symlink ``rel``."""
        d, name = self._at(rel)
        return _os.readlink(d, name)

    def same(self, a: Rel, b: Rel) -> bool:
        """Whether ``a`` and ``b`` exist and are the same file (hard links)."""
        sa, sb = self.lstat(a), self.lstat(b)
        return (
            sa is not None
            and sb is not None
            and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
        )

    # -- changes -------------------------------------------------------------

    def mkdir(self, rel: Rel, mode: int = 0o777) -> None:
        """Create directory ``rel``."""
        d, name = self._at(rel)
        _os.mkdir(d, name, mode)

    def rmdir(self, rel: Rel) -> None:
        """Remove the empty directory ``rel``."""
        d, name = self._at(rel)
        self.forget(rel)
        _os.rmdir(d, name)

    def unlink(self, rel: Rel) -> None:
        """Remove file or symlink ``rel``."""
        d, name = self._at(rel)
        _os.unlink(d, name)

    def rename(self, src: Rel, dst: Rel) -> None:
        """Rename ``src`` to ``dst``, replacing a file or symlink there."""
        sd, sn, dd, dn = self._at2(src, dst)
        self.forget(src)
        self.forget(dst)
        _os.rename(sd, sn, dd, dn)

    def rename_noreplace(self, src: Rel, dst: Rel) -> None:
        """Rename, failing with ``FileExistsError`` if ``dst`` exists."""
        sd, sn, dd, dn = self._at2(src, dst)
        self.forget(src)
        self.forget(dst)
        _os.rename_noreplace(sd, sn, dd, dn)

    def exchange(self, a: Rel, b: Rel) -> None:
        """Swap the items at ``a`` and ``b`` atomically (``ENOSYS`` if impossible)."""
        sd, sn, dd, dn = self._at2(a, b)
        self.forget(a)
        self.forget(b)
        _os.exchange(sd, sn, dd, dn)

    def link(self, src: Rel, dst: Rel) -> None:
        """Hard-link ``dst`` to ``src``."""
        sd, sn, dd, dn = self._at2(src, dst)
        _os.link(sd, sn, dd, dn)

    def symlink(self, target: str, rel: Rel) -> None:
        """Create symlink ``rel`` pointing at ``target``."""
        d, name = self._at(rel)
        _os.symlink(target, d, name)

    def chmod(self, rel: Rel, mode: int) -> None:
        """Change the mode bits of ``rel`` (a file or directory)."""
        d, name = self._at(rel)
        _os.chmod(d, name, mode)

    def utime(self, rel: Rel, ns: Tuple[int, int]) -> None:
        """Set the times of ``rel`` without following a symlink."""
        d, name = self._at(rel)
        _os.utime(d, name, ns)

    def open(self, rel: Rel, flags: int, mode: int = 0o666) -> int:
        """Open ``rel`` (never through a symlink) and return the descriptor."""
        d, name = self._at(rel)
        return _os.open_file(d, name, flags, mode)

    def fsync_dir(self, rel: Rel) -> None:
        """Make the entries of directory ``rel`` durable."""
        _os.fsync_dir(self.dir(rel))

    def remove_tree(self, rel: Rel) -> None:
        """Remove ``rel`` and everything below it, never following a symlink."""
        st = self.lstat(rel)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.unlink(rel)
            return
        for name in self.listdir(rel):
            self.remove_tree((*rel, name))
        self.rmdir(rel)

    def walk_files(self, rel: Rel) -> Iterator[Rel]:
        """Every path below ``rel`` (itself included), children before parents."""
        st = self.lstat(rel)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            for name in self.listdir(rel):
                yield from self.walk_files((*rel, name))
        yield rel
