"""Real power cuts: ext4 and xfs loop images shut down mid-commit, then recovered.

A clean run of each workload is traced on a fresh image to learn its
mutating calls. Then, for each sampled crash point (after every fsync,
fsync_dir and syncfs, after the ``committing`` and ``committed`` appends,
before a seeded sample of the other calls, and after ``commit()`` returned),
a fresh image (a sparse copy of a pristine template) is mounted, the
before-tree built and synced, and a forked child runs the workload with
``durability="full"``, stopping itself with SIGSTOP at that point. The
parent cuts the power (``FS_IOC_SHUTDOWN`` with ``FS_GOING_DOWN_NOLOGFLUSH``:
nothing more reaches the disk), SIGKILLs the child, unmounts, mounts again
(ext4 and xfs replay their logs), recovers in a fresh interpreter and checks:

- the tree is exactly the before-tree, same inodes and mtimes (inode numbers
  and mtimes are on disk, so they survive a remount), or exactly the
  after-tree that the model predicts (new files compared by type, mode and
  content; kept and renamed ones by identity too);
- the before-tree whenever the cut came before the first change outside the
  staging directory, the after-tree whenever it came after the ``committed``
  record's fsync, and always when ``commit()`` had returned (acknowledged);
- the staging directory holds nothing but its lock, ``status`` is clean, and
  recovering again changes nothing.

Skips (with the reason) only where loop devices or ``mkfs.<type>`` are
missing, or without root.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import attrs
import pytest

import fstx
from fstx import _os
from mounts import Mounts, mounts, scratch_dir, shutdown, syncfs, why_no_loop
from treeutil import Snapshot, assert_clean, snapshot
from workloads import BY_NAME, Trace, Workload, _force_rmtree, build, tree_of

pytestmark = [pytest.mark.root, pytest.mark.slow]

FSTYPES = ["ext4", "xfs"]
SYNC_CALLS = ("fsync", "fsync_dir", "syncfs")

# Per workload: how many crash points besides the fixed ones (every sync
# call, the two journal states, the acknowledgement). A workload with fewer
# calls than that is swept at every call.
BUDGET: Dict[str, int] = {"replace-one-file": 22, "installer-upgrade": 22}
SEED = 20240611
"""The sample of crash points is the same in every run (and in a failure's message)."""

Point = Tuple[int, str]


@attrs.define
class StopAt:
    """An OS-layer hook that stops the process (SIGSTOP) at the k-th mutating call."""

    k: int
    when: str
    count: int = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name not in _os.MUTATING:
            return
        if phase == "before":
            self.count += 1
        if phase == self.when and self.count == self.k:
            os.kill(os.getpid(), signal.SIGSTOP)


@attrs.define
class Outcome:
    """What happened to the child: stopped at its crash point, or acknowledged."""

    stopped: bool
    acked: bool
    error: str = ""


def run_child(
    work: Callable[[], None], hook: Optional[_os.Hook], cut: Callable[[], None]
) -> Outcome:
    """Fork a child that runs ``work`` under ``hook``; cut the power once it stops or ends.

    The child writes ``A`` to a pipe once ``work`` returned (the
    acknowledgement), ``E`` and a traceback if it raised.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            _os.set_hook(hook)
            work()
            _os.set_hook(None)
            os.write(w, b"A")
        except BaseException:
            os.write(w, b"E" + traceback.format_exc().encode(errors="replace"))
            code = 1
        os._exit(code)
    os.close(w)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED)
        stopped = os.WIFSTOPPED(status)
        try:
            # Power first, then the process: nothing it still has in flight lands.
            cut()
        finally:
            if stopped:  # never leave a stopped child holding the mount
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
        if stopped:
            assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(r)
    data = b"".join(chunks)
    if data.startswith(b"E"):
        return Outcome(stopped, False, data[1:].decode(errors="replace"))
    return Outcome(stopped, data == b"A")


def recover_fresh(root: str) -> None:
    """``fstx.recover(root)`` in a new interpreter (nothing shared with the writer)."""
    done = subprocess.run(
        [sys.executable, "-c", "import fstx, sys; fstx.recover(sys.argv[1])", root],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def committing_call(trace: Trace) -> int:
    """The call (1-based) that appends the ``committing`` record."""
    return next(
        k
        for k, (name, args) in enumerate(trace.calls, start=1)
        if name == "write" and b'"committing"' in bytes(args[1])
    )


@attrs.frozen
class Plan:
    """Where to cut, and what the trace says each cut must leave."""

    n: int
    # The first call after the journal's barrier: a change outside staging.
    first_change: int
    # The fsync that makes the ``committed`` record durable.
    durable: int
    points: Tuple[Point, ...]

    def must_be_before(self, k: int, when: str) -> bool:
        """The cut came before anything outside the staging directory changed."""
        return k < self.first_change or (k == self.first_change and when == "before")

    def must_be_after(self, k: int, when: str) -> bool:
        """The cut came after the commit point became durable."""
        return k > self.durable or (k == self.durable and when == "after")


def plan_points(trace: Trace, budget: int, rng: random.Random) -> Plan:
    """Every sync call (after it), the journal states, the acknowledgement, plus a sample."""
    n = len(trace)
    committing = committing_call(trace)
    first_change = next(
        k for k in range(committing + 1, n + 1) if trace.name(k) not in SYNC_CALLS
    )
    fixed = {(k, "after") for k in range(1, n + 1) if trace.name(k) in SYNC_CALLS}
    fixed |= {(committing, "after"), (trace.commit_point, "after"), (n + 1, "before")}
    others = [(k, "before") for k in range(1, n + 1) if (k, "before") not in fixed]
    sample = others if len(others) <= budget else rng.sample(others, budget)
    points = tuple(sorted(fixed | set(sample)))
    return Plan(n, first_change, trace.commit_done, points)


def tx_work(workload: Workload, root: str, src: str) -> Callable[[], None]:
    def work() -> None:
        with fstx.transaction(root, durability="full") as tx:
            workload.plan(tx, src)

    return work


@attrs.define
class Image:
    """A fresh file system from the template, mounted at ``mnt``, holding the before-tree."""

    mounts: Mounts
    fstype: str
    image: str
    mnt: str

    @property
    def root(self) -> str:
        return os.path.join(self.mnt, "root")

    def cut(self) -> None:
        """Cut the power: nothing more reaches this file system's disk."""
        shutdown(self.mnt)

    def remount(self) -> None:
        self.mounts.unmount(self.mnt)
        self.mounts.loop(self.image, self.mnt, self.fstype)

    def discard(self) -> None:
        self.mounts.unmount(self.mnt)
        os.unlink(self.image)


def fresh(made: Mounts, fstype: str, workload: Workload) -> Image:
    image = made.fresh_image(fstype)
    mnt = made.loop(image, made.point(fstype), fstype)
    img = Image(made, fstype, image, mnt)
    build(img.root, workload.before)
    syncfs(mnt)  # the before-tree is durable: a cut can only lose the transaction
    return img


@pytest.mark.parametrize("name", list(BUDGET))
@pytest.mark.parametrize("fstype", FSTYPES)
def test_power_cut_at_sampled_points(fstype: str, name: str) -> None:
    reason = why_no_loop(fstype)
    if reason is not None:
        pytest.skip(reason)
    workload = BY_NAME[name]
    rng = random.Random(f"{SEED}-{fstype}-{name}")
    base = scratch_dir("fstx-powercut-")
    try:
        src = os.path.join(base, "src")
        build(src, workload.source)
        with mounts(base) as made:
            clean = fresh(made, fstype, workload)
            trace = Trace()
            with _traced(trace):
                tx_work(workload, clean.root, src)()
            clean.discard()
            plan = plan_points(trace, BUDGET[name], rng)
            tally = sweep(made, fstype, workload, src, plan)
        print(f"\n{fstype} {name}: {tally}")  # the numbers for docs/testing.md
        assert tally["cuts"] == len(plan.points)
        assert tally["before"] > 0
        assert tally["after"] > 0
    finally:
        _force_rmtree(base)


class _traced:  # noqa: N801 - reads as a statement: with _traced(trace): ...
    """Record a run's mutating calls into ``trace``."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def __enter__(self) -> None:
        _os.set_hook(self.trace)

    def __exit__(self, *exc: object) -> None:
        _os.set_hook(None)


def sweep(
    made: Mounts, fstype: str, workload: Workload, src: str, plan: Plan
) -> Dict[str, int]:
    """Cut the power at every planned point; check each recovered tree."""
    tally = {"cuts": 0, "before": 0, "after": 0, "acked": 0}
    for k, when in plan.points:
        img = fresh(made, fstype, workload)
        before = snapshot(img.root)
        after = workload.expected(img.root, src)
        where = f"{fstype} {workload.name}: power cut {when} call {k}/{plan.n} (seed {SEED})"
        outcome = run_child(tx_work(workload, img.root, src), StopAt(k, when), img.cut)
        assert outcome.error == "", f"{where}: {outcome.error}"
        # The run is deterministic: it stops at every planned call, and only
        # the run past the last call ends (acknowledged).
        assert outcome.stopped == (k <= plan.n), where
        assert outcome.acked == (k > plan.n), where
        img.remount()
        recover_fresh(img.root)
        state = check_recovered(img.root, before, after, where)
        if plan.must_be_before(k, when):
            assert state == "before", f"{where}: nothing outside staging had changed"
        if plan.must_be_after(k, when) or outcome.acked:
            assert state == "after", f"{where}: the commit point was durable"
        tally["cuts"] += 1
        tally[state] += 1
        tally["acked"] += outcome.acked
        img.discard()
    return tally


def check_recovered(root: str, before: Snapshot, after: Snapshot, where: str) -> str:
    """``"before"`` or ``"after"``: the recovered tree is exactly one of them, staging clean."""
    got = snapshot(root)
    if got == before:
        state = "before"
    else:
        assert tree_of(root, after) == after, (
            f"{where}: neither before nor after:\n{_diff(got, before, after)}"
        )
        state = "after"
    assert_clean(root)
    assert fstx.status(root) == fstx.Status(), where
    assert fstx.recover(root) == fstx.RecoveryReport(), where
    assert snapshot(root) == got, where
    return state


def _diff(got: Snapshot, before: Snapshot, after: Snapshot) -> str:
    lines: List[str] = []
    for name, ref in (("before", before), ("after", after)):
        keys = sorted(set(got) | set(ref))
        bad = [
            k
            for k in keys
            if got.get(k, None) != ref.get(k, None)
            and not _same_new(got.get(k), ref.get(k))
        ]
        lines.append(
            f"  vs {name}: "
            + ", ".join(f"{k}: {got.get(k)!r} != {ref.get(k)!r}" for k in bad[:6])
        )
    return "\n".join(lines)


def _same_new(got: Optional[Tuple[Any, ...]], want: Optional[Tuple[Any, ...]]) -> bool:
    return got is not None and want is not None and len(want) == 3 and got[:3] == want
