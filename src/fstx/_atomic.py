"""Cache writers: publish one file or one directory by a single rename.

A writer fills a temporary beside the target (``.fstx-tmp-`` and 16 hex
digits, whatever the target is called, so a 255-byte target name still
works), makes it durable if asked, and renames it over the target. Readers
see the old entry or the new one, never part of one. Nothing is journaled:
the rename is the commit point, and a writer killed before it leaves only its
own temporary, which :func:`sweep` removes later.

A live writer holds an exclusive ``flock`` on its temporary (the file, or the
directory's own descriptor) for as long as the temporary exists, so
:func:`sweep` can tell a dead writer's leftover from a live writer's work by
trying the lock without waiting (the liveness test used by ``flock(1)`` and
tox-dev/filelock). Where there are no such locks (Windows, some network and
FUSE file systems), :func:`sweep` falls back on the age of the entry.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    AnyStr,
    Callable,
    Generic,
    List,
    Literal,
    Optional,
    Tuple,
    TypeVar,
    Union,
    cast,
    overload,
)

from fstx import _os
from fstx._errors import InUseError, PlanError
from fstx._platform import Dir, impl
from fstx._retry import Retrier, RetryPolicy, is_transient

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "TEMP_PREFIX",
    "AtomicDir",
    "AtomicFile",
    "atomic_dir",
    "atomic_open",
    "atomic_write",
    "sweep",
]

_log = logging.getLogger("fstx")
_T = TypeVar("_T")

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
Exist = Literal["replace", "keep"]
Durability = Literal["full", "none"]
_BinaryMode = Literal["wb", "bw", "w+b", "wb+"]
_TextMode = Literal["w", "wt", "tw", "w+", "w+t", "wt+"]

TEMP_PREFIX = ".fstx-tmp-"
"""Every temporary of a cache writer is named this plus 16 hex digits."""

_EXIST = ("replace", "keep")
_DURABILITY = ("full", "none")

# POSIX keeps the temporary open until its name is gone, so that the writer's
# flock covers its whole life. Windows has no flock to keep, and closes first so
# that a reader opening the new entry without sharing write access does not meet
# our write handle (CreateFileW's share modes make that a sharing violation).
_CLOSE_BEFORE_RENAME = sys.platform == "win32"

# FlushFileBuffers needs write access on Windows; fsync(2) is fine with O_RDONLY.
_SYNC_FLAGS = os.O_RDWR if sys.platform == "win32" else os.O_RDONLY
_BINARY = getattr(os, "O_BINARY", 0)

# rename_noreplace's portable fallback (hard link + unlink) cannot move a
# directory: link(2) gives EPERM; renameat2 itself may be missing or refused.
_NO_NOREPLACE = frozenset(
    {errno.EPERM, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
)
# rename(2) of a directory onto an existing entry that it may not replace.
_TARGET_EXISTS = frozenset({errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR})

# Publishing loops while other writers keep removing and re-creating the target.
_RACE_ATTEMPTS = 64

_JITTER = random.Random()  # noqa: S311 - jitter of retry waits, not a secret


# --- advisory locks (the liveness test of sweep) ---------------------------------

if sys.platform == "win32":

    def _lock(fd: int, *, wait: bool) -> Optional[bool]:
        """Windows has no flock: sweep goes by age alone there."""
        del fd, wait
        return None

    def _claim(d: Dir, name: str, is_dir: bool) -> Tuple[bool, Optional[int]]:
        """No locks to try: the age test decides."""
        del d, name, is_dir
        return True, None

else:
    import fcntl

    # flock(2) on file systems without it: ENOLCK (NFS without lockd), EOPNOTSUPP or
    # EINVAL (some FUSE file systems), EBADF (NFS emulates flock with fcntl locks,
    # which refuse an exclusive lock on a descriptor opened read-only).
    _NO_LOCKS = frozenset(
        {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
    )

    def _lock(fd: int, *, wait: bool) -> Optional[bool]:
        """Take an exclusive flock on ``fd``.

        Returns:
            True when locked, False when another open file holds it (only
            without ``wait``), None when this file system has no such locks.
        """
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                return None
            raise
        return True

    def _claim(d: Dir, name: str, is_dir: bool) -> Tuple[bool, Optional[int]]:
        """Whether leftover ``name`` may be removed, and the descriptor locking it.

        A live writer holds an exclusive flock on its temporary; a dead one's
        lock died with it. Where locks cannot be tried, the age test decides.
        """
        flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_DIRECTORY if is_dir else 0)
        try:
            fd = _os.open_file(d, name, flags)
        except (FileNotFoundError, NotADirectoryError):
            return False, None  # gone, or replaced since the listing
        except PermissionError:
            return True, None  # cannot try the lock: the age test decides
        try:
            locked = _lock(fd, wait=False)
            if locked is None:
                _os.close(fd)
                return True, None
            now = _os.lstat(d, name)
            own = os.fstat(fd)
        except FileNotFoundError:
            _os.close(fd)
            return False, None
        except BaseException:
            _os.close(fd)
            raise
        if not locked or (now.st_dev, now.st_ino) != (own.st_dev, own.st_ino):
            _os.close(fd)
            return False, None
        return True, fd


# --- the target --------------------------------------------------------------------


def _new_name() -> str:
    return TEMP_PREFIX + secrets.token_hex(8)


def _failure(exc: OSError, operation: str, doing: str, path: str) -> OSError:
    """The same kind of error, naming the caller's path and what fstx was doing.

    The original, which names the temporary relative to its directory, is
    chained as the cause.
    """
    reason = exc.strerror or str(exc)
    # The fourth argument (winerror) keeps the Windows classification; POSIX ignores it.
    return OSError(
        exc.errno,
        f"{reason} ({operation} was {doing})",
        path,
        getattr(exc, "winerror", None),
    )


def _open_parent(path: str, durable: bool) -> Dir:
    """Open directory ``path``, creating it and its missing parents first."""
    try:
        found: Dir = _os.open_root(path)
    except FileNotFoundError:
        pass
    else:
        return found
    head, tail = os.path.split(path)
    if not tail or head == path:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    above = _open_parent(head, durable)
    try:
        try:
            _os.mkdir(above, tail, 0o777)
        except FileExistsError:
            pass  # another writer made it at the same time; it may not be durable yet
        if durable:
            _os.fsync_dir(above)
    finally:
        _os.close_dir(above)
    made: Dir = _os.open_root(path)
    return made


class _Target:
    """The entry a writer publishes: its parent directory, its name, the options."""

    def __init__(
        self,
        operation: str,
        path: PathArg,
        exist: str,
        durability: str,
        retry: Optional[RetryPolicy],
    ) -> None:
        self.operation = operation
        self.display = os.fsdecode(os.fspath(path))
        head, name = os.path.split(self.display)
        if name in ("", os.curdir, os.pardir):
            raise PlanError(
                operation, self.display, "the path must end in a file or directory name"
            )
        if exist not in _EXIST:
            raise PlanError(
                operation,
                self.display,
                f"exist must be 'replace' or 'keep', not {exist!r}",
            )
        if durability not in _DURABILITY:
            raise PlanError(
                operation,
                self.display,
                f"durability must be 'full' or 'none', not {durability!r}",
            )
        self.parent_path = os.path.abspath(head or os.curdir)
        self.name = name
        self.keep = exist == "keep"
        self.durable = durability == "full"
        # One jitter source for every writer: a fresh random.Random per call
        # seeds itself from os.urandom (~13 µs, a good part of a small write).
        self.retrier = Retrier(retry or RetryPolicy(), rng=_JITTER)
        self._dir: Optional[Dir] = None

    @property
    def dir(self) -> Dir:
        assert self._dir is not None, "the target's directory is not open"
        return self._dir

    def run(self, doing: str, func: Callable[..., _T], *args: Any) -> _T:
        """Call ``func(*args)``, turning an ``OSError`` into one that names the path."""
        try:
            return func(*args)
        except InUseError:
            raise
        except OSError as exc:
            raise _failure(exc, self.operation, doing, self.display) from exc

    def publish_call(self, doing: str, func: Callable[..., None], *args: Any) -> None:
        """Make a publishing call, waiting out transient errors (Windows readers)."""
        try:
            self.retrier.call(func, *args, operation=doing, path=self.display)
        except FileExistsError:
            raise  # the caller's "another writer won" signal
        except OSError as exc:
            if not is_transient(exc):
                raise _failure(exc, self.operation, doing, self.display) from exc
            holders: Callable[[str], List[Tuple[int, str]]] = getattr(
                impl, "holders", lambda _path: []
            )
            raise InUseError(
                self.display,
                doing,
                holders(os.path.join(self.parent_path, self.name)),
                winerror=getattr(exc, "winerror", None),
                err=exc.errno or errno.EBUSY,
            ) from exc

    def open(self) -> None:
        self._dir = self.run(
            "opening the parent directory", _open_parent, self.parent_path, self.durable
        )

    def close(self) -> None:
        if self._dir is not None:
            d, self._dir = self._dir, None
            _os.close_dir(d)

    def exists(self) -> bool:
        try:
            self.run("looking for an existing entry", _os.lstat, self.dir, self.name)
        except FileNotFoundError:
            return False
        return True

    def sync_parent(self) -> None:
        if self.durable:
            self.run("flushing the directory to disk", _os.fsync_dir, self.dir)

    def remove_quietly(self, name: str, *, what: str) -> None:
        """Remove a file or a tree; on failure, log it and leave it for sweep."""
        policy = self.retrier.policy
        try:
            Retrier(policy).call(
                _remove_entry,
                self.dir,
                name,
                operation="remove",
                path=name,
                budget=policy.defer_after,
            )
        except OSError as exc:
            _log.warning(
                "%s: could not remove %s %r in %r (%s); fstx.sweep() removes it later",
                self.operation,
                what,
                name,
                self.parent_path,
                exc,
            )

    def temp_path(self, name: str) -> str:
        return os.path.join(self.parent_path, name)


def _remove_entry(d: Dir, name: str) -> None:
    """Remove a file, symlink or whole tree; what is already gone is fine.

    Two removers may meet (a sweep and the writer that swapped the entry out),
    so every "no such file" along the way counts as done.
    """
    try:
        st = _os.lstat(d, name)
    except FileNotFoundError:
        return
    if not impl.is_dir_stat(st):
        try:
            _os.unlink(d, name)
        except FileNotFoundError:
            pass  # a concurrent remover was first
        return
    try:
        sub = _os.open_dir(d, name)
    except FileNotFoundError:
        return
    try:
        for child in _os.listdir(sub):
            _remove_entry(sub, child)
    finally:
        _os.close_dir(sub)
    try:
        _os.rmdir(d, name)
    except FileNotFoundError:
        pass  # a concurrent remover was first


def _holds(d: Dir, name: str, fd: int) -> bool:
    """Lock a fresh temporary for its writer's lifetime.

    A sweep may have locked and removed it between its creation and our lock
    (it is unlocked for that moment): then the name is gone, and the writer
    starts over with a new one.
    """
    if _lock(fd, wait=True) is None:
        return True  # no locks here: sweep goes by age
    try:
        st = _os.lstat(d, name)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


# --- files -----------------------------------------------------------------------


class _TempFile:
    """An open, locked temporary file beside the target."""

    def __init__(self, target: _Target, *, readable: bool = False) -> None:
        self.target = target
        access = os.O_RDWR if readable else os.O_WRONLY
        flags = access | os.O_CREAT | os.O_EXCL | _BINARY
        while True:
            name = _new_name()
            try:
                fd = target.run(
                    "creating its temporary file",
                    _os.open_file,
                    target.dir,
                    name,
                    flags,
                    0o666,
                )
            except FileExistsError:
                continue  # 64 random bits met a leftover of the same name
            try:
                held = target.run(
                    "locking its temporary file", _holds, target.dir, name, fd
                )
            except BaseException:
                _os.close(fd)
                target.remove_quietly(name, what="temporary file")
                raise
            if held:
                break
            _os.close(fd)
        self.name = name
        self.fd: Optional[int] = fd

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _os.close(fd)

    def discard(self) -> None:
        """Close and remove the temporary (closing first: Windows needs it)."""
        try:
            self._close()
        except OSError as exc:
            # The content is thrown away, so a failing close (EIO from a network file
            # system's late write-back) tells the caller nothing; the error that led
            # here is the one to raise.
            _log.debug(
                "%s: closing a discarded temporary: %s", self.target.operation, exc
            )
        self.target.remove_quietly(self.name, what="temporary file")

    def place(self) -> bool:
        """Flush the data and rename over the target; False if kept out.

        The caller flushes the directory next, once it has noted the result.
        """
        t = self.target
        try:
            if t.durable:
                assert self.fd is not None
                t.run("flushing the temporary file to disk", _os.fsync, self.fd)
            if _CLOSE_BEFORE_RENAME:
                self._close()
            if t.keep:
                try:
                    t.publish_call(
                        "publishing",
                        _os.rename_noreplace,
                        t.dir,
                        self.name,
                        t.dir,
                        t.name,
                    )
                except FileExistsError:
                    self.discard()
                    return False
            else:
                t.publish_call("replacing", _os.rename, t.dir, self.name, t.dir, t.name)
        except BaseException:
            self.discard()
            raise
        self._close()
        return True


def _payload(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(
        f"atomic_write data must be bytes or str, not {type(data).__name__}"
    )


def atomic_write(
    path: PathArg,
    data: Union[bytes, bytearray, memoryview, str],
    *,
    exist: Exist = "replace",
    durability: Durability = "full",
    retry: Optional[RetryPolicy] = None,
) -> bool:
    """Write a whole file at once: readers see the old content or the new, never part.

    Missing parent directories are created.

    Args:
        path: the file to write.
        data: its content; a ``str`` is encoded as UTF-8 (encode it yourself for
            another encoding).
        exist: ``"replace"``: ours wins over an existing entry. ``"keep"``: an
            existing entry stays and ours is discarded (another writer won).
        durability: ``"full"``: the file and its directory entry are flushed to
            disk before this returns, so the write survives a power loss.
            ``"none"``: no fsync at all; still atomic against a process crash.
        retry: how long to wait out a transient error on the publishing rename
            (on Windows, a reader holding the old file); the default policy
            if None.

    Returns:
        Whether this call published its data: always True with
        ``exist="replace"``; False with ``exist="keep"`` when an entry was
        already there (then nothing was written at all).

    Raises:
        PlanError: a bad ``exist`` or ``durability`` value, or a path without a name.
        InUseError: the target stayed in use past the retry deadline.
        OSError: the write failed; the target is unchanged and no temporary is left.
    """
    payload = _payload(data)
    target = _Target("atomic_write", path, exist, durability, retry)
    target.open()
    try:
        if target.keep and target.exists():
            return False
        temp = _TempFile(target)
        try:
            assert temp.fd is not None
            target.run("writing its temporary file", _os.write, temp.fd, payload)
        except BaseException:
            temp.discard()
            raise
        published = temp.place()
        if published:
            target.sync_parent()
        return published
    finally:
        target.close()


def _parse_mode(path: str, mode: str) -> Tuple[bool, bool]:
    """Check an ``atomic_open`` mode; returns ``(binary, readable)``."""
    chars = set(mode)
    if "a" in chars:
        reason = (
            "appending cannot be atomic; write the whole new content with 'w' or 'wb'"
        )
    elif "x" in chars:
        reason = "use exist='keep' instead of mode 'x' to leave an existing file alone"
    elif "w" not in chars:
        reason = "it only writes new files; use 'w', 'wb', 'w+' or 'w+b'"
    elif len(chars) != len(mode) or not chars <= set("wbt+") or {"b", "t"} <= chars:
        reason = "use 'w', 'wb', 'w+' or 'w+b'"
    else:
        return "b" in chars, "+" in chars
    raise PlanError("atomic_open", path, f"mode {mode!r} is not supported: {reason}")


class AtomicFile(Generic[AnyStr]):
    """What :func:`atomic_open` returns: a context manager around a temporary file.

    Entering it gives the writable file; leaving the block without an
    exception publishes it, an exception discards it. Keep the object to learn
    what happened::

        writer = fstx.atomic_open(path, "wb", exist="keep")
        with writer as f:
            f.write(data)
        if not writer.published: ...  # another writer's entry was kept

    Attributes:
        path: the target, as given.
        published: after the block, whether this writer's file is now at
            ``path``; False before and after a discarded block.
    """

    def __init__(
        self,
        path: PathArg,
        mode: str,
        *,
        exist: str,
        durability: str,
        encoding: Optional[str],
        errors: Optional[str],
        newline: Optional[str],
        retry: Optional[RetryPolicy],
    ) -> None:
        self._target = _Target("atomic_open", path, exist, durability, retry)
        self.path = self._target.display
        self._binary, self._readable = _parse_mode(self.path, mode)
        if self._binary and (encoding, errors, newline) != (None, None, None):
            raise PlanError(
                "atomic_open",
                self.path,
                "binary mode takes no encoding, errors or newline",
            )
        self._mode = ("w+" if self._readable else "w") + ("b" if self._binary else "")
        self._encoding = None if self._binary else (encoding or "utf-8")
        self._errors = errors
        self._newline = newline
        self.published = False
        self._temp: Optional[_TempFile] = None
        self._file: Optional[IO[Any]] = None
        self._used = False

    def __enter__(self) -> IO[AnyStr]:
        if self._used:
            raise RuntimeError(f"atomic_open({self.path!r}) can be entered only once")
        self._used = True
        target = self._target
        target.open()
        try:
            temp = _TempFile(target, readable=self._readable)
            try:
                assert temp.fd is not None
                # closefd=False: the descriptor (and its flock) outlives the file
                # object until the rename, even if the caller closes the file.
                self._file = open(
                    temp.fd,
                    self._mode,
                    encoding=self._encoding,
                    errors=self._errors,
                    newline=self._newline,
                    closefd=False,
                )
            except BaseException:
                temp.discard()
                raise
        except BaseException:
            target.close()
            raise
        self._temp = temp
        return cast("IO[AnyStr]", self._file)

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        temp, file, target = self._temp, self._file, self._target
        self._temp = self._file = None
        assert temp is not None, "__exit__ without __enter__"
        assert file is not None
        try:
            if exc_type is not None:
                try:
                    file.close()
                except OSError:
                    pass  # flushing data that is discarded anyway (e.g. disk full)
                finally:
                    temp.discard()
                return
            try:
                target.run("writing its temporary file", file.close)
            except BaseException:
                temp.discard()
                raise
            self.published = temp.place()
            if self.published:
                target.sync_parent()
        finally:
            target.close()


@overload
def atomic_open(
    path: PathArg,
    mode: _BinaryMode = "wb",
    *,
    exist: Exist = "replace",
    durability: Durability = "full",
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    retry: Optional[RetryPolicy] = None,
) -> AtomicFile[bytes]: ...


@overload
def atomic_open(
    path: PathArg,
    mode: _TextMode,
    *,
    exist: Exist = "replace",
    durability: Durability = "full",
    encoding: Optional[str] = None,
    errors: Optional[str] = None,
    newline: Optional[str] = None,
    retry: Optional[RetryPolicy] = None,
) -> AtomicFile[str]: ...


@overload
def atomic_open(
    path: PathArg,
    mode: str,
    *,
    exist: Exist = "replace",
    durability: Durability = "full",
    encoding: Optional[str] = None,
    errors: Optional[str] = None,
    newline: Optional[str] = None,
    retry: Optional[RetryPolicy] = None,
) -> AtomicFile[Any]: ...


def atomic_open(
    path: PathArg,
    mode: str = "wb",
    *,
    exist: Exist = "replace",
    durability: Durability = "full",
    encoding: Optional[str] = None,
    errors: Optional[str] = None,
    newline: Optional[str] = None,
    retry: Optional[RetryPolicy] = None,
) -> AtomicFile[Any]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends.

    Readers see the old content or the new, never part of it. An exception in
    the block publishes nothing and removes the temporary. Missing parent
    directories are created when the block is entered.

    Args:
        path: the file to write.
        mode: ``"wb"`` (default) or ``"w"`` for text; ``"w+b"``/``"w+"`` also
            let you read back what you wrote. Read, append and ``"x"`` modes
            are refused (use ``exist="keep"`` for "only if absent").
        exist: ``"replace"`` or ``"keep"``, as for :func:`atomic_write`.
        durability: ``"full"`` or ``"none"``, as for :func:`atomic_write`.
        encoding: text mode only; UTF-8 if None (not the locale's encoding).
        errors: text mode only, as for :func:`open`.
        newline: text mode only, as for :func:`open`.
        retry: how long to wait out a transient error on the publishing rename.

    Returns:
        An :class:`AtomicFile`; its ``published`` attribute tells, after the
        block, whether this writer's file was published.

    Raises:
        PlanError: a bad mode, ``exist`` or ``durability``, at once.
    """
    return AtomicFile(
        path,
        mode,
        exist=exist,
        durability=durability,
        encoding=encoding,
        errors=errors,
        newline=newline,
        retry=retry,
    )


# --- directories -----------------------------------------------------------------


def _sync_tree(d: Dir) -> None:
    """Flush every regular file and directory under ``d``, then ``d`` itself."""
    for name in _os.listdir(d):
        st = _os.lstat(d, name)
        if impl.is_dir_stat(st):
            sub = _os.open_dir(d, name)
            try:
                _sync_tree(sub)
            finally:
                _os.close_dir(sub)
        elif stat.S_ISREG(st.st_mode):
            fd = _os.open_file(d, name, _SYNC_FLAGS | _BINARY)
            try:
                _os.fsync(fd)
            finally:
                _os.close(fd)
    _os.fsync_dir(d)


def _place_dir(t: _Target, name: str) -> bool:
    """Rename directory ``name`` to the target unless an entry is there already."""
    try:
        t.publish_call("publishing", _os.rename_noreplace, t.dir, name, t.dir, t.name)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_NOREPLACE:
            raise
    else:
        return True
    # No renameat2 (macOS, old kernels): plain rename(2) refuses to move a directory
    # onto a non-empty directory or a file, but would replace an empty directory.
    try:
        t.publish_call("publishing", _os.rename, t.dir, name, t.dir, t.name)
    except OSError as exc:
        if exc.errno in _TARGET_EXISTS:
            return False
        raise
    return True


def _swap_in(t: _Target, name: str) -> Optional[str]:
    """Put directory ``name`` in place of the existing target.

    Returns:
        The name that now holds the old entry (to be removed), or None when
        the target vanished meanwhile and nothing moved.
    """
    try:
        t.publish_call("exchanging", _os.exchange, t.dir, name, t.dir, t.name)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        if exc.errno not in _os.NO_EXCHANGE:
            raise
    else:
        return name
    # No atomic exchange (macOS, Windows, some file systems): move the old entry
    # away, then ours in. For that moment readers find no entry at all.
    away = _new_name()
    try:
        t.publish_call(
            "moving the old entry away", _os.rename, t.dir, t.name, t.dir, away
        )
    except FileNotFoundError:
        return None
    try:
        placed = _place_dir(t, name)
    except BaseException:
        try:
            _os.rename_noreplace(t.dir, away, t.dir, t.name)
        except OSError as undo:
            _log.warning(
                "%s: could not put the old entry back at %r (%s); it is %r",
                t.operation,
                t.display,
                undo,
                t.temp_path(away),
            )
        raise
    if placed:
        return away
    # Another writer published in the gap: its entry stands, ours goes in next round.
    t.remove_quietly(away, what="old entry")
    return None


class AtomicDir:
    """What :func:`atomic_dir` returns: a context manager around a temporary directory.

    Entering it gives the temporary directory (a :class:`pathlib.Path` beside
    the target) to fill; leaving the block without an exception publishes it,
    an exception removes it.

    Attributes:
        path: the target, as given.
        published: after the block, whether this writer's directory is now at
            ``path``.
    """

    def __init__(
        self,
        path: PathArg,
        *,
        exist: str,
        durability: str,
        retry: Optional[RetryPolicy],
    ) -> None:
        self._target = _Target("atomic_dir", path, exist, durability, retry)
        self.path = self._target.display
        self.published = False
        self._name: Optional[str] = None
        self._handle: Optional[Dir] = None
        self._used = False

    def __enter__(self) -> Path:
        if self._used:
            raise RuntimeError(f"atomic_dir({self.path!r}) can be entered only once")
        self._used = True
        t = self._target
        t.open()
        try:
            while True:
                name = _new_name()
                try:
                    t.run(
                        "creating its temporary directory",
                        _os.mkdir,
                        t.dir,
                        name,
                        0o777,
                    )
                except FileExistsError:
                    continue  # 64 random bits met a leftover of the same name
                try:
                    handle = t.run(
                        "opening its temporary directory", _os.open_dir, t.dir, name
                    )
                except FileNotFoundError:
                    continue  # swept before we could lock it
                try:
                    held = t.run(
                        "locking its temporary directory",
                        _holds,
                        t.dir,
                        name,
                        handle.fd,
                    )
                except BaseException:
                    _os.close_dir(handle)
                    t.remove_quietly(name, what="temporary directory")
                    raise
                if held:
                    break
                _os.close_dir(handle)
        except BaseException:
            t.close()
            raise
        self._name, self._handle = name, handle
        return Path(t.temp_path(name))

    def _discard(self, name: str, handle: Dir) -> None:
        # Removed while still locked, so that a sweep does not race us through the tree.
        try:
            self._target.remove_quietly(name, what="temporary directory")
        finally:
            _os.close_dir(handle)

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        name, handle, t = self._name, self._handle, self._target
        self._name = self._handle = None
        assert name is not None, "__exit__ without __enter__"
        assert handle is not None
        try:
            if exc_type is not None:
                self._discard(name, handle)
                return
            try:
                self.published = self._publish(name, handle)
            except BaseException:
                self._discard(name, handle)
                raise
            if not self.published:
                self._discard(name, handle)
            else:
                _os.close_dir(handle)
                t.sync_parent()
        finally:
            t.close()

    def _publish(self, name: str, handle: Dir) -> bool:
        t = self._target
        if t.durable:
            t.run("flushing its temporary directory to disk", _sync_tree, handle)
        for _ in range(_RACE_ATTEMPTS):
            if _place_dir(t, name):
                return True
            if t.keep:
                return False
            old = _swap_in(t, name)
            if old is not None:
                t.remove_quietly(old, what="old entry")
                return True
        raise OSError(
            errno.EAGAIN,
            f"other writers kept replacing it ({t.operation} was publishing)",
            t.display,
        )


def atomic_dir(
    path: PathArg,
    *,
    exist: Exist = "keep",
    durability: Durability = "full",
    retry: Optional[RetryPolicy] = None,
) -> AtomicDir:
    """Fill a temporary directory and publish it at ``path`` as one entry.

    Readers see no directory, the old one or the new one, never a partly filled
    one. Missing parent directories are created when the block is entered.

    With ``exist="replace"`` an existing target is swapped out atomically with
    ``renameat2(RENAME_EXCHANGE)`` on Linux and then removed; where that is
    missing (macOS, Windows, some file systems) the old entry is renamed away
    first and ours in next, and for that moment readers find no entry.

    Args:
        path: the directory to publish.
        exist: ``"keep"`` (default): an entry already there when the block ends
            stays, and ours is removed. ``"replace"``: ours wins.
        durability: ``"full"``: every file and directory in the tree, and the
            parent's entry, are flushed to disk. ``"none"``: no fsync at all.
        retry: how long to wait out a transient error on the publishing rename.

    Returns:
        An :class:`AtomicDir`; entering it gives the temporary directory's path,
        and its ``published`` attribute tells, after the block, whether ours
        was published.

    Raises:
        PlanError: a bad ``exist`` or ``durability`` value, at once.
    """
    return AtomicDir(path, exist=exist, durability=durability, retry=retry)


# --- sweeping --------------------------------------------------------------------


def _sweep_dir(
    d: Dir, where: str, cutoff: float, recursive: bool, removed: List[str]
) -> None:
    for name in sorted(_os.listdir(d)):
        try:
            st = _os.lstat(d, name)
        except FileNotFoundError:
            continue
        is_dir = impl.is_dir_stat(st)
        if not name.startswith(TEMP_PREFIX):
            if recursive and is_dir:
                try:
                    sub = _os.open_dir(d, name)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                try:
                    _sweep_dir(
                        sub, os.path.join(where, name), cutoff, recursive, removed
                    )
                finally:
                    _os.close_dir(sub)
            continue
        if st.st_mtime > cutoff or not (is_dir or stat.S_ISREG(st.st_mode)):
            continue  # too young to judge, or nothing a writer of ours makes
        free, fd = _claim(d, name, is_dir)
        if not free:
            continue
        try:
            _remove_entry(d, name)
        except OSError as exc:
            level = logging.DEBUG if is_transient(exc) else logging.WARNING
            _log.log(
                level, "sweep: could not remove %r (%s)", os.path.join(where, name), exc
            )
            continue
        finally:
            if fd is not None:
                _os.close(fd)
        removed.append(os.path.join(where, name))


def sweep(
    directory: PathArg, *, older_than: float = 3600.0, recursive: bool = False
) -> List[str]:
    """Remove the temporaries that killed cache writers left in ``directory``.

    Only entries named ``.fstx-tmp-*`` are considered, and only those that no
    live writer holds: each writer keeps an exclusive ``flock`` on its
    temporary, and a temporary whose lock can be taken has lost its writer.
    Safe to run at any time, from any number of processes, while writers work.

    Args:
        directory: the cache directory.
        older_than: leave temporaries modified less than this many seconds
            ago. Where locks cannot be tried (Windows; file systems without
            ``flock``) this age is the only guard, so keep it well above the
            time one write takes; elsewhere 0 (any age) is safe.
        recursive: also sweep every subdirectory (not following symlinks).

    Returns:
        The paths removed. Entries that could not be removed are logged on the
        ``fstx`` logger and left for the next sweep.

    Raises:
        PlanError: ``older_than`` is negative.
        OSError: ``directory`` cannot be opened or listed.
    """
    display = os.fsdecode(os.fspath(directory))
    if not older_than >= 0:
        raise PlanError(
            "sweep", display, f"older_than must be >= 0 s, not {older_than!r}"
        )
    try:
        root = _os.open_root(display)
    except OSError as exc:
        raise _failure(exc, "sweep", "opening the directory", display) from exc
    removed: List[str] = []
    try:
        # older_than=0: age does not matter (a file system's coarse timestamps may
        # even put a fresh entry a little in the future).
        cutoff = math.inf if older_than == 0 else time.time() - older_than
        _sweep_dir(root, display, cutoff, recursive, removed)
    except OSError as exc:
        raise _failure(exc, "sweep", "listing the directory", display) from exc
    finally:
        _os.close_dir(root)
    return removed
