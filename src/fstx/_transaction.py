"""Transactions: plan changes under a root, stage their content, commit or roll back.

Planning checks each call against the tree as planned so far and stages any
new content at once, in a staging area on the destination's device, so that
the commit is a short run of renames (see :mod:`fstx._commit`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import secrets
import stat
import sys
import time
from collections import deque
from types import TracebackType
from typing import (
    IO,
    Any,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Set,
    Tuple,
    Type,
    Union,
)

import attrs

from fstx import _commit, _journal, _os
from fstx._commit import STAGING, JournalFile
from fstx._errors import CommitError, PlanError, RollbackError
from fstx._journal import Area, Chmod, Header, Place, Remove, State, Step
from fstx._lock import RootLock
from fstx._model import PlannedTree
from fstx._platform import Dir, impl
from fstx._retry import Retrier, RetryPolicy
from fstx._tree import Rel, RootFS, join

__all__ = ["CommitReport", "Operation", "Transaction", "transaction"]

_log = logging.getLogger("fstx")

StrPath = Union[str, "os.PathLike[str]"]
DeviceKey = Tuple[int, int]
"""A mount: its device number and mount id (0 where the platform has none)."""
ProgressCallback = Callable[[int, int], None]

_MAX_SYMLINKS = 40
_NAME_MAX = 255
_READ = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_NOFOLLOW = _READ | getattr(os, "O_NOFOLLOW", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_NAMES_REMEMBERED = 1 << 16  # names known to fit NAME_MAX, kept for speed
_EUID: Optional[int] = os.geteuid() if hasattr(os, "geteuid") else None
_DURABILITY = ("full", "none")


@attrs.frozen
class CommitReport:
    """What a commit did.

    Attributes:
        operations: how many operations were committed.
        deferred: paths whose old files were in use and wait in the trash
            for the next :func:`fstx.recover`.
        retries: how many filesystem calls were retried after a transient error.
        elapsed: seconds the commit took.
    """

    operations: int
    deferred: Tuple[str, ...] = ()
    retries: int = 0
    elapsed: float = 0.0


@attrs.frozen
class Operation:
    """One planned operation, as the caller asked for it.

    Attributes:
        kind: ``copy``, ``rename``, ``delete``, ``write``, ``mkdir`` or ``chmod``.
        path: the path it changes, relative to the root.
        source: where ``copy`` and ``rename`` take from.
        mode: the mode bits of ``chmod``, ``mkdir`` or a write, if given.
    """

    kind: str
    path: str
    source: Optional[str] = None
    mode: Optional[int] = None

    def __str__(self) -> str:
        mode = "" if self.mode is None else f" (mode {self.mode:o})"
        if self.source is not None:
            return f"{self.kind} {self.source} -> {self.path}{mode}"
        return f"{self.kind} {self.path}{mode}"


def _fspath(value: object) -> str:
    if type(value) is str:  # the common case first: isinstance() on an ABC is slow
        return value
    try:
        path = os.fspath(value)  # type: ignore[call-overload]  # checked just below
    except TypeError:
        raise TypeError(
            f"expected a str or os.PathLike path, not {type(value).__name__}"
        ) from None
    return os.fsdecode(path) if isinstance(path, bytes) else path


def _writable(st: os.stat_result) -> bool:
    """Whether we may create entries in a directory we staged (its mode may deny it)."""
    if _EUID is None:  # Windows: only the read-only attribute, shown as mode bits
        return bool(st.st_mode & stat.S_IWRITE)
    return _EUID == 0 or (st.st_uid == _EUID and st.st_mode & 0o300 == 0o300)


def _split_parts(text: str) -> List[str]:
    if sys.platform == "win32":
        text = text.replace("\\", "/")
    return [p for p in text.split("/") if p not in ("", ".")]


class _Source:
    """A tree to copy from: outside the root (plain paths) or inside it (planned)."""

    def follow(self, key: Any) -> Any:
        """``key`` with its symlinks resolved (plain paths: the OS follows them)."""
        return key

    def lstat(self, key: Any) -> os.stat_result:
        raise NotImplementedError

    def stat(self, key: Any) -> os.stat_result:
        raise NotImplementedError

    def listdir(self, key: Any) -> List[str]:
        raise NotImplementedError

    def child(self, key: Any, name: str) -> Any:
        raise NotImplementedError

    def open(self, key: Any, follow: bool) -> int:
        raise NotImplementedError

    def readlink(self, key: Any) -> str:
        raise NotImplementedError


class _OutsideSource(_Source):
    def lstat(self, key: Any) -> os.stat_result:
        return os.lstat(key)

    def stat(self, key: Any) -> os.stat_result:
        return os.stat(key)

    def listdir(self, key: Any) -> List[str]:
        return sorted(os.listdir(key))

    def child(self, key: Any, name: str) -> Any:
        return os.path.join(key, name)

    def open(self, key: Any, follow: bool) -> int:
        return os.open(key, _READ if follow else _READ_NOFOLLOW)

    def readlink(self, key: Any) -> str:
        return os.readlink(str(key))


class _PlannedSource(_Source):
    def __init__(self, tx: Transaction) -> None:
        self.tx = tx

    def _loc(self, key: Rel) -> Rel:
        loc = self.tx._model.locate(key)
        if loc is None:
            raise FileNotFoundError(2, "planned absent", join(key))
        return loc

    def lstat(self, key: Any) -> os.stat_result:
        st = self.tx._fs.lstat(self._loc(key))
        if st is None:
            raise FileNotFoundError(2, "no such file", join(key))
        return st

    def stat(self, key: Any) -> os.stat_result:
        return self.lstat(key)

    def listdir(self, key: Any) -> List[str]:
        return self.tx._model.listdir(key)

    def child(self, key: Any, name: str) -> Any:
        return (*key, name)

    def open(self, key: Any, follow: bool) -> int:
        del follow
        return self.tx._fs.open(
            self._loc(key), os.O_RDONLY | getattr(os, "O_BINARY", 0)
        )

    def readlink(self, key: Any) -> str:
        return self.tx._fs.readlink(self._loc(key))

    def follow(self, key: Any) -> Any:
        return self.tx._resolve(join(key), "copy", follow_last=True)


_CLONE_FILES: bool = impl.CLONE_FILES  # a switch for tests, too
_PARALLEL_COPIES = os.name == "posix"  # directory descriptors to hand to threads
_POOL_THREADS = min(4, os.cpu_count() or 1)
"""Threads that copy the files of one tree at a time (file I/O releases the GIL)."""
# Files smaller than this are copied by the walk itself: for them a thread
# costs more than it saves (the GIL changes hands at every one). Measured on
# tmpfs, 2 cores: 2,000 small files took 73 ms in one thread and 142 ms in
# two; 24 files of 4 MiB took 85 ms in one thread and 34 ms in two.
_POOL_MIN_SIZE = 256 * 1024
_POOL_MIN_FILES = 2  # fewer big files are copied in the calling thread
_BATCH_DIRS = 32  # directory handles a batch holds at most (descriptors are finite)


class _CopyJob(NamedTuple):
    """One regular file of a tree copied from outside the root."""

    src: str
    parent: Dir  # the staged directory, a handle of the batch's own
    name: str
    st: os.stat_result
    follow: bool
    link: bool


# What link() says where a hard link cannot be had: another device, a file
# system without them, too many links, not allowed (protected_hardlinks).
_NO_LINK = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
)


def _linked(
    src: str,
    parent: Dir,
    name: str,
    st: os.stat_result,
    follow: bool,
    no_link: Set[int],
) -> bool:
    """Hard-link the file at ``src`` into staging; False: copy it instead.

    The link must be the very file that was looked at (``st``): one swapped
    in since (another file, a symlink) is unlinked again and copied.
    """
    if st.st_dev in no_link:
        return False
    try:
        _os.link_in(src, parent, name, follow)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        if exc.errno == errno.EXDEV:
            no_link.add(st.st_dev)  # the cache is on another file system
        return False
    got = _os.lstat(parent, name)
    if stat.S_ISREG(got.st_mode) and got.st_ino == st.st_ino:
        return True
    _os.unlink(parent, name)
    return False


def _copy_data(
    src_fd: int, parent: Dir, name: str, st: os.stat_result, no_clone: Set[int]
) -> None:
    """Make ``name`` in ``parent`` with the data of ``src_fd``, cloned if possible.

    A clone is tried once per source device: where it fails (another file
    system, one without clones) the next files are copied at once.
    """
    clone = st.st_dev not in no_clone
    if _CLONE_FILES and clone:
        if _os.clone_into(src_fd, parent, name):  # macOS: the file made by a clone
            return
        no_clone.add(st.st_dev)
        clone = False
    dst_fd = _os.open_file(parent, name, _CREATE, 0o600)
    try:
        if not _os.copy_fd(src_fd, dst_fd, clone) and clone:
            no_clone.add(st.st_dev)  # Linux: FICLONE refused, copy_file_range used
    finally:
        _os.close(dst_fd)


def _copy_file(job: _CopyJob, no_clone: Set[int], no_link: Set[int]) -> None:
    """Copy (or link) one file into staging, with its mode and times (any thread)."""
    if job.link and _linked(job.src, job.parent, job.name, job.st, job.follow, no_link):
        return  # the very file: its mode and times are the source's
    src_fd = os.open(job.src, _READ if job.follow else _READ_NOFOLLOW)
    try:
        _copy_data(src_fd, job.parent, job.name, job.st, no_clone)
    finally:
        os.close(src_fd)
    _os.chmod(job.parent, job.name, stat.S_IMODE(job.st.st_mode))
    _os.utime(job.parent, job.name, (job.st.st_atime_ns, job.st.st_mtime_ns))


class _TreeCopy:
    """The big files of a tree copy, copied by a few threads while the walk goes on.

    The walk (the calling thread) makes the directories, symlinks and small
    files, and queues every file of ``_POOL_MIN_SIZE`` or more with a handle
    on its staged directory of the batch's own (a duplicate, so the root's
    handle cache stays with one thread). Directory modes and times are set
    last, once every file below is in. While an OS-layer hook is installed
    (tests that fail or crash at call k), every file is copied in the
    calling thread, in walk order.
    """

    def __init__(self, no_clone: Set[int], no_link: Set[int]) -> None:
        self.no_clone = no_clone
        self.no_link = no_link
        self.jobs: List[_CopyJob] = []
        self.handles: Dict[Rel, Dir] = {}
        self.finish: List[Tuple[Rel, int, Tuple[int, int]]] = []
        self._pool: Optional[Any] = None

    def handle(self, fs: RootFS, staged: Rel) -> Dir:
        d = self.handles.get(staged)
        if d is None:
            if len(self.handles) >= _BATCH_DIRS:
                self.drain()
            found = fs.dir(staged)
            d = self.handles[staged] = Dir(os.dup(found.fd), found.path)
        return d

    def add(self, job: _CopyJob) -> None:
        self.jobs.append(job)

    def drain(self) -> None:
        """Copy every queued file; raise the first error once all have stopped."""
        jobs, self.jobs = self.jobs, []
        try:
            threaded = (
                _POOL_THREADS > 1
                and _os.get_hook() is None
                and (self._pool is not None or len(jobs) >= _POOL_MIN_FILES)
            )
            if not threaded:
                for job in jobs:
                    _copy_file(job, self.no_clone, self.no_link)
                return
            # Imported when a tree is big enough to want it.
            from concurrent.futures import (  # noqa: PLC0415
                FIRST_EXCEPTION,
                ThreadPoolExecutor,
                wait,
            )

            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    _POOL_THREADS, thread_name_prefix="fstx-copy"
                )
            futures = [
                self._pool.submit(_copy_file, j, self.no_clone, self.no_link)
                for j in jobs
            ]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                # After an error (or an interrupt) the queued copies are
                # dropped; the running ones finish: they use the handles.
                for future in futures:
                    future.cancel()
                wait(futures)
            for future in futures:
                error = None if future.cancelled() else future.exception()
                if error is not None:
                    raise error
        finally:
            self._release()

    def _release(self) -> None:
        for d in self.handles.values():
            os.close(d.fd)
        self.handles.clear()

    def close(self) -> None:
        """Stop the threads and let go of the handles."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._release()


class _StagedFile(io.RawIOBase):
    """A staged file's descriptor, written through the OS seam like every write."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        _os.write(self._fd, view.tobytes())
        return len(view)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            try:
                _os.close(self._fd)
            finally:
                super().close()


class Transaction:
    """A batch of filesystem changes under ``root`` that commits all or nothing.

    Use :func:`transaction` to open one. Each planning method checks its
    arguments against the tree as planned so far and raises
    :class:`~fstx.PlanError` at once when it cannot be done; new content is
    staged when the method is called. :meth:`commit` applies everything;
    :meth:`rollback` discards the plan.
    """

    def __init__(
        self,
        root: StrPath,
        *,
        durability: str = "full",
        retry: Optional[RetryPolicy] = None,
        lock_timeout: Optional[float] = None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> None:
        root_text = _fspath(root)
        if durability not in _DURABILITY:
            raise PlanError(
                "open a transaction on",
                root_text,
                f"durability must be 'full' or 'none', not {durability!r}",
            )
        self.root = os.path.abspath(root_text)
        self.durability = durability
        self.on_progress = on_progress
        self._retrier = Retrier(retry if retry is not None else RetryPolicy())
        self._operations: List[Operation] = []
        self._steps: List[Step] = []
        self._step_ops: List[int] = []
        self._spent = False
        self._modes: Dict[Rel, int] = {}
        self._areas: Dict[DeviceKey, Rel] = {}
        self._keys: Dict[Rel, DeviceKey] = {}
        # Devices whose files could not be cloned into staging (ext4, tmpfs,
        # another file system): their copies go straight to copy_file_range.
        self._no_clone: Set[int] = set()
        self._no_link: Set[int] = set()  # devices a link from failed (EXDEV)
        self._area_tops: List[Rel] = []
        self._nested_tops: List[Rel] = []  # those below the root's own
        self._counter = 0
        self._txid = secrets.token_hex(8)
        if not os.path.isdir(self.root):
            raise PlanError("open a transaction on", self.root, "it is not a directory")
        self._root_real = os.path.realpath(self.root)
        # The root as callers may spell it (as given, and with its symlinks
        # resolved), normalized once: (whole path, prefix of what is inside).
        self._bases: List[Tuple[str, str]] = []
        for base in (self.root, self._root_real):
            b = os.path.normcase(base.rstrip(os.sep) or os.sep)
            self._bases.append((b, b if b.endswith(os.sep) else b + os.sep))
        self._names_ok: Set[str] = set()  # names already checked by _checked
        # What exists() last found absent (the path as given, resolved, and
        # its count of planned directories), until the next operation is planned.
        self._absent: Optional[Tuple[str, Rel, int]] = None
        staging = os.path.join(self.root, STAGING)
        self._new_staging = False
        try:
            os.mkdir(staging)
            self._new_staging = True
        except FileExistsError:
            if os.path.islink(staging) or not os.path.isdir(staging):
                raise PlanError(
                    "open a transaction on",
                    self.root,
                    f"{staging!r} exists and is not fstx's staging directory",
                ) from None
        self._lock = RootLock(self.root, staging, lock_timeout)
        self._lock.acquire()
        try:
            self._fs = RootFS(self.root)
            try:
                self._open()
            except BaseException:
                self._fs.close()
                raise
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
        from fstx._recovery import recover_locked  # noqa: PLC0415 - import cycle

        recover_locked(self._fs, self._retrier)
        self._model = PlannedTree(self._fs)
        if self._new_staging and self.durability == "full":
            # The root's first transaction: the staging directory's name must
            # be durable before anything in it is (the journal, the areas).
            self._fs.fsync_dir(())
        self._root_dev = self._device_key(())
        area = (STAGING, f"tx-{self._txid}")
        # The journal exists from the start (not yet durable: nothing under the
        # root changes before commit), so a crash while planning leaves a
        # record of which staging areas to sweep.
        self._journal = JournalFile(
            self._fs, (STAGING, f"{self._txid}.journal"), durable=False
        )
        try:
            header = Header(self._txid, self.root, durable=self.durability == "full")
            self._journal.append([header, Area(area)])
            self._fs.mkdir(area, 0o700)
        except BaseException:
            self._journal.remove()
            raise
        self._journal.durable = self.durability == "full"
        self._areas[self._root_dev] = area

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._spent:
            return
        if exc is None:
            self.commit()
        else:
            self.rollback()

    # -- read-only views -----------------------------------------------------

    @property
    def operations(self) -> Tuple[Operation, ...]:
        """The planned operations, in the order they will apply."""
        return tuple(self._operations)

    @property
    def spent(self) -> bool:
        """Whether the transaction was committed or rolled back."""
        return self._spent

    def exists(self, path: StrPath) -> bool:
        """Whether something is at ``path`` once the planned operations apply.

        The planned state, as every operation sees it: a file written,
        copied or renamed there exists, one deleted does not, and an
        untouched path is looked up on disk. Like :func:`os.path.lexists`, a
        symlink is itself (a dangling one exists); symlinks in the parents are
        resolved as operations resolve them.

        Raises:
            PlanError: ``path`` is outside the root or inside the staging
                directory, or the transaction is spent.
        """
        self._check_open("look up", path)
        rel, known = self._walk(path, "look up", follow_last=False, check=False)
        if not rel:
            return True  # the root itself
        self._checked(rel, path, "look up")
        if known == len(rel) - 1 and self._model.lstat(rel) is not None:
            return True
        # Asked before writing, as installers do: the write that follows
        # need not walk and look again (see _target).
        self._absent = (_fspath(path), rel, known)
        return False

    # -- paths -----------------------------------------------------------------

    def _inside(self, text: str) -> Optional[str]:
        """``text`` (absolute) relative to the root, or None when outside it."""
        t = os.path.normcase(text)
        for b, prefix in self._bases:
            if t == b:
                return ""
            if t.startswith(prefix):
                return text[len(prefix) :]
        return None

    def _resolve(self, path: object, op: str, *, follow_last: bool = False) -> Rel:
        """The planned location of a caller's path (symlinks in parents resolved)."""
        return self._walk(path, op, follow_last=follow_last)[0]

    def _walk(
        self, path: object, op: str, *, follow_last: bool, check: bool = True
    ) -> Tuple[Rel, int]:
        """:meth:`_resolve`, and how many leading names are planned directories.

        When that count is short of the parent, the next name is planned
        absent (so is everything below it): the caller need not look again.
        """
        text = _fspath(path)
        if not text:
            raise PlanError(op, text, "the path is empty")
        if os.path.isabs(text):
            inner = self._inside(text)
            if inner is None:
                raise PlanError(op, text, f"it is outside the root {self.root!r}")
            text = inner
        parts = _split_parts(text)
        missing: Optional[Rel] = None  # a parent the quick look found absent
        if not follow_last and len(parts) > 1 and ".." not in parts:
            # The parent as planned is a directory reached without a symlink
            # (the planned tree never resolves through one): the walk below
            # would find the same path, one lookup per component.
            parent = tuple(parts[:-1])
            try:
                st = self._model.lstat(parent)
            except OSError:  # a symlink on the way (ELOOP): the walk resolves it
                st = None
            else:
                missing = parent if st is None else None
            if st is not None and stat.S_ISDIR(st.st_mode):
                rel = tuple(parts)
                return self._checked(rel, path, op) if check else rel, len(rel) - 1
        out: List[str] = []
        known = 0  # leading names of ``out`` seen to be planned directories
        if missing is not None:
            # A new directory: its nearest ancestor that is a known planned
            # directory (so none above it is a symlink) is where to start.
            top = len(parts) - 2
            while top > 0 and not self._model.known_dir(tuple(parts[:top])):
                top -= 1
            out, known = parts[:top], top
        todo: Deque[str] = deque(parts[len(out) :])
        links = 0
        absent = -1  # where in ``out`` the first name planned absent is
        while todo:
            name = todo.popleft()
            if name == "..":
                if not out:
                    raise PlanError(
                        op, path, f"'..' leads outside the root {self.root!r}"
                    )
                out.pop()
                known = min(known, len(out))
                if absent >= len(out):
                    absent = -1
                continue
            cand = (*out, name)
            if not todo and not follow_last:
                out.append(name)
                break
            if absent >= 0:
                out.append(name)  # below a name planned absent: absent too
                continue
            st = None if cand == missing else self._model.lstat(cand)
            if st is None:
                absent = len(out)
                out.append(name)
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_SYMLINKS:
                    raise PlanError(op, path, "too many levels of symbolic links")
                loc = self._model.locate(cand)
                assert loc is not None
                target = self._fs.readlink(loc)
                if os.path.isabs(target):
                    inner = self._inside(target)
                    if inner is None:
                        raise PlanError(
                            op,
                            path,
                            f"{join(cand)!r} is a symlink to {target!r}, "
                            "outside the root",
                        )
                    out = []
                    known = 0
                    target = inner
                todo.extendleft(reversed(_split_parts(target)))
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                raise PlanError(op, path, f"{join(cand)!r} is not a directory")
            out.append(name)
            if known == len(out) - 1 and stat.S_ISDIR(st.st_mode):
                known = len(out)
        rel = tuple(out)
        known = min(known, len(rel) - 1)
        return self._checked(rel, path, op) if check else rel, known

    def _checked(self, rel: Rel, path: object, op: str) -> Rel:
        if not rel:
            raise PlanError(op, path, "that is the root itself")
        if (
            rel[0] == STAGING
            or (
                self._nested_tops  # staging on a mount inside the root
                and any(rel[: len(t)] == t for t in self._nested_tops)
            )
        ):
            raise PlanError(op, path, "it is inside fstx's staging directory")
        for name in rel:
            if name in self._names_ok:
                continue
            # NAME_MAX: 255 bytes on ext4, xfs, btrfs, tmpfs, APFS; 255 UTF-16
            # units on NTFS. Refused now rather than as ENAMETOOLONG mid-commit.
            size = len(name) if sys.platform == "win32" else len(os.fsencode(name))
            if size <= _NAME_MAX:
                if len(self._names_ok) < _NAMES_REMEMBERED:
                    self._names_ok.add(name)
            else:
                # What the OS would say at commit, said now (nothing changed yet).
                raise OSError(
                    errno.ENAMETOOLONG,
                    f"cannot {op}: a name in it is longer than {_NAME_MAX} bytes",
                    _fspath(path),
                )
        return rel

    def _relative_source(self, path: object) -> Optional[str]:
        text = _fspath(path)
        if not os.path.isabs(text):
            return text
        return self._inside(text)

    # -- staging ---------------------------------------------------------------

    def _check_open(self, op: str, path: object) -> None:
        if self._spent:
            raise PlanError(
                op, path, "the transaction is already committed or rolled back"
            )

    def _dev_of_dir(self, rel: Rel, loc: Optional[Rel] = None) -> DeviceKey:
        """The mount of planned directory ``rel`` (at ``loc`` on disk, if known)."""
        if loc is None:
            loc = self._model.locate(rel)
        if loc is None or not self._model.is_dir(rel):
            raise PlanError(
                "stage", join(rel), "its directory disappeared while planning"
            )
        return self._device_key(loc)

    def _device_key(self, loc: Rel) -> DeviceKey:
        """The mount holding directory ``loc``: its device and mount id.

        A bind mount shares its device number with the file system it shows,
        yet a rename across it fails (EXDEV): staging is chosen per mount.
        """
        key = self._keys.get(loc)
        if key is None:
            for dev, area in self._areas.items():
                if loc[: len(area)] == area:
                    key = dev  # made by us in that area: on its mount
                    break
            else:
                d = self._fs.dir(loc)
                key = (impl.stat_dir(d).st_dev, impl.mount_id(d))
            self._keys[loc] = key
        return key

    def _area(self, dev: DeviceKey, near: Rel) -> Rel:
        area = self._areas.get(dev)
        if area is not None:
            return area
        # A mount inside the root: staging must sit on that device, so that
        # the commit is still made of renames. Its top is where the device starts.
        loc = self._model.locate(near)
        assert loc is not None
        top = loc
        while top:
            if self._device_key(top[:-1]) != dev:
                break
            top = top[:-1]
        staging = (*top, STAGING)
        area = (*staging, f"tx-{self._txid}")
        # Journaled before anything is made: a crash from here on lets
        # recovery find the area, and the mount's staging directory, to sweep.
        self._journal.append([Area(area)])
        self._areas[dev] = area
        self._area_tops.append(staging)
        if len(staging) > 1:
            self._nested_tops.append(staging)
        if not self._fs.exists(staging):
            self._fs.mkdir(staging, 0o755)
        self._fs.mkdir(area, 0o700)
        return area

    def _new_name(self, area: Rel, kind: str) -> Rel:
        self._counter += 1
        return (*area, f"{kind}{self._counter}")

    def _area_of(self, loc: Rel) -> bool:
        return any(loc[: len(area)] == area for area in self._areas.values())

    def _ensure_parents(self, rel: Rel) -> None:
        # From the parent up to the nearest one that exists (usually the
        # parent itself), then the missing ones downwards, all on its device.
        # Every one is staged before any is planned: a failure leaves the plan
        # as it was (what was staged is swept with the staging area).
        top = len(rel) - 1
        while top > 0 and self._model.lstat(rel[:top]) is None:
            top -= 1
        if top + 1 >= len(rel):
            return
        dev = self._dev_of_dir(rel[:top])
        area = self._area(dev, rel[:top])
        made: List[Rel] = []
        for _ in range(top + 1, len(rel)):
            made.append(self._new_name(area, "d"))
            self._fs.mkdir(made[-1], 0o777)
        for i, staged in enumerate(made, start=top + 1):
            self._add_place(staged, rel[:i], dev, backup=False)

    def _nearest_dir(self, rel: Rel) -> Rel:
        """The nearest planned ancestor of ``rel`` that exists.

        Missing parents would be staged on its device, so new content for
        ``rel`` can be staged there before the parents are planned: a call
        that fails while staging then leaves the plan as it was.
        """
        top = rel[:-1]
        while top and self._model.lstat(top) is None:
            top = top[:-1]
        return top

    def _inline(self, rel: Rel, top: Rel, loc: Optional[Rel] = None) -> Optional[Rel]:
        """Where new content for ``rel`` can be made at its final place in staging.

        When the nearest existing ancestor ``top`` is a directory that this
        transaction stages (a new directory, or a copied tree), and nothing
        was planned yet at ``rel`` or its missing parents, the new item can
        be made inside that staged directory: it moves into place with the
        directory's own step, so it needs no step, journal record or rename
        of its own. Returns the staged directory for ``top``, or None.

        ``rel`` is planned absent: the caller's planned ``lstat`` of it
        found nothing.
        """
        if loc is None:
            loc = self._model.locate(top)
        if loc is None or not loc or not self._area_of(loc):
            return None  # a real directory: its new entries come by steps
        first = rel[: len(top) + 1]
        if self._model.planned(first):
            return None  # an earlier step acts on this path: keep the order
        st = self._model.lstat(top)
        if st is None or not stat.S_ISDIR(st.st_mode) or not _writable(st):
            return None
        if first != rel and self._fs.lstat((*loc, first[-1])) is not None:
            # An item planned away from here is still there until commit
            # (for ``rel`` itself, the caller's lookup looked at that place).
            return None
        return loc

    def _make_inline(self, rel: Rel, top: Rel, loc: Rel) -> List[Rel]:
        """Make the missing parents of ``rel`` inside ``loc``, top down."""
        made: List[Rel] = []
        at = loc
        try:
            for name in rel[len(top) : -1]:
                at = (*at, name)
                self._fs.mkdir(at, 0o777)
                made.append(at)
        except BaseException:
            self._unmake(made)
            raise
        return made

    def _where_to_stage(
        self, rel: Rel, existing: Optional[os.stat_result], top: Rel
    ) -> Tuple[DeviceKey, Optional[Rel], List[Rel], Rel]:
        """Where new content for ``rel`` is made: ``(device, inline, made, staged)``.

        ``top`` is the nearest planned directory of ``rel`` (see :meth:`_target`).

        Inside a directory this transaction creates, new content is made in
        place in that directory's staged copy (``inline``), after the staged
        parents it needs (``made``, for :meth:`_unmake` on failure); anywhere
        else it goes into the device's staging area.
        """
        loc = self._model.locate(top)
        dev = self._dev_of_dir(top, loc)
        inline = None if existing is not None else self._inline(rel, top, loc)
        if inline is None:
            return dev, None, [], self._new_name(self._area(dev, top), "s")
        made = self._make_inline(rel, top, inline)
        return dev, inline, made, (*inline, *rel[len(top) :])

    def _unmake(self, made: List[Rel]) -> None:
        for d in reversed(made):
            self._fs.rmdir(d)

    def _add_place(
        self, staged: Rel, dst: Rel, dev: DeviceKey, *, backup: bool
    ) -> None:
        st = self._fs.lstat(staged)
        assert st is not None
        backup_rel = self._new_name(self._area(dev, dst[:-1]), "b") if backup else None
        self._steps.append(Place(staged, dst, st.st_ino, backup_rel, staged=True))
        self._step_ops.append(len(self._operations))
        self._model.set(dst, staged)

    def _stage_bytes(self, staged: Rel, chunks: Any, mode: Optional[int]) -> Rel:
        fd = self._fs.open(staged, _CREATE, 0o666)
        try:
            try:
                for chunk in chunks:
                    _os.write(fd, chunk)
            finally:
                _os.close(fd)
            if mode is not None:
                self._fs.chmod(staged, mode)
        except BaseException:
            self._fs.unlink(staged)
            raise
        return staged

    def _copy_tree(
        self,
        source: _Source,
        key: Any,
        staged: Rel,
        follow: bool,
        st: os.stat_result,
        *,
        link: bool,
    ) -> None:
        """Copy what ``key`` is; a tree from outside with its files in parallel."""
        if not (
            isinstance(source, _OutsideSource)
            and stat.S_ISDIR(st.st_mode)
            and _PARALLEL_COPIES
        ):
            self._copy_into(source, key, staged, follow, st, link=link)
            return
        batch = _TreeCopy(self._no_clone, self._no_link)
        try:
            self._copy_into(source, key, staged, follow, st, batch, link=link)
            batch.drain()
        finally:
            batch.close()
        for where, mode, ns in batch.finish:  # children before their parents
            self._fs.chmod(where, mode)
            self._fs.utime(where, ns)

    def _copy_into(
        self,
        source: _Source,
        key: Any,
        staged: Rel,
        follow: bool,
        st: Optional[os.stat_result] = None,
        batch: Optional[_TreeCopy] = None,
        *,
        link: bool = False,
    ) -> None:
        """Copy ``key`` of ``source`` to ``staged`` (``st``: its stat, if known).

        With ``batch``, regular files are queued on it, and directories get
        their mode and times from it once every file is in. With ``link``,
        regular files from outside the root are hard-linked where they can be.
        """
        if st is None:
            if follow:
                key = source.follow(key)  # a link in the tree: copy what it points at
            st = source.stat(key) if follow else source.lstat(key)
        if stat.S_ISLNK(st.st_mode):
            self._fs.symlink(source.readlink(key), staged)
            with contextlib.suppress(NotImplementedError, OSError):
                # Some platforms cannot set a symlink's own times (no lutimes).
                self._fs.utime(staged, (st.st_atime_ns, st.st_mtime_ns))
            return
        if stat.S_ISDIR(st.st_mode):
            self._fs.mkdir(staged, 0o700)
            for name in source.listdir(key):
                self._copy_into(
                    source, source.child(key, name), (*staged, name), follow,
                    batch=batch, link=link,
                )  # fmt: skip
            if batch is not None:
                ns = (st.st_atime_ns, st.st_mtime_ns)
                batch.finish.append((staged, stat.S_IMODE(st.st_mode), ns))
                return
        elif (
            stat.S_ISREG(st.st_mode)
            and batch is not None
            and st.st_size >= _POOL_MIN_SIZE
        ):
            parent = batch.handle(self._fs, staged[:-1])
            batch.add(_CopyJob(key, parent, staged[-1], st, follow, link))
            return
        elif stat.S_ISREG(st.st_mode) and isinstance(source, _OutsideSource):
            parent = self._fs.dir(staged[:-1])
            job = _CopyJob(key, parent, staged[-1], st, follow, link)
            _copy_file(job, self._no_clone, self._no_link)  # mode and times too
            return
        elif stat.S_ISREG(st.st_mode):
            src_fd = source.open(key, follow)
            try:
                parent = self._fs.dir(staged[:-1])
                _copy_data(src_fd, parent, staged[-1], st, self._no_clone)
            finally:
                os.close(src_fd)
        else:
            raise PlanError("copy", str(key), "it is not a file, directory or symlink")
        mode = stat.S_IMODE(st.st_mode)
        if isinstance(source, _PlannedSource):
            loc = self._model.locate(key)
            mode = self._modes.get(loc, mode) if loc is not None else mode
        self._fs.chmod(staged, mode)
        self._fs.utime(staged, (st.st_atime_ns, st.st_mtime_ns))

    def _target(
        self, dst: object, op: str, *, is_dir: bool
    ) -> Tuple[Rel, Optional[os.stat_result], Rel]:
        """``dst`` resolved, what is planned there, and its nearest planned directory.

        The last is the parent when that is planned, else the nearest
        planned ancestor (where missing parents would be made).
        """
        absent, self._absent = self._absent, None
        if absent is not None and absent[0] == _fspath(dst):
            _, rel, known = absent  # exists() just found it absent
            return rel, None, rel[:known]
        rel, known = self._walk(dst, op, follow_last=False)
        if known < len(rel) - 1:
            return rel, None, rel[:known]  # a parent is planned absent: so is dst
        st = self._model.lstat(rel)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise PlanError(
                    op, dst, "a directory is in the way; delete it first to replace it"
                )
            if is_dir:
                raise PlanError(
                    op, dst, "a file is in the way of a directory; delete it first"
                )
        return rel, st, rel[:-1]

    def _kept_mode(self, rel: Rel, st: Optional[os.stat_result]) -> Optional[int]:
        """The mode bits a replaced file keeps (None: the default for a new file)."""
        if st is None or stat.S_ISLNK(st.st_mode):
            return None
        loc = self._model.locate(rel)
        mode = stat.S_IMODE(st.st_mode)
        return self._modes.get(loc, mode) if loc is not None else mode

    def _record(self, op: Operation) -> None:
        self._operations.append(op)
        self._absent = None

    # -- operations ------------------------------------------------------------

    def copy(
        self,
        src: StrPath,
        dst: StrPath,
        *,
        follow_symlinks: bool = False,
        link: bool = False,
    ) -> None:
        """Copy a file, symlink or tree to ``dst``, keeping mode bits and times.

        ``src`` may be anywhere; it is read now, so later changes to it do not
        matter. A relative ``src`` is relative to the root and seen as planned.

        ``link=True`` (opt-in) hard-links the regular files of a ``src``
        outside the root instead of copying them, where the file system
        allows (the same one as the root, hard links supported): an install
        from a cache of unpacked packages costs a link per file. Such a file
        *is* the cache's file: same mode bits and times, and a later change to
        one shows in the other. Where a link cannot be had (another file
        system, too many links), the file is copied.

        Raises:
            PlanError: ``src`` is missing, ``dst`` is outside the root, or a
                directory and a file would replace each other.
            OSError: reading ``src`` or writing the staged copy failed.
        """
        self._check_open("copy", dst)
        src_text = _fspath(src)
        inner = self._relative_source(src_text)
        source: _Source
        key: Any
        if inner is None:
            source, key = _OutsideSource(), src_text
            try:
                st = os.stat(key) if follow_symlinks else os.lstat(key)
            except FileNotFoundError:
                raise PlanError("copy", src, "the source does not exist") from None
        else:
            source = _PlannedSource(self)
            key = self._resolve(src, "copy", follow_last=follow_symlinks)
            found = self._model.lstat(key)
            if found is None:
                raise PlanError("copy", src, "the source does not exist") from None
            st = found
        rel, existing, top = self._target(dst, "copy", is_dir=stat.S_ISDIR(st.st_mode))
        if (
            isinstance(key, tuple)
            and rel[: len(key)] == key
            and stat.S_ISDIR(st.st_mode)
        ):
            raise PlanError("copy", dst, "cannot copy a directory into itself")
        # Parents are planned only once the copy is staged.
        dev, inline, made, staged = self._where_to_stage(rel, existing, top)
        try:
            if inner is None:  # outside the root: looked at just now
                self._copy_tree(source, key, staged, follow_symlinks, st, link=link)
            else:
                self._copy_into(source, key, staged, follow_symlinks)
        except BaseException:
            self._fs.remove_tree(staged)
            self._unmake(made)
            raise
        if inline is None:
            self._ensure_parents(rel)
            self._add_place(staged, rel, dev, backup=existing is not None)
        self._record(Operation("copy", join(rel), source=src_text))

    def write_bytes(
        self, dst: StrPath, data: bytes, *, mode: Optional[int] = None
    ) -> None:
        """Create or replace file ``dst`` with ``data``.

        ``mode=None`` gives a new file the default mode (0o666 less the umask)
        and lets a replaced file keep its mode bits.
        """
        self._check_open("write", dst)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PlanError(
                "write", dst, f"data must be bytes, not {type(data).__name__}"
            )
        self._write_chunks(dst, [bytes(data)], mode)

    def write_text(
        self,
        dst: StrPath,
        text: str,
        *,
        encoding: str = "utf-8",
        mode: Optional[int] = None,
    ) -> None:
        """Create or replace file ``dst`` with ``text``, encoded."""
        self._check_open("write", dst)
        if not isinstance(text, str):
            raise PlanError(
                "write", dst, f"text must be str, not {type(text).__name__}"
            )
        self._write_chunks(dst, [text.encode(encoding)], mode)

    def _write_chunks(self, dst: StrPath, chunks: Any, mode: Optional[int]) -> None:
        rel, existing, top = self._target(dst, "write", is_dir=False)
        # Parents are planned only once the content is staged.
        dev, inline, made, staged = self._where_to_stage(rel, existing, top)
        try:
            self._stage_bytes(staged, chunks, self._mode_for(rel, existing, mode))
        except BaseException:
            self._unmake(made)
            raise
        if inline is None:
            self._ensure_parents(rel)
            self._add_place(staged, rel, dev, backup=existing is not None)
        self._record(Operation("write", join(rel), mode=mode))

    def _mode_for(
        self, rel: Rel, existing: Optional[os.stat_result], mode: Optional[int]
    ) -> Optional[int]:
        return mode if mode is not None else self._kept_mode(rel, existing)

    @contextlib.contextmanager
    def open(
        self,
        dst: StrPath,
        mode: str = "wb",
        *,
        file_mode: Optional[int] = None,
        encoding: Optional[str] = None,
    ) -> Iterator[IO[Any]]:
        """A writable file whose content replaces ``dst`` when the block ends cleanly.

        Args:
            dst: the file to create or replace.
            mode: ``"wb"`` (binary) or ``"w"``/``"wt"`` (text).
            file_mode: mode bits, as ``mode`` of :meth:`write_bytes`.
            encoding: for text mode (UTF-8 by default).
        """
        self._check_open("open", dst)
        if mode not in ("wb", "w", "wt"):
            raise PlanError(
                "open", dst, f"mode must be 'wb', 'w' or 'wt', not {mode!r}"
            )
        rel, existing, top = self._target(dst, "write", is_dir=False)
        # Parents are planned only once the block succeeds.
        dev, inline, made, staged = self._where_to_stage(rel, existing, top)
        try:
            fd = self._fs.open(staged, _CREATE, 0o666)
        except BaseException:
            self._unmake(made)
            raise
        raw = io.BufferedWriter(_StagedFile(fd))
        handle: IO[Any] = raw
        if mode != "wb":
            handle = io.TextIOWrapper(raw, encoding=encoding or "utf-8")
        try:
            yield handle
        except BaseException:
            handle.close()
            self._fs.unlink(staged)
            self._unmake(made)
            raise
        handle.close()
        if inline is None:
            self._ensure_parents(rel)
        chosen = self._mode_for(rel, existing, file_mode)
        if chosen is not None:
            self._fs.chmod(staged, chosen)
        if inline is None:
            self._add_place(staged, rel, dev, backup=existing is not None)
        self._record(Operation("write", join(rel), mode=file_mode))

    def mkdir(self, path: StrPath, *, mode: int = 0o777) -> None:
        """Create directory ``path`` and its parents; an existing directory is fine."""
        self._check_open("mkdir", path)
        rel = self._resolve(path, "mkdir")
        st = self._model.lstat(rel)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise PlanError("mkdir", path, "a file is in the way; delete it first")
        top = self._nearest_dir(rel) if st is None else rel
        inline = self._inline(rel, top) if st is None else None
        if inline is not None:
            made = self._make_inline(rel, top, inline)
            try:
                self._fs.mkdir((*inline, *rel[len(top) :]), mode)
            except BaseException:
                self._unmake(made)
                raise
        elif st is None:
            dev = self._dev_of_dir(top)  # parents are planned once it is staged
            staged = self._new_name(self._area(dev, top), "d")
            self._fs.mkdir(staged, mode)
            self._ensure_parents(rel)
            self._add_place(staged, rel, dev, backup=False)
        self._record(Operation("mkdir", join(rel), mode=mode))

    def chmod(self, path: StrPath, mode: int) -> None:
        """Change the mode bits of a file or directory (not a symlink)."""
        self._check_open("chmod", path)
        rel = self._resolve(path, "chmod")
        loc = self._model.locate(rel)
        st = self._fs.lstat(loc) if loc is not None else None
        if st is None or loc is None:
            raise PlanError("chmod", path, "it does not exist")
        if stat.S_ISLNK(st.st_mode):
            raise PlanError(
                "chmod", path, "it is a symlink, which has no mode of its own"
            )
        if self._area_of(loc):
            self._fs.chmod(loc, mode)  # new content: set it on the staged item now
            self._model.changed(rel)
        else:
            old = self._modes.get(loc, stat.S_IMODE(st.st_mode))
            self._steps.append(Chmod(rel, mode, old, st.st_ino))
            self._step_ops.append(len(self._operations))
            self._modes[loc] = mode
        self._record(Operation("chmod", join(rel), mode=mode))

    def rename(self, src: StrPath, dst: StrPath) -> None:
        """Move a file, symlink or tree inside the root (across devices too)."""
        self._check_open("rename", src)
        src_rel = self._resolve(src, "rename")
        st = self._model.lstat(src_rel)
        if st is None:
            raise PlanError("rename", src, "the source does not exist")
        dst_rel, existing, top = self._target(
            dst, "rename", is_dir=stat.S_ISDIR(st.st_mode)
        )
        if dst_rel == src_rel:
            self._record(Operation("rename", join(dst_rel), source=join(src_rel)))
            return
        if dst_rel[: len(src_rel)] == src_rel:
            raise PlanError("rename", dst, "cannot move a directory into itself")
        # ``top``: where missing parents start; they are planned once nothing can fail.
        dst_dev = self._dev_of_dir(top)
        src_dev = self._dev_of_dir(src_rel[:-1])
        loc = self._model.locate(src_rel)
        assert loc is not None
        same = not stat.S_ISDIR(st.st_mode) or self._device_key(loc) == src_dev
        if src_dev == dst_dev and same:
            self._ensure_parents(dst_rel)
            self._area(src_dev, src_rel[:-1])  # every changed device has an area
            backup = (
                self._new_name(self._area(dst_dev, dst_rel[:-1]), "b")
                if existing
                else None
            )
            self._steps.append(Place(src_rel, dst_rel, st.st_ino, backup, staged=False))
            self._step_ops.append(len(self._operations))
            self._model.move(src_rel, dst_rel)
        else:
            # Across devices: a staged copy on the destination's device, then
            # the source is deleted like any other path.
            staged = self._new_name(self._area(dst_dev, top), "s")
            try:
                self._copy_into(_PlannedSource(self), src_rel, staged, follow=False)
            except BaseException:
                self._fs.remove_tree(staged)
                raise
            self._ensure_parents(dst_rel)
            self._add_place(staged, dst_rel, dst_dev, backup=existing is not None)
            self._plan_remove(src_rel, src_dev)
        self._record(Operation("rename", join(dst_rel), source=join(src_rel)))

    def delete(self, path: StrPath, *, missing_ok: bool = False) -> None:
        """Remove a file, symlink (never its target) or whole tree."""
        self._check_open("delete", path)
        rel = self._resolve(path, "delete")
        if self._model.lstat(rel) is None:
            if not missing_ok:
                raise PlanError("delete", path, "it does not exist")
        else:
            self._plan_remove(rel, self._dev_of_dir(rel[:-1]))
        self._record(Operation("delete", join(rel)))

    def _plan_remove(self, rel: Rel, dev: DeviceKey) -> None:
        backup = self._new_name(self._area(dev, rel[:-1]), "b")
        self._steps.append(Remove(rel, backup))
        self._step_ops.append(len(self._operations))
        self._model.set(rel, None)

    # -- finishing -------------------------------------------------------------

    def _finish(self) -> None:
        self._spent = True
        try:
            self._journal.close()
        finally:
            try:
                self._fs.close()
            finally:
                self._lock.release()

    def _clean_staging(self, deferred: List[Rel]) -> None:
        for area in self._areas.values():
            _commit.purge(self._fs, area, area, _commit.trash_for(area), deferred)
        left = [area for area in self._areas.values() if self._fs.exists(area)]
        for top in self._area_tops:
            try:
                self._fs.rmdir(top)
            except OSError as exc:
                # Another transaction's staging may share this mount: leave it.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    left.append(top)
        if left:
            # Only the journal lists the areas (a mount's among them): raising
            # keeps it, so that the next recovery sweeps what is left.
            raise OSError(
                errno.ENOTEMPTY,
                "staging left for the next recovery (purge failed)",
                self._fs.abspath(left[0]),
            )
        if self.durability == "full":
            _commit.settle_areas(self._fs, self._areas.values())

    def rollback(self) -> None:
        """Discard the plan (nothing under the root changed); the transaction ends."""
        if self._spent:
            raise PlanError(
                "roll back", self.root, "the transaction is already finished"
            )
        try:
            self._clean_staging([])
            self._journal.remove()
        except OSError as exc:
            # Nothing under the root changed; the kept journal lets the next
            # recovery sweep the staging (e.g. on a mount gone read-only).
            _log.warning("staging of %r not fully removed: %s", self.root, exc)
        finally:
            self._finish()

    def commit(self) -> CommitReport:
        """Apply every planned operation, all or nothing.

        Returns:
            What was done, with any deferred deletions.

        Raises:
            CommitError: the commit failed and the tree was rolled back
                (the cause is chained).
            RollbackError: the rollback failed too; the journal and backups
                were kept for :func:`fstx.recover`.
        """
        if self._spent:
            raise PlanError("commit", self.root, "the transaction is already finished")
        start = time.monotonic()
        durable = self.durability == "full"
        steps = self._steps
        # Directory handles opened while planning would follow a directory
        # that was moved since; walk from the root again, refusing symlinks.
        self._fs.forget(())
        areas = list(self._areas.values())
        try:
            if durable:
                _commit.barrier(self._fs, areas, (), staged=True)
                # That made the journal's name durable too (it sits beside the
                # root's area): its first durable append needs no directory fsync.
                self._journal.created = False
            self._journal.append([*steps, State(_journal.COMMITTING)])
        except BaseException as exc:
            self._abort(exc, applied=False)
            raise AssertionError("unreachable") from exc  # pragma: no cover
        index = -1
        recorded = False
        try:
            total = len(steps)
            for index, step in enumerate(steps):
                _commit.apply(self._fs, step, self._retrier)
                if self.on_progress is not None:
                    self.on_progress(index + 1, total)
            index = total  # every step is in place: what fails now is the journal's
            if durable:
                _commit.barrier(self._fs, areas, _commit.touched_dirs(steps))
            recorded = True  # from here the commit record may reach the journal
            self._journal.append([State(_journal.COMMITTED)])
        except BaseException as exc:
            self._abort(exc, applied=True, index=index, recorded=recorded)
        deferred: List[Rel] = []
        try:
            _commit.purge_backups(self._fs, steps, deferred)
            self._clean_staging(deferred)
            # Last: a journal that will not go is trashed and reported, like
            # any leftover, rather than left to look like a pending transaction.
            self._journal.close()
            rel = self._journal.rel
            _commit.purge(self._fs, rel, rel, _commit.ROOT_TRASH, deferred)
        except OSError as exc:  # clean-up never undoes a commit
            _log.warning(
                "clean-up after the commit of %r was incomplete: %s", self.root, exc
            )
        finally:
            self._finish()
        unique = tuple(dict.fromkeys(self._fs.abspath(d) for d in deferred))
        return CommitReport(
            operations=len(self._operations),
            deferred=unique,
            retries=self._retrier.retries,
            elapsed=time.monotonic() - start,
        )

    def _describe(self, index: int) -> Tuple[str, str]:
        if 0 <= index < len(self._step_ops) and self._step_ops[index] < len(
            self._operations
        ):
            op = self._operations[self._step_ops[index]]
            return op.kind, op.path
        if 0 <= index < len(self._step_ops):
            # A step recorded before its operation finished planning cannot fail
            # here; keep a readable fallback anyway.
            return "apply", self.root
        return "journal", self.root

    def _abort(
        self,
        exc: BaseException,
        *,
        applied: bool,
        index: int = -1,
        recorded: bool = False,
    ) -> None:
        """Roll back after a failed commit and raise the right error."""
        try:
            if applied:
                if recorded and os.fstat(self._journal.fd).st_size > self._journal.size:
                    # The commit record reached the journal but its fsync
                    # failed: say "committing" again before undoing, or a crash
                    # mid-undo would be rolled forward from a half-undone tree.
                    self._journal.append([State(_journal.COMMITTING)])
                # Steps after the one that failed never ran: leave them alone
                # (their paths may not even be reachable now).
                _commit.undo(
                    self._fs,
                    self._steps[: index + 1],
                    self._retrier,
                    last_failed=index < len(self._steps),
                )
                if self.durability == "full":
                    _commit.barrier(
                        self._fs,
                        list(self._areas.values()),
                        _commit.undone_dirs(self._steps),
                    )
        except BaseException as undo_exc:
            kind, path = self._describe(index)
            self._spent = True
            with contextlib.suppress(OSError):
                self._finish()
            error = RollbackError(self.root, f"undo {kind}", path)
            raise error from _chain(undo_exc, exc)
        try:
            # A backup left after the undo is a second name of an old file in
            # use (winfs, Windows): it goes to the trash under its own path.
            left: List[Rel] = []
            _commit.purge_backups(self._fs, self._steps, left)
            self._clean_staging(left)
            self._journal.remove()
        except OSError as clean_exc:
            _log.warning(
                "staging of %r not fully removed after rollback: %s",
                self.root,
                clean_exc,
            )
        finally:
            self._finish()
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt and friends, after rolling back
        kind, path = self._describe(index)
        where = self._fs.abspath(tuple(path.split("/"))) if path != self.root else path
        message = (
            f"commit failed during {kind} {where!r}: {_reason(exc)}; "
            f"the tree under {self.root!r} was rolled back"
        )
        raise CommitError(kind, where, message) from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return (
            exc.strerror
            # InUseError's own text quotes its path already.
            if exc.filename is None or repr(exc.filename) in exc.strerror
            else f"{exc.strerror} ({exc.filename!r})"
        )
    return str(exc) or type(exc).__name__


def _chain(later: BaseException, earlier: BaseException) -> BaseException:
    if later.__context__ is None and later is not earlier:
        later.__context__ = earlier
    return later


def transaction(
    root: StrPath,
    *,
    durability: str = "full",
    retry: Optional[RetryPolicy] = None,
    lock_timeout: Optional[float] = None,
    on_progress: Optional[ProgressCallback] = None,
) -> Transaction:
    """Open a transaction on ``root``, recovering an interrupted one first.

    Args:
        root: the directory every change stays inside.
        durability: ``"full"`` (survives power loss once committed) or
            ``"none"`` (atomic against a process crash, no fsync at all).
        retry: how long to wait out files in use; the default policy if None.
        lock_timeout: seconds to wait for another transaction on the same
            root; None waits as long as it takes.
        on_progress: called as ``on_progress(done, total)`` while committing.

    Raises:
        LockTimeout: another transaction held the root for too long.
        JournalError: an interrupted transaction's journal is damaged.
    """
    return Transaction(
        root,
        durability=durability,
        retry=retry,
        lock_timeout=lock_timeout,
        on_progress=on_progress,
    )
