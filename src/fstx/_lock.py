"""One transaction per root at a time: a file lock in the staging directory."""

from __future__ import annotations

import logging
import os
import time
from types import TracebackType
from typing import Optional, Type

import filelock

from fstx._errors import LockTimeout

__all__ = ["RootLock"]

_log = logging.getLogger("fstx")

LOCK_NAME = "lock"
_WAIT_LOG_EVERY = 5.0


def _make_lock(path: str) -> filelock.BaseFileLock:
    # A fresh object per acquisition: two transactions in one process (two
    # threads) then hold two open file descriptions, which flock keeps apart.
    try:
        # filelock >= 3.20 deletes the lock file on release unless asked not
        # to; the lock file is the one thing the staging directory keeps.
        return filelock.FileLock(path, preserve_lock_file=True)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # pragma: no cover - older filelock
        return filelock.FileLock(path)


class RootLock:
    """The exclusive lock of one root, held while a transaction or recovery runs.

    Args:
        root: the root directory (for messages).
        staging: the staging directory holding the lock file.
        timeout: seconds to wait, or None to wait for as long as it takes
            (logging at INFO while waiting).
    """

    def __init__(self, root: str, staging: str, timeout: Optional[float]) -> None:
        self.root = root
        self.timeout = timeout
        self._lock = _make_lock(os.path.join(staging, LOCK_NAME))

    def acquire(self) -> None:
        """Take the lock, or raise :class:`~fstx.LockTimeout`."""
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            pass
        else:
            return
        if self.timeout is not None and self.timeout <= 0:
            raise LockTimeout(self.root, self.timeout) from None
        start = time.monotonic()
        while True:
            step = _WAIT_LOG_EVERY
            if self.timeout is not None:
                left = self.timeout - (time.monotonic() - start)
                if left <= 0:
                    raise LockTimeout(self.root, self.timeout) from None
                step = min(step, left)
            _log.info("waiting for another fstx transaction on %r to finish", self.root)
            try:
                self._lock.acquire(timeout=step)
            except filelock.Timeout:
                continue
            return

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now."""
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        return True

    def release(self) -> None:
        """Let the lock go."""
        self._lock.release()

    def __enter__(self) -> RootLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.release()
