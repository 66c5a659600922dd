"""The fstx error hierarchy.

Every error carries the operation and the path it concerns, quotes paths with
``!r`` and pickles cleanly, so that it can cross a process boundary.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any, Optional, Sequence, Tuple


class FstxError(Exception):
    """Base class of every error fstx raises."""


class PlanError(FstxError, ValueError):
    """An operation was refused when it was planned; nothing under root changed.

    Attributes:
        operation: the method that refused (``"copy"``, ``"delete"``…).
        path: the path it refused, as the caller gave it.
        reason: why, in words a user can act on.
    """

    def __init__(self, operation: str, path: object, reason: str) -> None:
        if isinstance(path, os.PathLike):
            path = os.fspath(path)  # quoted as the path, not as PosixPath('...')
        self.operation = operation
        self.path = path
        self.reason = reason
        super().__init__(operation, path, reason)

    def __str__(self) -> str:
        return f"cannot {self.operation} {self.path!r}: {self.reason}"


class CommitError(FstxError):
    """The commit failed and the tree under root was rolled back to its prior state.

    The original error is the ``__cause__``.

    Attributes:
        operation: the planned operation that failed (``"copy"``…), or a phase
            such as ``"journal"``.
        path: the path it concerned.
    """

    def __init__(self, operation: str, path: object, message: str) -> None:
        self.operation = operation
        self.path = path
        self.message = message
        super().__init__(operation, path, message)

    def __str__(self) -> str:
        return self.message


class InUseError(FstxError, OSError):
    """A file stayed in use past the retry deadline and could not be moved away.

    Attributes:
        path: the file.
        operation: what fstx tried to do with it.
        holders: ``(pid, name)`` of the processes known to hold it; empty when
            the platform cannot tell.
    """

    def __init__(
        self,
        path: object,
        operation: str,
        holders: Sequence[Tuple[int, str]] = (),
        *,
        winerror: Optional[int] = None,
        err: int = _errno.EBUSY,
    ) -> None:
        self.holders = tuple(holders)
        self.operation = operation
        self._winerror = winerror
        super().__init__(err, self._describe(path), path)
        self.path = path
        if winerror is not None:
            # OSError has ``winerror`` only on Windows; keep the code everywhere.
            self.winerror = winerror

    def _describe(self, path: object) -> str:
        if self.holders:
            who = ", ".join(f"{name} (pid {pid})" for pid, name in self.holders)
            held = f"it is held by {who}"
        else:
            held = "the processes holding it could not be determined"
        return f"cannot {self.operation} {path!r}: the file is in use and {held}"

    def __str__(self) -> str:
        return self._describe(self.filename)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (
            _rebuild_in_use,
            (self.filename, self.operation, self.holders, self._winerror, self.errno),
        )


def _rebuild_in_use(
    path: object,
    operation: str,
    holders: Sequence[Tuple[int, str]],
    winerror: Optional[int],
    err: int,
) -> InUseError:
    return InUseError(path, operation, holders, winerror=winerror, err=err)


class RollbackError(FstxError):
    """Rolling back failed; the journal and the backups were kept.

    Nothing is lost: ``fstx recover ROOT`` (or :func:`fstx.recover`) finishes
    the rollback once the cause is gone. The error that stopped the rollback
    is the ``__cause__``.
    """

    def __init__(self, root: object, operation: str, path: object) -> None:
        self.root = root
        self.operation = operation
        self.path = path
        super().__init__(root, operation, path)

    def __str__(self) -> str:
        return (
            f"rolling back failed while trying to {self.operation} {self.path!r}; "
            f"the journal and backups under {self.root!r} were kept and nothing is "
            f"lost: run `fstx recover {self.root}` once the cause is fixed"
        )


class LockTimeout(FstxError, TimeoutError):  # noqa: N818 - the name is fixed by the spec
    """Another transaction held the root's lock for longer than ``lock_timeout``."""

    def __init__(self, root: object, timeout: float) -> None:
        self.root = root
        self.timeout = timeout
        super().__init__(root, timeout)

    def __str__(self) -> str:
        return (
            f"cannot lock {self.root!r}: another fstx transaction held it for "
            f"more than {self.timeout:g} s"
        )


class JournalError(FstxError):
    """A journal is damaged beyond a torn last record; nothing was changed.

    Attributes:
        path: the journal file.
        problems: every problem found, one line each.
    """

    def __init__(self, path: object, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = tuple(problems)
        super().__init__(path, self.problems)

    def __str__(self) -> str:
        listed = "; ".join(self.problems)
        return (
            f"cannot read journal {self.path!r}: {listed}. Nothing was changed; "
            f"inspect or move the file aside by hand"
        )
