"""Crash at call k: a real process dies at every mutating OS call, recovery puts it right.

A clean run of each workload is traced first. Then, for every mutating call
k, a forked child runs the workload with a hook that ends the process with
``os._exit`` just before it (no ``finally``, no ``atexit``: what ``kill -9``
leaves); it acknowledges over a pipe once ``commit()`` returned. Recovery
runs in another process (a forked one, and for a sample of crash points a
fresh interpreter), and the tree must be exactly the before-tree (same
inodes, same mtimes) or exactly the after-tree: the after-tree exactly when
the crash came after the commit record was written.

Also: the same sweep where hard links fail (old files are moved away, as on
Windows); recovery crashed at each of its own calls, then run again; an I/O
error at each call of recovery; a crash at each call of the undo of a commit
that failed, and of a rollback; and a blackbox test that SIGKILLs a child
looping commits at random times.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, List, Optional, Tuple

import attrs
import pytest

import fstx
from fstx import _os
from treeutil import FailAt, assert_clean, installed, snapshot
from workloads import (
    BY_NAME,
    WORKLOADS,
    File,
    Trace,
    Workload,
    build,
    fork,
    scratch,
    traced_run,
    tree_of,
    wrapped,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash harness forks"),
]

CRASHED = 137
DURABILITY = ["full", "none"]
FRESH_EVERY = 40
"""One crash point in this many is recovered by a fresh interpreter, not a fork."""

Work = Callable[[], Optional[bytes]]


@attrs.define
class CrashAt:
    """An OS-layer hook that ends the process at the k-th mutating call, before or after it."""

    k: int
    when: str
    count: int = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name not in _os.MUTATING:
            return
        if phase == "before":
            self.count += 1
        if phase == self.when and self.count == self.k:
            os._exit(CRASHED)


def in_child(work: Work, hook: Optional[_os.Hook]) -> Tuple[int, Optional[bytes]]:
    """Run ``work`` in a forked child with ``hook`` installed.

    Returns:
        The child's exit status (``CRASHED`` if the hook ended it), and what
        ``work`` returned, sent back over a pipe (None if it never returned).
    """
    r, w = os.pipe()
    pid = fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            _os.set_hook(hook)
            payload = work()
            _os.set_hook(None)
            os.write(w, b"+" + (payload or b""))
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            code = 1
        os._exit(code)
    os.close(w)
    try:
        chunks = []
        while True:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
    data = b"".join(chunks)
    return os.waitstatus_to_exitcode(status), (data[1:] if data else None)


def workload_work(workload: Workload, root: str, src: str, durability: str) -> Work:
    def work() -> bytes:
        with fstx.transaction(root, durability=durability) as tx:
            workload.plan(tx, src)
        return b"acked"

    return work


def recover_work(root: str) -> Work:
    def work() -> bytes:
        return pickle.dumps(fstx.recover(root))

    return work


def recover_forked(
    root: str, hook: Optional[_os.Hook] = None
) -> Tuple[int, Optional[fstx.RecoveryReport]]:
    """``fstx.recover(root)`` in a forked child; its exit status and report."""
    code, payload = in_child(recover_work(root), hook)
    report = pickle.loads(payload) if payload is not None else None
    return code, report


def recover_fresh(root: str) -> fstx.RecoveryReport:
    """``fstx.recover(root)`` in a new interpreter: no state shared with anyone."""
    script = (
        "import fstx, pickle, sys; "
        "sys.stdout.buffer.write(pickle.dumps(fstx.recover(sys.argv[1])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, root],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = pickle.loads(done.stdout)
    assert isinstance(report, fstx.RecoveryReport)
    return report


def check_settled(root: str, want: Any, exact: bool, where: str) -> None:
    """The tree is ``want`` (a before snapshot if ``exact``, else an expected tree), staging is clean,
    and recovering again changes nothing."""
    if exact:
        assert snapshot(root) == want, where
    else:
        assert tree_of(root, want) == want, where
    assert_clean(root)
    assert fstx.status(root) == fstx.Status(), where
    settled = snapshot(root)
    assert fstx.recover(root) == fstx.RecoveryReport(), where
    assert snapshot(root) == settled, where


# -- crash at every call -------------------------------------------------------


def sweep_crashes(
    workload: Workload, durability: str, base: str, *, links: bool
) -> None:
    """Crash ``workload`` before every call (and after the key ones); check each recovery."""
    clean = os.path.join(base, "clean")
    trace = traced_run(
        workload,
        os.path.join(clean, "root"),
        os.path.join(clean, "src"),
        durability,
        links=links,
    )
    n, start, point = len(trace), trace.committing, trace.commit_point
    # The journal goes last: a crash after that leaves nothing to recover.
    assert trace.name(n) == "unlink"
    assert str(trace.calls[-1][1][1]).endswith(".journal")
    # Between "after call k" and "before call k+1" nothing changes on disk
    # (only lookups and closes run there), so "before" every call covers
    # every crash state; "after" is kept where the difference is the point:
    # the commit record and the last call (the journal's removal).
    cases = [(k, "before") for k in range(1, n + 2)]
    cases += [(point, "after"), (n, "after")]
    for i, (k, when) in enumerate(cases):
        case = os.path.join(base, f"{k}{when}")
        root, src = os.path.join(case, "root"), os.path.join(case, "src")
        workload.setup(root, src)
        before = snapshot(root)
        after = workload.expected(root, src)
        code, ack = in_child(
            workload_work(workload, root, src, durability),
            wrapped(CrashAt(k, when), links),
        )
        where = (
            f"{workload.name} ({durability}{'' if links else ', no hard links'}): "
            f"crash {when} call {k}/{n}, commit point {point}"
        )
        if k <= n:
            assert (code, ack) == (CRASHED, None), where
        else:
            assert (code, ack) == (0, b"acked"), where
        if i % FRESH_EVERY == 0 or k == point:
            report = recover_fresh(root)
        else:
            code, got = recover_forked(root)
            assert code == 0, where
            assert got is not None
            report = got
        started = k > start or (k == start and when == "after")
        committed = k > point or (k == point and when == "after")
        journal_gone = k > n or (k == n and when == "after")
        assert report.rolled_back == (started and not committed), where
        assert report.rolled_forward == (committed and not journal_gone), where
        assert report.deferred == (), where
        if committed:
            check_settled(root, after, False, where)
        else:
            check_settled(root, before, True, where)


@pytest.mark.parametrize("workload", [pytest.param(w, id=w.name) for w in WORKLOADS])
@pytest.mark.parametrize("durability", DURABILITY)
def test_crash_at_every_call(
    workload: Workload, durability: str, tmp_path: Any
) -> None:
    with scratch(tmp_path) as base:
        sweep_crashes(workload, durability, base, links=True)


REPLACING = ["replace-one-file", "installer-upgrade", "replace-hard-linked-file"]
"""Workloads that replace existing files: without hard links these move them away."""


@pytest.mark.parametrize("name", REPLACING)
def test_crash_at_every_call_without_hard_links(name: str, tmp_path: Any) -> None:
    """Old files moved out of the way (the Windows path) come back after any crash."""
    with scratch(tmp_path) as base:
        sweep_crashes(BY_NAME[name], "full", base, links=False)


# -- crash inside recovery -----------------------------------------------------


def crash_points(trace: Trace, sample: bool) -> List[int]:
    """Crash points (after the call) that leave recovery some work: all, or a sample."""
    start, point, n = trace.committing, trace.commit_point, len(trace)
    every = list(range(start, n))
    if not sample:
        return every
    middle = (start + point) // 2
    return sorted({start, start + 1, middle, point - 1, point, (point + n) // 2, n - 1})


@pytest.mark.parametrize(
    ("name", "sample"),
    [
        pytest.param("swap-two-dirs", False, id="swap-two-dirs"),
        pytest.param("replace-hard-linked-file", False, id="replace-hard-linked-file"),
        pytest.param("installer-upgrade", True, id="installer-upgrade-sampled"),
    ],
)
@pytest.mark.parametrize("durability", DURABILITY)
def test_crash_inside_recovery(
    name: str, sample: bool, durability: str, tmp_path: Any
) -> None:
    workload = BY_NAME[name]
    with scratch(tmp_path) as base:
        clean = os.path.join(base, "clean")
        trace = traced_run(
            workload,
            os.path.join(clean, "root"),
            os.path.join(clean, "src"),
            durability,
        )
        points = crash_points(trace, sample)
        crashed = 0
        for k in points:
            committed = k >= trace.commit_point
            # Recovery is crashed before its call k2 = 1, 2, ... until it
            # needs fewer calls than that ("after k2" is "before k2+1" on disk).
            for k2 in range(1, 1000):
                case = os.path.join(base, f"{k}-{k2}")
                root, src = os.path.join(case, "root"), os.path.join(case, "src")
                workload.setup(root, src)
                before = snapshot(root)
                after = workload.expected(root, src)
                code, _ = in_child(
                    workload_work(workload, root, src, durability), CrashAt(k, "after")
                )
                assert code == CRASHED
                where = f"{name} ({durability}): crash after call {k}, then in recovery before call {k2}"
                code, _ = recover_forked(root, CrashAt(k2, "before"))
                if code != 0:
                    assert code == CRASHED, where
                    crashed += 1
                    # A second recovery, in another process, converges.
                    second = fstx.recover(root)
                    assert (second.rolled_back, second.rolled_forward) == (
                        not committed,
                        committed,
                    ), where
                if committed:
                    check_settled(root, after, False, where)
                else:
                    check_settled(root, before, True, where)
                if code == 0:
                    break
            else:
                pytest.fail(f"recovery after a crash at call {k} never finished")
        assert crashed > len(points)


# -- an I/O error inside recovery ---------------------------------------------


@pytest.mark.parametrize("name", ["swap-two-dirs", "installer-upgrade"])
@pytest.mark.parametrize(
    "persistent", [pytest.param(False, id="once"), pytest.param(True, id="persistent")]
)
def test_fault_inside_recovery(name: str, persistent: bool, tmp_path: Any) -> None:
    """Recovery that fails at its call k2 leaves a state the next recovery settles."""
    workload = BY_NAME[name]
    with scratch(tmp_path) as base:
        clean = os.path.join(base, "clean")
        trace = traced_run(
            workload, os.path.join(clean, "root"), os.path.join(clean, "src"), "full"
        )
        points = crash_points(trace, sample=True)
        failed = 0
        for k in points:
            committed = k >= trace.commit_point
            for k2 in range(1, 1000):
                case = os.path.join(base, f"{k}-{k2}")
                root, src = os.path.join(case, "root"), os.path.join(case, "src")
                workload.setup(root, src)
                before = snapshot(root)
                after = workload.expected(root, src)
                code, _ = in_child(
                    workload_work(workload, root, src, "full"), CrashAt(k, "after")
                )
                assert code == CRASHED
                where = f"{name}: crash after call {k}, EIO in recovery at call {k2}"
                fault = FailAt(k2, errno.EIO, persistent=persistent)
                report: Optional[fstx.RecoveryReport] = None
                io_error: Optional[int] = None
                with installed(fault):
                    try:
                        report = fstx.recover(root)
                    except fstx.RollbackError:
                        # Undo failed: the journal stays for the next recovery.
                        assert not committed, where
                        assert fstx.status(root).pending, where
                        failed += 1
                    except OSError as exc:
                        # Reading or removing the journal failed: it stays too.
                        io_error = exc.errno
                        assert fstx.status(root).pending, where
                        failed += 1
                assert io_error in (None, errno.EIO), where
                if report is not None and not persistent:
                    # A single failed call in clean-up is tolerated: the tree
                    # is already settled, and what was left is swept next time.
                    if committed:
                        assert tree_of(root, after) == after, where
                    else:
                        assert snapshot(root) == before, where
                second = fstx.recover(root)
                assert second.deferred == (), where
                if committed:
                    check_settled(root, after, False, where)
                else:
                    check_settled(root, before, True, where)
                if fault.count < k2:
                    break  # recovery needed fewer calls: this crash point is done
            else:
                pytest.fail(f"recovery after a crash at call {k} never finished")
        assert failed > 0


# -- crash while a failed commit is being undone -------------------------------


@attrs.define
class FailThenCrash:
    """Fail the k-th mutating call with EIO, then end the process m calls later."""

    k: int
    m: int
    count: int = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase != "before" or name not in _os.MUTATING:
            return
        self.count += 1
        if self.count == self.k:
            raise OSError(errno.EIO, f"injected EIO at {name} #{self.count}")
        if self.count == self.k + self.m:
            os._exit(CRASHED)


def failing_work(workload: Workload, root: str, src: str, durability: str) -> Work:
    def work() -> bytes:
        try:
            with fstx.transaction(root, durability=durability) as tx:
                workload.plan(tx, src)
        except fstx.CommitError:
            return b"rolled back"
        return b"committed"

    return work


@pytest.mark.parametrize(
    "name", ["swap-two-dirs", "write-then-rename", "installer-upgrade", "delete-tree"]
)
@pytest.mark.parametrize("durability", DURABILITY)
def test_crash_while_undoing_a_failed_commit(
    name: str, durability: str, tmp_path: Any
) -> None:
    workload = BY_NAME[name]
    with scratch(tmp_path) as base:
        clean = os.path.join(base, "clean")
        trace = traced_run(
            workload,
            os.path.join(clean, "root"),
            os.path.join(clean, "src"),
            durability,
        )
        start, point, done = (
            trace.committing,
            trace.commit_point,
            trace.commit_done,
        )
        stride = 3 if len(trace) > 40 else 1
        # Faults that fail the commit (a backup link that cannot be made does not).
        faults = sorted(
            k
            for k in {*range(start + 1, done + 1, stride), point, done}
            if not trace.tolerated(k)
        )
        crashed = 0
        for k in faults:
            m = 0
            while True:
                m += 1
                assert m < 1000, "the undo never ended"
                case = os.path.join(base, f"{k}-{m}")
                root, src = os.path.join(case, "root"), os.path.join(case, "src")
                workload.setup(root, src)
                before = snapshot(root)
                after = workload.expected(root, src)
                code, ack = in_child(
                    failing_work(workload, root, src, durability), FailThenCrash(k, m)
                )
                where = f"{name} ({durability}): EIO at call {k} ({trace.name(k)}), crash {m} calls later"
                if code == 0:
                    assert ack == b"rolled back", where
                else:
                    assert (code, ack) == (CRASHED, None), where
                    crashed += 1
                code, _ = recover_forked(root)
                assert code == 0, where
                if k <= point:
                    # The commit record was never written: only the before-tree will do.
                    check_settled(root, before, True, where)
                elif tree_of(root, after) == after:
                    # The record was written but its fsync failed: either whole tree.
                    check_settled(root, after, False, where)
                else:
                    check_settled(root, before, True, where)
                if code == 0 and ack is not None:
                    break
        assert crashed >= len(faults)


# -- crash while rolling back ----------------------------------------------------


def rollback_work(workload: Workload, root: str, src: str, hook: _os.Hook) -> Work:
    def work() -> bytes:
        tx = fstx.transaction(root)
        workload.plan(tx, src)
        _os.set_hook(hook)  # armed for the rollback only
        tx.rollback()
        return b"rolled back"

    return work


@pytest.mark.parametrize("name", ["installer-upgrade", "symlinks-copied-and-deleted"])
def test_crash_during_rollback(name: str, tmp_path: Any) -> None:
    """A process that dies while rolling back leaves the tree as it was; recovery sweeps."""
    workload = BY_NAME[name]
    with scratch(tmp_path) as base:
        for k in range(1, 1000):
            root, src = (
                os.path.join(base, f"{k}", "root"),
                os.path.join(base, f"{k}", "src"),
            )
            workload.setup(root, src)
            before = snapshot(root)
            code, ack = in_child(
                rollback_work(workload, root, src, CrashAt(k, "before")), None
            )
            where = f"{name}: crash before rollback call {k}"
            code2, report = recover_forked(root)
            assert code2 == 0, where
            assert report is not None
            assert (report.rolled_back, report.rolled_forward) == (False, False), where
            check_settled(root, before, True, where)
            if code == 0:
                assert ack == b"rolled back", where
                break  # the rollback needed fewer calls
            assert (code, ack) == (CRASHED, None), where
        else:
            pytest.fail("the rollback never ended")
        assert k > 3


# -- blackbox: SIGKILL at random times -------------------------------------------

_V1 = {"pkg/__init__.py": File(b"v = 1\n"), "pkg/one.py": File(b"only in 1\n", 0o600)}
_V2 = {
    "pkg/__init__.py": File(b"v = 2\n"),
    "pkg/two/deep.py": File(b"only in 2\n", 0o755),
    "pkg/two/more.py": File(b"also 2\n"),
}


def _toggle(tx: fstx.Transaction, src: str, i: int) -> None:
    """Commit i (0-based) turns version 1 into version 2 when even, 2 into 1 when odd."""
    new = 2 if i % 2 == 0 else 1
    old = 3 - new
    tx.delete("site/pkg")
    tx.copy(os.path.join(src, f"v{new}", "pkg"), "site/pkg")
    tx.delete(f"site/pkg-{old}.dist-info")
    tx.write_bytes(f"site/pkg-{new}.dist-info/RECORD", f"pkg {new}\n".encode())
    tx.write_bytes("bin/pkg", f"#!/bin/sh\necho {new}\n".encode(), mode=0o755)


def _initial(root: str) -> None:
    build(os.path.join(root, "site"), _V1)
    build(
        root,
        {
            "site/pkg-1.dist-info/RECORD": b"pkg 1\n",
            "bin/pkg": File(b"#!/bin/sh\necho 1\n", 0o755),
        },
    )


def looping_child(root: str, src: str, durability: str, w: int, i: int) -> None:
    while True:
        with fstx.transaction(root, durability=durability) as tx:
            _toggle(tx, src, i)
        os.write(w, b".")
        i += 1


@pytest.mark.parametrize(("durability", "seed"), [("full", 1), ("none", 2)])
def test_sigkill_at_random_times(durability: str, seed: int, tmp_path: Any) -> None:
    rng = random.Random(seed)
    with scratch(tmp_path) as base:
        src = os.path.join(base, "src")
        build(os.path.join(src, "v1"), _V1)
        build(os.path.join(src, "v2"), _V2)
        states = []
        for version in (1, 2):  # the tree after an even, then an odd number of commits
            ref = os.path.join(base, f"ref{version}")
            _initial(ref)
            for i in range(version - 1):
                with fstx.transaction(ref) as tx:
                    _toggle(tx, src, i)
            states.append(snapshot(ref, inodes=False))
        root = os.path.join(base, "root")
        _initial(root)
        commits = 0
        for kill in range(10):
            r, w = os.pipe()
            pid = fork()
            if pid == 0:  # the child: loops commits until killed
                try:
                    os.close(r)
                    os.write(w, b"R")
                    looping_child(root, src, durability, w, commits)
                except BaseException:
                    traceback.print_exc()
                    sys.stderr.flush()
                os._exit(1)
            os.close(w)
            assert os.read(r, 1) == b"R"
            acked = 0
            if kill % 2:
                # Every other kill waits for one commit first, so that the
                # sweep makes progress however slow the machine is.
                assert os.read(r, 1) == b"."
                acked = 1
            # The random time: nothing is asserted on it.
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            while True:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                acked += chunk.count(b".")
            os.close(r)
            assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
            report = recover_fresh(root) if kill % 3 == 0 else recover_forked(root)[1]
            assert report is not None
            got = snapshot(root, inodes=False)
            where = f"kill {kill}: {commits} + {acked} acknowledged commits"
            # Every acknowledged commit stands; the one in flight is all there or not at all.
            if got == states[(commits + acked) % 2]:
                commits += acked
            else:
                assert got == states[(commits + acked + 1) % 2], where
                commits += acked + 1
            assert_clean(root)
            assert fstx.status(root) == fstx.Status()
            assert fstx.recover(root) == fstx.RecoveryReport()
        assert commits >= 5
