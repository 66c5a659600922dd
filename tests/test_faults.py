"""Fail at call k: an I/O error at every mutating OS call of every workload.

For each workload a clean run is traced first; then, for every k from 1 to
the number of mutating calls it made, the same workload runs on a fresh tree
with an ``OSError`` injected at call k, once or from k on (persistent). The
outcome is checked exactly against the trace: a fault up to the commit point
fails with the before-tree intact (same inodes, same mtimes), a fault after it
cannot undo the commit. Transient errors are retried on a fake clock until
the commit goes through with every effect applied once.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import attrs
import pytest

import fstx
from fstx import _commit, _os
from treeutil import assert_clean, installed, snapshot, staging_leftovers
from workloads import (
    BY_NAME,
    WORKLOADS,
    Trace,
    Workload,
    scratch,
    signature,
    traced_run,
    tree_of,
    without_identity,
    wrapped,
)

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX names and errno values"
)

# What each call is most likely to fail with for real.
ERRNO_OF: Dict[str, int] = {
    "write": errno.ENOSPC,
    "copy_fd": errno.ENOSPC,
    "mkdir": errno.ENOSPC,
    "symlink": errno.ENOSPC,
    "fsync": errno.EIO,
    "fsync_dir": errno.EIO,
    "syncfs": errno.EIO,
}
"""Errno by OS call; every other mutating call (renames, unlink, open...) gets EACCES."""


WORKLOAD_PARAMS = [pytest.param(w, id=w.name) for w in WORKLOADS]
DURABILITY = ["full", "none"]


def errno_of(name: str) -> int:
    """The errno injected into call ``name``."""
    return ERRNO_OF.get(name, errno.EACCES)


@attrs.define
class Fault:
    """An OS-layer hook failing the k-th mutating call (and every later one if persistent)."""

    k: int
    persistent: bool
    count: int = 0
    names: List[str] = attrs.Factory(list)
    injected: List[int] = attrs.Factory(list)
    active: bool = True

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase != "before" or name not in _os.MUTATING or not self.active:
            return
        self.count += 1
        self.names.append(name)
        if self.count == self.k or (self.persistent and self.count > self.k):
            err = errno_of(name)
            self.injected.append(self.count)
            raise OSError(err, f"{os.strerror(err)} (injected at {name} #{self.count})")


@attrs.frozen
class Outcome:
    """What one faulty run gave: a report, or the error and the phase it came from."""

    report: Optional[fstx.CommitReport] = None
    error: Optional[BaseException] = None
    phase: str = "commit"


def attempt(workload: Workload, root: str, src: str, durability: str) -> Outcome:
    """Open, plan and commit, as an installer would; catch what fstx may raise."""
    try:
        tx = fstx.transaction(root, durability=durability)
    except OSError as exc:
        return Outcome(error=exc, phase="open")
    try:
        workload.plan(tx, src)
    except OSError as exc:
        try:
            tx.rollback()
        except OSError as again:
            return Outcome(error=again, phase="rollback")
        return Outcome(error=exc, phase="plan")
    try:
        return Outcome(report=tx.commit())
    except (fstx.CommitError, fstx.RollbackError) as exc:
        return Outcome(error=exc)


def recover_and_check(root: str, want: Dict[str, Any], where: str) -> None:
    """Recovery (fault removed) leaves ``want`` and a clean staging; again, it is a no-op."""
    fstx.recover(root)
    assert tree_of(root, want) == want, where
    assert staging_leftovers(root) == [], where
    assert fstx.recover(root) == fstx.RecoveryReport(), where
    assert fstx.status(root) == fstx.Status(), where


def check_fault(
    workload: Workload,
    case: str,
    *,
    durability: str,
    trace: Trace,
    k: int,
    persistent: bool,
    links: bool = True,
) -> str:
    """Run ``workload`` with a fault at call k, check the outcome exactly, and name it."""
    root, src = os.path.join(case, "root"), os.path.join(case, "src")
    workload.setup(root, src)
    before = snapshot(root)
    after = workload.expected(root, src)
    fault = Fault(k, persistent)
    with installed(wrapped(fault, links)):
        outcome = attempt(workload, root, src, durability)
    fault.active = False
    name = trace.name(k)
    where = (
        f"{workload.name} ({durability}{'' if links else ', no hard links'}): "
        f"{'persistent ' if persistent else ''}"
        f"{errno.errorcode[errno_of(name)]} at call {k}/{len(trace)} ({name}), "
        f"commit point at {trace.commit_point}: {outcome}"
    )
    # The run follows the clean one up to the fault.
    assert fault.names[:k] == [trace.name(i) for i in range(1, k + 1)], where
    assert fault.injected[0] == k, where
    worked_around = not persistent and trace.tolerated(k)
    error = outcome.error

    if outcome.report is not None:
        # Success: only a fault after the commit point, or one worked around.
        assert k > trace.commit_done or worked_around, where
        assert tree_of(root, after) == after, where
        if staging_leftovers(root):
            # Clean-up that failed is never an error, but it is reported,
            # and the root does not look clean until recovery has run.
            assert outcome.report.deferred, where
            assert not fstx.status(root).clean, where
        else:
            assert fstx.status(root) == fstx.Status(), where
        recover_and_check(root, after, where)
        return "committed"

    assert error is not None
    assert k <= trace.commit_done, f"a fault after the commit point undid it: {where}"
    if isinstance(error, fstx.RollbackError):
        # Undo itself met the persistent fault: everything needed is kept.
        assert persistent, where
        assert outcome.phase == "commit", where
        assert "recover" in str(error), where
        assert fstx.status(root).pending, where
        # Once the commit record is written, recovery finishes the commit.
        recover_and_check(root, before if k <= trace.commit_point else after, where)
        return "RollbackError"

    assert snapshot(root) == before, where
    if isinstance(error, fstx.CommitError):
        assert outcome.phase == "commit", where
        cause = error.__cause__
        assert isinstance(cause, OSError), where
        assert cause.errno == errno_of(name), where
    else:
        assert type(error) is not fstx.PlanError, where
        assert isinstance(error, OSError), where
        assert outcome.phase in ("open", "plan", "rollback"), where
        injected = {errno_of(fault.names[i - 1]) for i in fault.injected}
        assert error.errno in injected, where
    if not persistent:
        assert staging_leftovers(root) == [], where
    recover_and_check(root, before, where)
    assert snapshot(root) == before, where
    return (
        type(error).__name__
        if outcome.phase == "commit"
        else f"OSError at {outcome.phase}"
    )


def sweep_faults(
    workload: Workload, durability: str, base: str, *, persistent: bool, links: bool
) -> None:
    """Fail every call of ``workload`` in turn; check each outcome and their variety."""
    clean = os.path.join(base, "clean")
    trace = traced_run(
        workload,
        os.path.join(clean, "root"),
        os.path.join(clean, "src"),
        durability,
        links=links,
    )
    assert_clean(os.path.join(clean, "root"))
    assert trace.commit_point > 1
    seen = {
        check_fault(
            workload,
            os.path.join(base, f"k{k}"),
            durability=durability,
            trace=trace,
            k=k,
            persistent=persistent,
            links=links,
        )
        for k in range(1, len(trace) + 1)
    }
    # The sweep reached every kind of outcome it is meant to check.
    assert {"committed", "CommitError", "OSError at open"} <= seen, seen
    if persistent:
        assert "RollbackError" in seen, seen


ONCE_OR_PERSISTENT = [
    pytest.param(False, id="once"),
    pytest.param(True, id="persistent"),
]


@pytest.mark.slow
@pytest.mark.parametrize("workload", WORKLOAD_PARAMS)
@pytest.mark.parametrize("durability", DURABILITY)
@pytest.mark.parametrize("persistent", ONCE_OR_PERSISTENT)
def test_fault_at_every_call(
    workload: Workload, durability: str, persistent: bool, tmp_path: Any
) -> None:
    with scratch(tmp_path) as base:
        sweep_faults(workload, durability, base, persistent=persistent, links=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["replace-one-file", "installer-upgrade", "replace-hard-linked-file"]
)
@pytest.mark.parametrize("persistent", ONCE_OR_PERSISTENT)
def test_fault_at_every_call_without_hard_links(
    name: str, persistent: bool, tmp_path: Any
) -> None:
    """Replaced files are moved out of the way (the Windows path) and must come back."""
    with scratch(tmp_path) as base:
        sweep_faults(BY_NAME[name], "full", base, persistent=persistent, links=False)


def test_sweep_reaches_every_phase(tmp_path: Any) -> None:
    """The sweep is worth its time: faults land in open, plan, apply and clean-up."""
    workload = BY_NAME["installer-upgrade"]
    with scratch(tmp_path) as base:
        root, src = os.path.join(base, "r"), os.path.join(base, "s")
        workload.setup(root, src)
        after = without_identity(workload.expected(root, src))
        shutil.rmtree(root)
        shutil.rmtree(src)
        trace = traced_run(workload, root, src, "full")  # builds the trees again
        assert tree_of(root, after) == after
        assert_clean(root)
    names = [trace.name(k) for k in range(1, len(trace) + 1)]
    assert trace.commit_done == trace.commit_point + 1  # the record, then its fsync
    before_commit = set(names[: trace.commit_point])
    after_commit = set(names[trace.commit_done :])
    assert {
        "open_file",
        "write",
        "copy_fd",
        "mkdir",
        "rename_noreplace",
        "exchange" if _commit.EXCHANGE_DEFAULT else "link",
        "rename",
        "syncfs",
    } <= before_commit
    assert {"unlink", "rmdir"} <= after_commit


# -- transient errors ----------------------------------------------------------


@attrs.define
class FakeTime:
    """A monotonic clock that only moves when slept on."""

    now: float = 1000.0
    sleeps: List[float] = attrs.Factory(list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@attrs.define
class Transient:
    """Fails the calls with the given signatures ``times`` times each, before or after they run."""

    targets: Dict[Tuple[str, ...], int]
    err: int
    phase: str
    failed: int = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase != self.phase:
            return
        key = signature(name, args)
        left = self.targets.get(key, 0)
        if left:
            self.targets[key] = left - 1
            self.failed += 1
            raise OSError(
                self.err, f"{os.strerror(self.err)} (injected {phase} {name})"
            )


RETRIED = frozenset({"rename", "rename_noreplace", "exchange", "chmod"})


def applied_calls(trace: Trace) -> List[Tuple[str, ...]]:
    """Signatures of the retried calls that apply steps (between journal and commit point)."""
    found = []
    for k in range(trace.committing + 1, trace.commit_point):
        name, args = trace.calls[k - 1]
        if name in RETRIED:
            found.append(signature(name, args))
    return found


@pytest.mark.parametrize("workload", WORKLOAD_PARAMS)
@pytest.mark.parametrize(
    "injection",
    [
        pytest.param((errno.EBUSY, "before", 3), id="EBUSY-before"),
        pytest.param((errno.EINTR, "before", 1), id="EINTR-before"),
        pytest.param((errno.EINTR, "after", 1), id="EINTR-after-it-took-effect"),
    ],
)
def test_transient_errors_are_retried(
    workload: Workload,
    injection: Tuple[int, str, int],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A few applied calls fail ``times`` times each (before they run, or after)."""
    err, phase, times = injection

    def no_real_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds} s for real")

    monkeypatch.setattr(time, "sleep", no_real_sleep)
    with scratch(tmp_path) as base:
        trace = traced_run(
            workload,
            os.path.join(base, "c", "root"),
            os.path.join(base, "c", "src"),
            "full",
        )
        calls = applied_calls(trace)
        assert calls, "every workload applies at least one rename or chmod"
        # The first, a middle and the last applied call fail `times` times each.
        chosen = list(dict.fromkeys([calls[0], calls[len(calls) // 2], calls[-1]]))
        root, src = os.path.join(base, "root"), os.path.join(base, "src")
        workload.setup(root, src)
        after = workload.expected(root, src)
        fake = FakeTime()
        hook = Transient(dict.fromkeys(chosen, times), err, phase)
        policy = fstx.RetryPolicy(deadline=60.0, sleep=fake.sleep, clock=fake.clock)
        with installed(hook):
            tx = fstx.transaction(root, retry=policy)
            workload.plan(tx, src)
            report = tx.commit()
        assert hook.failed == times * len(chosen)
        assert not any(hook.targets.values())
        assert report.retries == times * len(chosen)
        assert report.deferred == ()
        assert len(fake.sleeps) == report.retries
        assert fake.now == pytest.approx(1000.0 + sum(fake.sleeps))
        assert tree_of(root, after) == after
        assert_clean(root)


@attrs.define
class FailThenTransient:
    """Fail call k for good, then (armed only from there) inject transient errors."""

    k: int
    transient: Transient
    count: int = 0
    undo: List[Tuple[str, ...]] = attrs.Factory(list)

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name not in _os.MUTATING:
            return
        if phase == "before":
            self.count += 1
            if self.count == self.k:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if self.count > self.k:
            if phase == "before" and name in RETRIED:
                self.undo.append(signature(name, args))
            self.transient(name, phase, args)


@pytest.mark.parametrize("workload", WORKLOAD_PARAMS)
@pytest.mark.parametrize(
    "injection",
    [
        pytest.param((errno.EBUSY, "before", 2), id="EBUSY-before"),
        pytest.param((errno.EINTR, "after", 1), id="EINTR-after-it-took-effect"),
    ],
)
def test_transient_errors_during_undo_are_retried(
    workload: Workload,
    injection: Tuple[int, str, int],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit record cannot be written; the undo meets transient errors and still ends exact."""
    err, phase, times = injection
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail("slept for real"))
    with scratch(tmp_path) as base:
        trace = traced_run(
            workload,
            os.path.join(base, "c", "root"),
            os.path.join(base, "c", "src"),
            "full",
        )
        # A first failing run finds the calls the undo makes.
        probe = FailThenTransient(trace.commit_point, Transient({}, err, phase))
        root, src = os.path.join(base, "p", "root"), os.path.join(base, "p", "src")
        workload.setup(root, src)
        with installed(probe), pytest.raises(fstx.CommitError):
            tx = fstx.transaction(root)
            workload.plan(tx, src)
            tx.commit()
        assert probe.undo, "the undo renamed or chmodded something"
        chosen = list(
            dict.fromkeys(
                [probe.undo[0], probe.undo[len(probe.undo) // 2], probe.undo[-1]]
            )
        )
        root, src = os.path.join(base, "root"), os.path.join(base, "src")
        workload.setup(root, src)
        before = snapshot(root)
        fake = FakeTime()
        policy = fstx.RetryPolicy(deadline=60.0, sleep=fake.sleep, clock=fake.clock)
        hook = FailThenTransient(
            trace.commit_point, Transient(dict.fromkeys(chosen, times), err, phase)
        )
        with installed(hook), pytest.raises(fstx.CommitError) as failed:
            tx = fstx.transaction(root, retry=policy)
            workload.plan(tx, src)
            tx.commit()
        cause = failed.value.__cause__
        assert isinstance(cause, OSError)
        assert cause.errno == errno.ENOSPC
        assert hook.transient.failed == times * len(chosen)
        assert len(fake.sleeps) == hook.transient.failed
        assert snapshot(root) == before
        assert_clean(root)


# -- faults while rolling back ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["installer-upgrade", "symlinks-copied-and-deleted", "mixed-8-ops-with-mkdir"],
)
@pytest.mark.parametrize("persistent", ONCE_OR_PERSISTENT)
def test_fault_during_rollback(name: str, persistent: bool, tmp_path: Any) -> None:
    """A rollback that meets an I/O error never touches the tree; recovery sweeps what it left."""
    workload = BY_NAME[name]
    with scratch(tmp_path) as base:
        k = 0
        while True:
            k += 1
            assert k < 1000, "the rollback never ended"
            root, src = (
                os.path.join(base, f"{k}", "root"),
                os.path.join(base, f"{k}", "src"),
            )
            workload.setup(root, src)
            before = snapshot(root)
            tx = fstx.transaction(root)
            workload.plan(tx, src)
            fault = Fault(k, persistent)
            where = f"{name}: {'persistent ' if persistent else ''}fault at rollback call {k}"
            with installed(fault):
                tx.rollback()  # clean-up problems are logged, never raised
            fault.active = False
            assert tx.spent, where
            assert snapshot(root) == before, where
            if fault.count < k:
                assert_clean(root)  # the rollback needed fewer calls: done
                break
            if staging_leftovers(root):
                # What is left is visible, and the next recovery removes it.
                assert not fstx.status(root).clean, where
            recover_and_check(root, before, where)
            assert snapshot(root) == before, where
        assert k > 3
