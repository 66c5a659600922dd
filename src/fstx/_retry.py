"""Which errors are worth waiting for, and how long to wait.

The policy is data (:class:`RetryPolicy`); :class:`Retrier` turns it into a
tenacity ``Retrying`` loop only after a first attempt has failed, so the happy
path costs one function call and never sleeps.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from typing import Any, Callable, Dict, Optional, TypeVar

import attrs
import tenacity

__all__ = ["Retrier", "RetryPolicy", "is_transient"]

_log = logging.getLogger("fstx")
_T = TypeVar("_T")

# Windows error codes, classified by what waiting can do about them
# (evidence: shared/research/semantics.md §1.2 and §4.1).
_WINDOWS_TRANSIENT: Dict[int, str] = {
    5: "ERROR_ACCESS_DENIED: also what a scanner, an open handle on the target of "
    "a replace, or a delete-pending file give; the read-only case is excluded",
    32: "ERROR_SHARING_VIOLATION: another process has the file open",
    33: "ERROR_LOCK_VIOLATION: another process has locked a byte range",
    303: "ERROR_DELETE_PENDING: the name lingers until the last handle closes",
}

# POSIX errno values that waiting may cure.
_POSIX_TRANSIENT: Dict[int, str] = {
    errno.EBUSY: "in use: a mount point, an NFS silly-renamed file, a busy device",
    errno.ETXTBSY: "a running executable opened for writing",
    errno.EAGAIN: "resource temporarily unavailable (a lock, a full queue)",
    errno.EINTR: "the call was interrupted by a signal",
}

_FILE_ATTRIBUTE_READONLY = 0x1


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again may cure ``exc``.

    On Windows the decision is made on ``winerror``: CPython folds codes 5,
    32, 33 and others into ``EACCES``, so ``errno`` alone cannot tell a
    sharing violation from a real permission problem. Access denied (5) on a
    file with the read-only attribute is permanent (fstx clears the attribute
    instead of waiting).

    Args:
        exc: any exception; only ``OSError`` can be transient.
    """
    if not isinstance(exc, OSError):
        return False
    winerror = getattr(exc, "winerror", None)
    if winerror is not None:
        if winerror not in _WINDOWS_TRANSIENT:
            return False
        return not (winerror == 5 and _has_readonly_attribute(exc.filename))
    return exc.errno in _POSIX_TRANSIENT


def _has_readonly_attribute(path: object) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return bool(getattr(st, "st_file_attributes", 0) & _FILE_ATTRIBUTE_READONLY)


def _default_deadline() -> float:
    raw = os.environ.get("FSTX_RETRY_DEADLINE")
    if raw is None:
        return 10.0
    try:
        value = float(raw)
    except ValueError:
        _log.warning("ignoring FSTX_RETRY_DEADLINE=%r: not a number of seconds", raw)
        return 10.0
    return max(value, 0.0)


def _non_negative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"RetryPolicy.{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen
class RetryPolicy:
    """How long to keep trying a filesystem call that meets a transient error.

    Waits start at ``first_delay`` and double up to ``max_delay``, each moved
    by up to ``jitter`` (a fraction) either way, until ``deadline`` seconds
    have passed on a monotonic clock. Moving an old file out of the way stops
    waiting after ``defer_after`` seconds and renames it away instead.
    ``FSTX_RETRY_DEADLINE`` in the environment sets the default deadline.

    ``sleep`` and ``clock`` are seams for tests; they take no part in equality.
    """

    deadline: float = attrs.field(factory=_default_deadline, validator=_non_negative)
    first_delay: float = attrs.field(default=0.01, validator=_non_negative)
    max_delay: float = attrs.field(default=1.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.25, validator=_non_negative)
    defer_after: float = attrs.field(default=2.0, validator=_non_negative)
    sleep: Callable[[float], None] = attrs.field(
        default=time.sleep, eq=False, repr=False, kw_only=True
    )
    clock: Callable[[], float] = attrs.field(
        default=time.monotonic, eq=False, repr=False, kw_only=True
    )

    def delay(self, attempt: int, rng: Optional[random.Random] = None) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), with jitter."""
        base = min(self.first_delay * (2 ** (attempt - 1)), self.max_delay)
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(base * (1.0 + spread), 0.0)


@attrs.define
class Retrier:
    """Runs filesystem calls under a :class:`RetryPolicy`, counting retries."""

    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    retries: int = 0

    def call(
        self,
        func: Callable[..., _T],
        *args: Any,
        operation: str,
        path: object,
        budget: Optional[float] = None,
    ) -> _T:
        """Call ``func(*args)``; on a transient error, retry until the budget is spent.

        Args:
            func: the filesystem call.
            *args: its arguments.
            operation: what it does, for the log (``"replace"``…).
            path: what it does it to, for the log.
            budget: seconds to keep trying; the policy's deadline by default.

        Returns:
            What ``func`` returned.

        Raises:
            OSError: the last error, once it is permanent or the budget is spent.
        """
        try:
            return func(*args)
        except OSError as exc:
            if not is_transient(exc):
                raise
            first = exc
        return self._retry(func, args, first, operation, path, budget)

    def _retry(
        self,
        func: Callable[..., _T],
        args: Any,
        first: OSError,
        operation: str,
        path: object,
        budget: Optional[float],
    ) -> _T:
        policy = self.policy
        limit = policy.deadline if budget is None else budget
        start = policy.clock()
        attempt = 1
        last: OSError = first

        def wait(state: tenacity.RetryCallState) -> float:
            delay = policy.delay(state.attempt_number)
            remaining = limit - (policy.clock() - start)
            return max(min(delay, remaining), 0.0)

        def give_up(_state: tenacity.RetryCallState) -> bool:
            return policy.clock() - start >= limit

        def log_attempt(state: tenacity.RetryCallState) -> None:
            _log.debug(
                "%s %r: %s; retry %d in %.3f s",
                operation,
                path,
                last,
                state.attempt_number,
                state.upcoming_sleep,
            )

        retrying = tenacity.Retrying(
            sleep=policy.sleep,
            stop=give_up,
            wait=wait,
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=log_attempt,
            reraise=True,
        )
        if give_up(tenacity.RetryCallState(retrying, None, (), {})):
            self._warn(operation, path, first, limit)
            raise first
        # The first attempt already failed: sleep once before the loop retries it.
        delay = policy.delay(attempt)
        _log.debug("%s %r: %s; retry 1 in %.3f s", operation, path, first, delay)
        policy.sleep(min(delay, limit))
        try:
            for try_ in retrying:
                with try_:
                    self.retries += 1
                    try:
                        return func(*args)
                    except OSError as exc:
                        last = exc
                        raise
        except OSError as exc:
            if is_transient(exc):
                self._warn(operation, path, exc, limit)
            raise
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    @staticmethod
    def _warn(operation: str, path: object, exc: OSError, limit: float) -> None:
        _log.warning(
            "%s %r: still failing after %.1f s (%s); giving up", operation, path, limit, exc
        )
