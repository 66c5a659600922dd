"""Which errors are worth waiting for, and how long to wait.

The policy is data (:class:`RetryPolicy`). :class:`Retrier` calls the
function once directly, so the happy path costs one call and never sleeps;
only when that first attempt meets a transient error does it build a tenacity
``Retrying`` loop, which replays that failure as its own first attempt and
then waits and tries again on the policy's clock.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    NoReturn,
    Optional,
    TypeVar,
    overload,
)

import attrs

if TYPE_CHECKING:
    import tenacity

__all__ = ["Retrier", "RetryPolicy", "is_transient"]

_log = logging.getLogger("fstx")
_T = TypeVar("_T")

# Windows error codes that waiting may cure, by ``OSError.winerror``. Anything
# not listed is permanent. Evidence: shared/research/semantics.md §1.2, §4.1.
WINDOWS_TRANSIENT: Dict[int, str] = {
    5: "ERROR_ACCESS_DENIED: what a scanner, a delete-pending name, an open "
    "replace target or a busy directory give; permanent on a read-only file",
    32: "ERROR_SHARING_VIOLATION: another process has the file open without "
    "the share mode we need (scanner, indexer, an app, a process's cwd)",
    33: "ERROR_LOCK_VIOLATION: another process has locked a byte range",
    303: "ERROR_DELETE_PENDING: the name lingers until the last handle closes",
}

# POSIX errno values that waiting may cure. Anything not listed (EACCES,
# EPERM, ENOSPC, EROFS, ENAMETOOLONG...) is permanent. Evidence: §2.1, §4.1.
POSIX_TRANSIENT: Dict[int, str] = {
    errno.EBUSY: "in use: an NFS silly-renamed file, a busy FUSE or network file",
    errno.ETXTBSY: "a running executable, or one open for writing during an exec",
    errno.EAGAIN: "resource temporarily unavailable (a lock, a full queue)",
    errno.EINTR: "the call was interrupted by a signal",
}

_ERROR_ACCESS_DENIED = 5

# A wait shorter than this is not worth another attempt; it also keeps float
# rounding in the sum of the waits from buying one extra attempt at the deadline.
_EPSILON = 1e-6


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again may cure ``exc``.

    On Windows the decision is made on ``winerror``: CPython folds 5, 32, 33
    and others into ``EACCES``, so ``errno`` cannot tell a sharing violation
    from a real permission problem. Access denied (5) is permanent when the
    file it names (``filename`` or, for a rename, the replaced ``filename2``)
    has the read-only attribute: fstx clears the attribute instead of waiting.
    An ``OSError`` without ``winerror`` is classified by ``errno``.

    Args:
        exc: any exception; only an ``OSError`` can be transient.
    """
    if not isinstance(exc, OSError):
        return False
    winerror = getattr(exc, "winerror", None)
    if winerror is not None:
        if winerror not in WINDOWS_TRANSIENT:
            return False
        if winerror == _ERROR_ACCESS_DENIED:
            readonly = stat.FILE_ATTRIBUTE_READONLY
            return not (
                _file_attributes(exc.filename) & readonly
                or _file_attributes(exc.filename2) & readonly
            )
        return True
    return exc.errno in POSIX_TRANSIENT


def _file_attributes(
    path: object, lstat: Callable[[Any], os.stat_result] = os.lstat
) -> int:
    """Windows file attributes of ``path`` (not following a link); 0 if unknown.

    POSIX ``stat`` results have no ``st_file_attributes``, so this is 0 there.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        return 0
    try:
        st = lstat(path)
    except OSError:  # gone, or not ours to look at: nothing to clear
        return 0
    attributes: int = getattr(st, "st_file_attributes", 0)
    return attributes


def _default_deadline() -> float:
    raw = os.environ.get("FSTX_RETRY_DEADLINE")
    if raw is None or not raw.strip():
        return 10.0
    try:
        value = float(raw)
    except ValueError:
        _log.warning("ignoring FSTX_RETRY_DEADLINE=%r: not a number of seconds", raw)
        return 10.0
    if not value >= 0.0:  # also catches nan
        _log.warning("ignoring FSTX_RETRY_DEADLINE=%r: not a number >= 0", raw)
        return 10.0
    return value


def _non_negative(
    _inst: object, attribute: attrs.Attribute[float], value: float
) -> None:
    if not value >= 0:  # also catches nan
        raise ValueError(f"RetryPolicy.{attribute.name} must be >= 0, not {value!r}")


def _fraction(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(
            f"RetryPolicy.{attribute.name} must be in [0, 1], not {value!r}"
        )


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
    jitter: float = attrs.field(default=0.25, validator=_fraction)
    defer_after: float = attrs.field(default=2.0, validator=_non_negative)
    sleep: Callable[[float], None] = attrs.field(
        default=time.sleep, eq=False, repr=False, kw_only=True
    )
    clock: Callable[[], float] = attrs.field(
        default=time.monotonic, eq=False, repr=False, kw_only=True
    )

    def delay(self, attempt: int, rng: Optional[random.Random] = None) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), with jitter.

        ``first_delay * 2 ** (attempt - 1)``, capped at ``max_delay``, then
        scaled by a uniform factor in ``[1 - jitter, 1 + jitter]``.
        """
        # min() before the power would overflow: 2.0 ** 1100 raises OverflowError.
        exponent = min(attempt - 1, 64)
        base = min(self.first_delay * (2.0**exponent), self.max_delay)
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(base * (1.0 + spread), 0.0)


@attrs.define
class Retrier:
    """Runs filesystem calls under a :class:`RetryPolicy`, counting retries.

    Attributes:
        policy: the policy in force.
        rng: the source of jitter (a seam for tests).
        retries: how many times a call was tried again, over this retrier's life.
    """

    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    rng: random.Random = attrs.field(factory=random.Random, kw_only=True, repr=False)
    retries: int = attrs.field(default=0, init=False)

    @overload
    def call(
        self,
        func: Callable[..., _T],
        *args: Any,
        operation: str,
        path: object,
        budget: Optional[float] = None,
    ) -> _T: ...

    @overload
    def call(
        self,
        func: Callable[..., None],
        *args: Any,
        operation: str,
        path: object,
        budget: Optional[float] = None,
        already_done: Callable[[], bool],
    ) -> None: ...

    def call(
        self,
        func: Callable[..., Any],
        *args: Any,
        operation: str,
        path: object,
        budget: Optional[float] = None,
        already_done: Optional[Callable[[], bool]] = None,
    ) -> Any:
        """Call ``func(*args)``; on a transient error, retry until the budget is spent.

        The first attempt is a plain call. After a transient ``OSError`` it
        waits (see :meth:`RetryPolicy.delay`) and tries again, until
        ``budget`` seconds have passed since that first failure on the
        policy's clock; the last attempt comes at the deadline at the latest.

        Args:
            func: the filesystem call.
            *args: its arguments.
            operation: what it does, for the log (``"replace"``...).
            path: what it does it to, for the log.
            budget: seconds to keep trying; the policy's deadline by default
                (deletes pass ``policy.defer_after``).
            already_done: asked before each retry; True means an earlier
                attempt took effect after all (a rename that reported an
                error but happened), and the call returns None without
                calling ``func`` again. Only for functions returning None.

        Returns:
            What ``func`` returned.

        Raises:
            OSError: a permanent error at once, or the last transient one once
                the budget is spent (never tenacity's ``RetryError``).
        """
        try:
            return func(*args)
        except OSError as exc:
            if not is_transient(exc):
                raise
            first = exc
        limit = self.policy.deadline if budget is None else budget
        return self._retry(
            func,
            args,
            first,
            operation=operation,
            path=path,
            limit=limit,
            already_done=already_done,
        )

    def _retry(
        self,
        func: Callable[..., Any],
        args: Any,
        first: OSError,
        *,
        operation: str,
        path: object,
        limit: float,
        already_done: Optional[Callable[[], bool]],
    ) -> Any:
        # Imported on the first retry: most runs never wait, and never pay for it.
        import tenacity  # noqa: PLC0415

        policy = self.policy
        start = policy.clock()
        replayed = False
        if isinstance(path, tuple):  # the engine's root-relative components
            path = "/".join(str(p) for p in path)

        def attempt() -> Any:
            nonlocal replayed
            if not replayed:  # tenacity's attempt 1 is the direct call that failed
                replayed = True
                raise first
            self.retries += 1
            if already_done is not None and already_done():
                _log.debug("%s %r: had taken effect; not repeating it", operation, path)
                return None
            return func(*args)

        def stop(_state: tenacity.RetryCallState) -> bool:
            return policy.clock() - start >= limit - _EPSILON

        def wait(state: tenacity.RetryCallState) -> float:
            remaining = limit - (policy.clock() - start)
            delay = policy.delay(state.attempt_number, self.rng)
            return max(min(delay, remaining), 0.0)

        def log_attempt(state: tenacity.RetryCallState) -> None:
            assert state.outcome is not None
            assert state.next_action is not None
            _log.debug(
                "%s %r: %s; attempt %d failed, trying again in %.3f s",
                operation,
                path,
                state.outcome.exception(),
                state.attempt_number,
                state.next_action.sleep,
            )

        def give_up(state: tenacity.RetryCallState) -> NoReturn:
            assert state.outcome is not None
            exc = state.outcome.exception()
            assert isinstance(exc, OSError)  # only transient OSErrors are retried
            _log.warning(
                "%s %r: still failing after %d attempts in %.2f s (%s); giving up",
                operation,
                path,
                state.attempt_number,
                policy.clock() - start,
                exc,
            )
            raise exc

        retrying = tenacity.Retrying(
            sleep=policy.sleep,
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=log_attempt,
            retry_error_callback=give_up,
        )
        return retrying(attempt)
