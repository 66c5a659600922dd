"""Tests of fstx._retry: classification, backoff, deadlines, logging."""

from __future__ import annotations

import errno
import logging
import random
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import tenacity

import fstx
from fstx import _retry
from fstx._retry import Retrier, RetryPolicy, is_transient


def winerr(
    winerror: int,
    err: int = errno.EACCES,
    filename: Optional[str] = None,
    filename2: Optional[str] = None,
) -> OSError:
    """An OSError as CPython builds it on Windows, made on any platform.

    On Linux ``OSError(errno, msg, filename, winerror)`` ignores ``winerror``
    and the instance has no such attribute, so it is set by hand.
    """
    exc = OSError(err, f"winerror {winerror}", filename, None, filename2)
    # typeshed declares OSError.winerror on Windows only.
    setattr(exc, "winerror", winerror)  # noqa: B010
    return exc


def test_winerr_helper_matches_cpython_on_this_platform() -> None:
    plain = OSError(errno.EACCES, "denied", "f", 32)
    assert isinstance(plain, PermissionError)
    made = winerr(32)
    assert isinstance(made, PermissionError)
    assert getattr(made, "winerror", None) == 32


CLASSIFICATION = [
    # POSIX: by errno.
    pytest.param(OSError(errno.EBUSY, "busy"), True, id="posix-EBUSY"),
    pytest.param(OSError(errno.ETXTBSY, "text busy"), True, id="posix-ETXTBSY"),
    pytest.param(OSError(errno.EAGAIN, "again"), True, id="posix-EAGAIN"),
    pytest.param(OSError(errno.EINTR, "interrupted"), True, id="posix-EINTR"),
    pytest.param(OSError(errno.EACCES, "denied"), False, id="posix-EACCES"),
    pytest.param(OSError(errno.EPERM, "not permitted"), False, id="posix-EPERM"),
    pytest.param(OSError(errno.ENOSPC, "full"), False, id="posix-ENOSPC"),
    pytest.param(OSError(errno.EROFS, "read-only fs"), False, id="posix-EROFS"),
    pytest.param(OSError(errno.EDQUOT, "quota"), False, id="posix-EDQUOT"),
    pytest.param(OSError(errno.ENAMETOOLONG, "long"), False, id="posix-ENAMETOOLONG"),
    pytest.param(OSError(errno.ENOENT, "missing"), False, id="posix-ENOENT"),
    pytest.param(OSError(errno.EEXIST, "exists"), False, id="posix-EEXIST"),
    pytest.param(OSError(errno.EXDEV, "cross-device"), False, id="posix-EXDEV"),
    pytest.param(OSError(errno.ENOTEMPTY, "not empty"), False, id="posix-ENOTEMPTY"),
    pytest.param(OSError(errno.EIO, "io"), False, id="posix-EIO"),
    pytest.param(OSError("no errno at all"), False, id="posix-no-errno"),
    # Windows: by winerror, whatever errno CPython derived from it.
    pytest.param(winerr(5), True, id="win-5-access-denied"),
    pytest.param(winerr(32), True, id="win-32-sharing-violation"),
    pytest.param(winerr(33), True, id="win-33-lock-violation"),
    pytest.param(winerr(303, errno.EINVAL), True, id="win-303-delete-pending"),
    pytest.param(winerr(2, errno.ENOENT), False, id="win-2-file-not-found"),
    pytest.param(winerr(3, errno.ENOENT), False, id="win-3-path-not-found"),
    pytest.param(winerr(17, errno.EXDEV), False, id="win-17-not-same-device"),
    pytest.param(winerr(19), False, id="win-19-write-protect"),
    pytest.param(winerr(80, errno.EEXIST), False, id="win-80-file-exists"),
    pytest.param(winerr(112, errno.ENOSPC), False, id="win-112-disk-full"),
    pytest.param(winerr(145, errno.ENOTEMPTY), False, id="win-145-dir-not-empty"),
    pytest.param(winerr(183, errno.EEXIST), False, id="win-183-already-exists"),
    pytest.param(winerr(206, errno.ENOENT), False, id="win-206-name-too-long"),
    pytest.param(winerr(1224, errno.EINVAL), False, id="win-1224-user-mapped"),
    pytest.param(winerr(1314, errno.EINVAL), False, id="win-1314-privilege"),
    # winerror wins over errno, both ways.
    pytest.param(winerr(2, errno.EBUSY), False, id="win-2-over-EBUSY"),
    pytest.param(winerr(32, errno.EPERM), True, id="win-32-over-EPERM"),
    # Not an OSError at all.
    pytest.param(ValueError("no"), False, id="ValueError"),
    pytest.param(KeyboardInterrupt(), False, id="KeyboardInterrupt"),
    pytest.param(TimeoutError(errno.ETIMEDOUT, "t"), False, id="TimeoutError"),
]


@pytest.mark.parametrize(("exc", "expected"), CLASSIFICATION)
def test_classification(exc: BaseException, expected: bool) -> None:
    assert is_transient(exc) is expected


def test_is_transient_is_public() -> None:
    assert fstx.is_transient is is_transient


def test_every_table_entry_has_a_reason() -> None:
    for table in (_retry.WINDOWS_TRANSIENT, _retry.POSIX_TRANSIENT):
        for code, reason in table.items():
            assert isinstance(code, int)
            assert len(reason) > 10


@pytest.fixture
def attributes(monkeypatch: pytest.MonkeyPatch) -> Dict[str, int]:
    """Fake Windows file attributes, by path."""
    table: Dict[str, int] = {}

    def fake(path: object) -> int:
        return table.get(str(path), 0)

    monkeypatch.setattr(_retry, "_file_attributes", fake)
    return table


READONLY = 0x1
HIDDEN = 0x2


@pytest.mark.parametrize(
    ("attrs_of", "exc", "expected"),
    [
        pytest.param({}, winerr(5, filename="a"), True, id="5-plain-file"),
        pytest.param({"a": READONLY}, winerr(5, filename="a"), False, id="5-readonly"),
        pytest.param(
            {"a": READONLY | HIDDEN}, winerr(5, filename="a"), False, id="5-ro-hidden"
        ),
        pytest.param({"a": HIDDEN}, winerr(5, filename="a"), True, id="5-hidden-only"),
        pytest.param(
            {"b": READONLY},
            winerr(5, filename="a", filename2="b"),
            False,
            id="5-readonly-replace-target",
        ),
        pytest.param({"a": READONLY}, winerr(32, filename="a"), True, id="32-readonly"),
        pytest.param(
            {"a": READONLY}, winerr(303, filename="a"), True, id="303-readonly"
        ),
    ],
)
def test_access_denied_on_readonly_file_is_permanent(
    attributes: Dict[str, int], attrs_of: Dict[str, int], exc: OSError, expected: bool
) -> None:
    attributes.update(attrs_of)
    assert is_transient(exc) is expected


def test_file_attributes_reads_st_file_attributes() -> None:
    def lstat(path: object) -> object:
        assert path == "x"
        return types.SimpleNamespace(st_file_attributes=0x21)

    assert _retry._file_attributes("x", lstat) == 0x21  # type: ignore[arg-type]


def test_file_attributes_is_zero_on_posix_missing_and_non_paths(
    tmp_path: object,
) -> None:
    real = __file__
    assert _retry._file_attributes(real) == 0  # POSIX stat has no attributes
    assert _retry._file_attributes("/nonexistent/fstx/x") == 0
    assert _retry._file_attributes(None) == 0
    assert _retry._file_attributes(3) == 0  # an fd is not looked up


def test_access_denied_on_posix_file_is_transient(tmp_path: object) -> None:
    # No read-only attribute exists on POSIX, so a real file does not block.
    assert is_transient(winerr(5, filename=__file__)) is True


# --- delays -----------------------------------------------------------------


class FixedRng(random.Random):
    """An rng whose uniform() always gives one end of the range."""

    def __init__(self, end: str) -> None:
        super().__init__(0)
        self.end = end

    def uniform(self, a: float, b: float) -> float:
        return {"low": a, "high": b, "mid": (a + b) / 2}[self.end]


def test_delays_double_and_cap() -> None:
    policy = RetryPolicy(first_delay=0.01, max_delay=1.0, jitter=0.0)
    got = [policy.delay(n) for n in range(1, 11)]
    assert got == pytest.approx(
        [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0]
    )


def test_delay_of_a_huge_attempt_number_is_capped_not_overflowing() -> None:
    policy = RetryPolicy(jitter=0.0)
    assert policy.delay(5000) == 1.0


@pytest.mark.parametrize(
    ("end", "factor"),
    [
        pytest.param("low", 0.75, id="low"),
        pytest.param("mid", 1.0, id="mid"),
        pytest.param("high", 1.25, id="high"),
    ],
)
def test_jitter_ends(end: str, factor: float) -> None:
    policy = RetryPolicy(jitter=0.25)
    assert policy.delay(1, FixedRng(end)) == pytest.approx(0.01 * factor)
    assert policy.delay(20, FixedRng(end)) == pytest.approx(1.0 * factor)


def test_jitter_stays_in_bounds_and_varies() -> None:
    policy = RetryPolicy(jitter=0.25)
    rng = random.Random(1234)
    samples = [policy.delay(3, rng) for _ in range(2000)]
    assert all(0.03 <= s <= 0.05 for s in samples)
    assert min(samples) < 0.031
    assert max(samples) > 0.049


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"deadline": -1.0}, id="deadline"),
        pytest.param({"first_delay": -0.1}, id="first_delay"),
        pytest.param({"max_delay": -1.0}, id="max_delay"),
        pytest.param({"jitter": -0.1}, id="jitter-negative"),
        pytest.param({"jitter": 1.5}, id="jitter-above-one"),
        pytest.param({"defer_after": -2.0}, id="defer_after"),
        pytest.param({"deadline": float("nan")}, id="deadline-nan"),
    ],
)
def test_policy_rejects_bad_values(kwargs: Dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)


def test_policy_defaults_and_equality() -> None:
    policy = RetryPolicy()
    assert (
        policy.deadline,
        policy.first_delay,
        policy.max_delay,
        policy.jitter,
        policy.defer_after,
    ) == (10.0, 0.01, 1.0, 0.25, 2.0)
    assert RetryPolicy(sleep=lambda s: None, clock=lambda: 0.0) == policy
    assert fstx.RetryPolicy is RetryPolicy
    with pytest.raises(AttributeError):
        policy.deadline = 1.0  # type: ignore[misc]  # frozen: the point of the test


# --- FSTX_RETRY_DEADLINE -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "warns"),
    [
        pytest.param(None, 10.0, False, id="unset"),
        pytest.param("2.5", 2.5, False, id="number"),
        pytest.param("0", 0.0, False, id="zero"),
        pytest.param(" 30 ", 30.0, False, id="spaces"),
        pytest.param("", 10.0, False, id="empty"),
        pytest.param("soon", 10.0, True, id="not-a-number"),
        pytest.param("-1", 10.0, True, id="negative"),
        pytest.param("nan", 10.0, True, id="nan"),
    ],
)
def test_env_deadline(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    raw: Optional[str],
    expected: float,
    warns: bool,
) -> None:
    if raw is None:
        monkeypatch.delenv("FSTX_RETRY_DEADLINE", raising=False)
    else:
        monkeypatch.setenv("FSTX_RETRY_DEADLINE", raw)
    with caplog.at_level(logging.WARNING, logger="fstx"):
        assert RetryPolicy().deadline == expected
    assert bool(caplog.records) is warns


def test_explicit_deadline_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSTX_RETRY_DEADLINE", "2.5")
    assert RetryPolicy(deadline=7.0).deadline == 7.0


# --- the retry loop ------------------------------------------------------------


class FakeTime:
    """A monotonic clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: List[float] = []
        self.clock_reads = 0

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(float(seconds))
        self.now += seconds

    def clock(self) -> float:
        self.clock_reads += 1
        return self.now


class Flaky:
    """Raises the given errors in turn, then returns ``result``."""

    def __init__(self, errors: List[OSError], result: object = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0
        self.args: List[Tuple[object, ...]] = []

    def __call__(self, *args: object) -> object:
        self.calls += 1
        self.args.append(args)
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def busy(tag: str = "x") -> OSError:
    return OSError(errno.EBUSY, "busy", tag)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def retrier(fake: FakeTime, **kwargs: Any) -> Retrier:
    kwargs.setdefault("jitter", 0.0)
    kwargs.setdefault("deadline", 10.0)
    return Retrier(RetryPolicy(sleep=fake.sleep, clock=fake.clock, **kwargs))


def test_happy_path_calls_once_without_clock_sleep_or_tenacity(
    fake: FakeTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_tenacity(*args: object, **kwargs: object) -> None:
        raise AssertionError("tenacity used on the happy path")

    monkeypatch.setattr(tenacity, "Retrying", no_tenacity)
    r = retrier(fake)
    func = Flaky([])
    assert r.call(func, "a", "b", operation="op", path="p") == "ok"
    assert func.args == [("a", "b")]
    assert fake.sleeps == []
    assert fake.clock_reads == 0
    assert r.retries == 0


def test_transient_then_success_backs_off(fake: FakeTime) -> None:
    r = retrier(fake)
    func = Flaky([busy(), busy(), busy()], result=42)
    assert r.call(func, 1, operation="op", path="p") == 42
    assert func.calls == 4
    assert func.args == [(1,)] * 4
    assert fake.sleeps == pytest.approx([0.01, 0.02, 0.04])
    assert r.retries == 3


def test_deadline_on_fake_clock(fake: FakeTime) -> None:
    r = retrier(fake, deadline=3.0)
    errors = [busy(f"e{i}") for i in range(100)]
    func = Flaky(errors)
    with pytest.raises(OSError) as info:
        r.call(func, operation="op", path="p")
    # Doubling from 10 ms, capped at 1 s, the last wait cut to end at the deadline.
    assert fake.sleeps == pytest.approx(
        [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 0.73]
    )
    assert sum(fake.sleeps) == pytest.approx(3.0)
    assert func.calls == len(fake.sleeps) + 1  # one last attempt at the deadline
    # The last error is re-raised as it was, not the first and not a RetryError.
    assert info.value is errors[func.calls - 1]
    assert not isinstance(info.value, tenacity.RetryError)
    assert r.retries == func.calls - 1


def test_default_deadline_is_ten_seconds(
    fake: FakeTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FSTX_RETRY_DEADLINE", raising=False)
    r = Retrier(RetryPolicy(sleep=fake.sleep, clock=fake.clock))
    with pytest.raises(OSError):
        r.call(Flaky([busy()] * 1000), operation="op", path="p")
    assert sum(fake.sleeps) == pytest.approx(10.0)
    assert max(fake.sleeps) <= 1.25  # 1 s cap plus 25 % jitter


def test_env_deadline_reaches_the_loop(
    fake: FakeTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FSTX_RETRY_DEADLINE", "0.3")
    r = Retrier(RetryPolicy(jitter=0.0, sleep=fake.sleep, clock=fake.clock))
    with pytest.raises(OSError):
        r.call(Flaky([busy()] * 1000), operation="op", path="p")
    assert fake.sleeps == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.15])


def test_budget_overrides_deadline(fake: FakeTime) -> None:
    r = retrier(fake, deadline=10.0, defer_after=0.5)
    with pytest.raises(OSError):
        r.call(
            Flaky([busy()] * 1000),
            operation="delete",
            path="p",
            budget=r.policy.defer_after,
        )
    assert sum(fake.sleeps) == pytest.approx(0.5)


def test_zero_budget_gives_up_after_the_first_attempt(
    fake: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    r = retrier(fake)
    first = busy()
    func = Flaky([first])
    with caplog.at_level(logging.DEBUG, logger="fstx"):
        with pytest.raises(OSError) as info:
            r.call(func, operation="op", path="p", budget=0)
    assert info.value is first
    assert func.calls == 1
    assert fake.sleeps == []
    assert r.retries == 0
    assert [rec.levelno for rec in caplog.records] == [logging.WARNING]


def test_permanent_error_is_not_retried(fake: FakeTime) -> None:
    r = retrier(fake)
    denied = PermissionError(errno.EACCES, "denied", "p")
    func = Flaky([denied])
    with pytest.raises(PermissionError) as info:
        r.call(func, operation="op", path="p")
    assert info.value is denied
    assert func.calls == 1
    assert fake.sleeps == []
    assert r.retries == 0


def test_permanent_error_after_transient_ones_is_raised_at_once(
    fake: FakeTime,
) -> None:
    r = retrier(fake)
    full = OSError(errno.ENOSPC, "full", "p")
    func = Flaky([busy(), full, busy()])
    with pytest.raises(OSError) as info:
        r.call(func, operation="op", path="p")
    assert info.value is full
    assert func.calls == 2
    assert fake.sleeps == pytest.approx([0.01])


def test_windows_errors_are_retried(fake: FakeTime) -> None:
    r = retrier(fake)
    func = Flaky([winerr(32), winerr(33), winerr(5), winerr(303, errno.EINVAL)])
    assert r.call(func, operation="op", path="p") == "ok"
    assert func.calls == 5


def test_non_oserror_propagates_from_a_retry(fake: FakeTime) -> None:
    r = retrier(fake)
    calls = [0]

    def func() -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise busy()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        r.call(func, operation="op", path="p")
    assert calls[0] == 2


def test_retries_counter_accumulates(fake: FakeTime) -> None:
    r = retrier(fake)
    r.call(Flaky([busy(), busy()]), operation="op", path="p")
    r.call(Flaky([]), operation="op", path="p")
    r.call(Flaky([busy()]), operation="op", path="p")
    assert r.retries == 3


def test_jitter_is_applied_in_the_loop(fake: FakeTime) -> None:
    r = Retrier(
        RetryPolicy(jitter=0.25, sleep=fake.sleep, clock=fake.clock),
        rng=FixedRng("high"),
    )
    r.call(Flaky([busy(), busy()]), operation="op", path="p")
    assert fake.sleeps == pytest.approx([0.0125, 0.025])


def test_logging_levels(fake: FakeTime, caplog: pytest.LogCaptureFixture) -> None:
    r = retrier(fake, deadline=0.1)
    with caplog.at_level(logging.DEBUG, logger="fstx"):
        with pytest.raises(OSError):
            r.call(Flaky([busy()] * 100), operation="replace", path="lib/x.pyd")
    records = [rec for rec in caplog.records if rec.name == "fstx"]
    debug = [rec for rec in records if rec.levelno == logging.DEBUG]
    warning = [rec for rec in records if rec.levelno == logging.WARNING]
    assert len(debug) == len(fake.sleeps) == 4  # 10+20+40+30 ms
    assert len(warning) == 1
    assert len(records) == 5
    for rec in records:
        assert "replace" in rec.getMessage()
        assert "'lib/x.pyd'" in rec.getMessage()
    assert "giving up" in warning[0].getMessage()
    assert "attempt 1 failed" in debug[0].getMessage()


def test_success_after_retries_logs_no_warning(
    fake: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    r = retrier(fake)
    with caplog.at_level(logging.DEBUG, logger="fstx"):
        r.call(Flaky([busy()]), operation="op", path="p")
    assert [rec.levelno for rec in caplog.records] == [logging.DEBUG]


def test_happy_path_logs_nothing(
    fake: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    r = retrier(fake)
    with caplog.at_level(logging.DEBUG, logger="fstx"):
        r.call(Flaky([]), operation="op", path="p")
    assert caplog.records == []


# --- already_done: "before retrying a rename, check whether it already happened"


def checker(answers: List[bool]) -> Callable[[], bool]:
    calls: List[bool] = []

    def already_done() -> bool:
        answer = answers[len(calls)]
        calls.append(answer)
        return answer

    already_done.calls = calls  # type: ignore[attr-defined]  # test bookkeeping
    return already_done


def test_already_done_stops_without_calling_again(fake: FakeTime) -> None:
    r = retrier(fake)
    calls = [0]

    def rename() -> None:
        calls[0] += 1
        raise busy()

    done = checker([True])
    assert r.call(rename, operation="rename", path="p", already_done=done) is None
    assert calls[0] == 1
    assert done.calls == [True]  # type: ignore[attr-defined]
    assert fake.sleeps == pytest.approx([0.01])
    assert r.retries == 1


def test_already_done_is_asked_before_each_retry_only(fake: FakeTime) -> None:
    r = retrier(fake)
    calls = [0]

    def rename() -> None:
        calls[0] += 1
        if calls[0] <= 2:
            raise busy()

    done = checker([False, False])
    r.call(rename, operation="rename", path="p", already_done=done)
    assert calls[0] == 3
    assert done.calls == [False, False]  # type: ignore[attr-defined]


def test_already_done_not_asked_on_the_happy_path(fake: FakeTime) -> None:
    r = retrier(fake)
    done = checker([])
    r.call(lambda: None, operation="rename", path="p", already_done=done)
    assert done.calls == []  # type: ignore[attr-defined]


def test_already_done_not_asked_after_a_permanent_error(fake: FakeTime) -> None:
    r = retrier(fake)
    done = checker([])

    def rename() -> None:
        raise FileNotFoundError(errno.ENOENT, "gone", "p")

    with pytest.raises(FileNotFoundError):
        r.call(rename, operation="rename", path="p", already_done=done)
    assert done.calls == []  # type: ignore[attr-defined]


def test_already_done_after_the_deadline_is_not_asked(fake: FakeTime) -> None:
    r = retrier(fake, deadline=0.05)
    calls = [0]

    def rename() -> None:
        calls[0] += 1
        raise busy()

    done = checker([False] * 100)
    with pytest.raises(OSError):
        r.call(rename, operation="rename", path="p", already_done=done)
    # Asked once before each retry, and never after giving up.
    assert len(done.calls) == calls[0] - 1  # type: ignore[attr-defined]
