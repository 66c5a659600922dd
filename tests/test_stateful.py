"""A model-based test: random plans, commits, faults and crashes against a pure model.

Hypothesis drives a real root and a :class:`workloads.TreeModel` side by side:
planning operations (write, copy from a tree outside the root or from inside
it, rename, delete, mkdir, chmod) must be refused with ``PlanError`` exactly
where the model refuses them; a commit must turn the tree into the planned
model, a rollback must leave it alone; a commit that meets an injected fault
must leave the tree exactly as it was (or, once the commit record is written,
exactly as planned); a commit run in a forked child that dies at call k must
be recovered to one of the two. Half the runs happen where hard links fail,
so that replaced files are moved out of the way instead (the Windows path).
After every step the real tree equals the model, file identities included,
and with no transaction open the staging directory holds nothing but its
lock file.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from typing import Any, Callable, Optional, Tuple

import attrs
import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import fstx
from fstx import _journal, _os
from strategies import (
    SOURCE,
    any_paths,
    chmod_modes,
    dir_modes,
    fault_errnos,
    file_data,
    file_modes,
    initial_trees,
    source_names,
)
from treeutil import Snapshot, installed, snapshot, staging_leftovers
from workloads import (
    Chmod,
    Copy,
    Delete,
    Mkdir,
    ModelPlanError,
    NoHardLinks,
    Op,
    Rename,
    TreeModel,
    Write,
    build,
    fast_base,
    fork,
    tree_of,
    wrapped,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(os, "fork"), reason="POSIX names and a forking crash harness"
    ),
]

CRASHED = 137
COMMITTED = _journal.encode([_journal.State(_journal.COMMITTED)])


def _is_commit_record(name: str, args: Tuple[Any, ...]) -> bool:
    return name == "write" and bytes(args[1]) == COMMITTED


@attrs.define
class FaultAt:
    """Fail the k-th mutating call (and every later one if persistent); note the commit point."""

    k: int
    err: int
    persistent: bool
    count: int = 0
    committed: bool = False

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name not in _os.MUTATING:
            return
        if phase == "before":
            self.count += 1
            if self.count == self.k or (self.persistent and self.count > self.k):
                raise OSError(self.err, f"{os.strerror(self.err)} (injected at {name})")
        elif _is_commit_record(name, args):
            self.committed = True


@attrs.define
class CrashAt:
    """End the process at the k-th mutating call; tell the parent when the commit record is written."""

    k: int
    when: str
    pipe: int
    count: int = 0

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name not in _os.MUTATING:
            return
        if phase == "before":
            self.count += 1
        elif _is_commit_record(name, args):
            os.write(self.pipe, b"C")
        if phase == self.when and self.count == self.k:
            os._exit(CRASHED)


def abandon(tx: fstx.Transaction) -> None:
    """Let go of a transaction as a dead process would: close its handles, touch nothing."""
    tx._spent = True
    tx._journal.close()
    tx._fs.close()
    tx._lock.release()


class FstxMachine(RuleBasedStateMachine):
    """A root, the model of what it holds, and at most one open transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.base = tempfile.mkdtemp(prefix="fstx-stateful-", dir=fast_base())
        self.root = os.path.join(self.base, "root")
        self.src = os.path.join(self.base, "src")
        os.mkdir(self.root)
        build(self.src, SOURCE)
        self.model = TreeModel.of(self.root)
        self.planned = self.model
        self.tx: Optional[fstx.Transaction] = None
        self.links = True
        self.planned_ops = 0
        self.attempts = 0
        self.length = 0

    @initialize(tree=initial_trees(), links=st.booleans())
    def start(self, tree: Any, links: bool) -> None:
        build(self.root, tree)
        self.model = TreeModel.of(self.root)
        # Without hard links, replaced files are moved out of the way (the
        # path Windows takes); every hook below keeps that in force.
        self.links = links
        _os.set_hook(None if links else NoHardLinks())

    def teardown(self) -> None:
        _os.set_hook(None)
        if self.tx is not None and not self.tx.spent:
            self.tx.rollback()
        shutil.rmtree(self.base)

    # -- helpers ---------------------------------------------------------------

    def settle(self, want: TreeModel) -> None:
        """The tree is ``want``; new files' identities are learnt from it."""
        assert tree_of(self.root, want.entries) == want.entries
        want.adopt(snapshot(self.root))
        self.model = want

    def plan(self, op: Op) -> None:
        """Plan ``op``; fstx refuses it exactly when the model does."""
        assert self.tx is not None
        self.attempts += 1
        want = self.planned.clone()
        try:
            op.on_model(want, self.src)
        except ModelPlanError as refusal:
            note(f"refused, as the model says: {refusal}")
            with pytest.raises(fstx.PlanError):
                op.on_tx(self.tx, self.src)
            return
        op.on_tx(self.tx, self.src)
        self.planned = want
        self.planned_ops += 1

    def is_open(self) -> bool:
        return self.tx is not None

    # -- planning --------------------------------------------------------------

    def pick(self, data: st.DataObject, *, existing: bool = True) -> str:
        """A path the planned tree holds (mostly, if ``existing``), else any drawn path."""
        known = sorted(self.planned.entries)
        if not known:
            path: str = data.draw(any_paths())
            return path
        held = st.sampled_from(known)
        fresh = any_paths()
        choices = (held, held, held, fresh) if existing else (fresh, fresh, held)
        path = data.draw(st.one_of(*choices))
        return path

    def ready(self) -> bool:
        """A transaction is open and has planned the length drawn for it.

        Refused operations count a little, so that a run of refusals ends too.
        """
        return self.tx is not None and (
            self.planned_ops >= self.length or self.attempts >= 3 * self.length
        )

    @precondition(lambda self: self.tx is None)
    @rule(durability=st.sampled_from(["none", "full"]), length=st.integers(1, 8))
    def begin(self, durability: str, length: int) -> None:
        self.tx = fstx.transaction(self.root, durability=durability)
        self.planned = self.model.clone()
        self.planned_ops = 0
        self.attempts = 0
        self.length = length

    @precondition(is_open)
    @rule(
        data=st.data(),
        content=file_data(),
        mode=file_modes(),
        how=st.sampled_from(["bytes", "text", "open"]),
    )
    def write(
        self, data: st.DataObject, content: bytes, mode: Optional[int], how: str
    ) -> None:
        if how == "text":
            content = content.hex().encode()
        self.plan(Write(self.pick(data, existing=False), content, mode, how))

    @precondition(is_open)
    @rule(data=st.data(), src=source_names(), follow=st.booleans())
    def copy_from_outside(self, data: st.DataObject, src: str, follow: bool) -> None:
        self.plan(
            Copy(src, self.pick(data, existing=False), outside=True, follow=follow)
        )

    @precondition(is_open)
    @rule(data=st.data())
    def copy_inside(self, data: st.DataObject) -> None:
        self.plan(Copy(self.pick(data), self.pick(data, existing=False), outside=False))

    @precondition(is_open)
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        self.plan(Rename(self.pick(data), self.pick(data, existing=False)))

    @precondition(is_open)
    @rule(data=st.data(), missing_ok=st.booleans())
    def delete(self, data: st.DataObject, missing_ok: bool) -> None:
        self.plan(Delete(self.pick(data), missing_ok))

    @precondition(is_open)
    @rule(data=st.data(), mode=dir_modes())
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        self.plan(Mkdir(self.pick(data, existing=False), mode))

    @precondition(is_open)
    @rule(data=st.data(), mode=chmod_modes())
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.pick(data)
        try:
            entry = self.planned.get(self.planned.resolve(path))
        except ModelPlanError:
            entry = None
        if entry is not None and entry[0] == "dir":
            mode |= 0o700  # the owner must still be able to enter it
        self.plan(Chmod(path, mode))

    # -- finishing -------------------------------------------------------------

    @precondition(ready)
    @rule()
    def commit(self) -> None:
        tx, self.tx = self.tx, None
        assert tx is not None
        report = tx.commit()
        assert report.operations == self.planned_ops
        assert report.deferred == ()
        self.settle(self.planned)

    @precondition(ready)
    @rule()
    def rollback(self) -> None:
        tx, self.tx = self.tx, None
        assert tx is not None
        tx.rollback()

    @precondition(ready)
    @rule(k=st.integers(1, 24), err=fault_errnos(), persistent=st.booleans())
    def commit_with_fault(self, k: int, err: int, persistent: bool) -> None:
        tx, self.tx = self.tx, None
        assert tx is not None
        fault = FaultAt(k, err, persistent)
        report: Optional[fstx.CommitReport] = None
        error: Optional[fstx.FstxError] = None
        with installed(wrapped(fault, self.links)):
            try:
                report = tx.commit()
            except (fstx.CommitError, fstx.RollbackError) as exc:
                error = exc
        note(f"{fault}: {report or repr(error)}")
        if report is not None:
            # Only a fault after the commit record (in clean-up) lets it through,
            # or one the engine works around (a backup link it cannot make).
            assert fault.committed or fault.count < k or not persistent
            self.settle(self.planned)
            if staging_leftovers(self.root):
                assert report.deferred or persistent
                fstx.recover(self.root)
            return
        if isinstance(error, fstx.RollbackError):
            assert persistent
            assert fstx.status(self.root).pending
            fstx.recover(self.root)
            self.settle(self.planned if fault.committed else self.model)
            return
        assert isinstance(error, fstx.CommitError)
        self.settle(self.model)
        if persistent:
            fstx.recover(self.root)  # the fault kept clean-up from removing staging

    @precondition(ready)
    @rule(k=st.integers(1, 24), when=st.sampled_from(["before", "after"]))
    def crash_and_recover(self, k: int, when: str) -> None:
        tx, self.tx = self.tx, None
        assert tx is not None
        r, w = os.pipe()
        pid = fork()
        if pid == 0:  # the child commits and dies at call k: never returns
            code = 0
            try:
                os.close(r)
                _os.set_hook(wrapped(CrashAt(k, when, w), self.links))
                tx.commit()
                _os.set_hook(None)
                os.write(w, b"A")
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                code = 1
            os._exit(code)
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        abandon(tx)  # the parent's handles on the dead transaction
        acked, committed = b"A" in data, b"C" in data
        note(f"crash {when} call {k}: acked={acked}, commit record written={committed}")
        assert os.waitstatus_to_exitcode(status) == (0 if acked else CRASHED)
        assert committed or not acked
        fstx.recover(self.root)
        self.settle(self.planned if committed else self.model)

    @precondition(ready)
    @rule()
    def die_while_planning(self) -> None:
        tx, self.tx = self.tx, None
        assert tx is not None
        abandon(tx)
        report = fstx.recover(self.root)
        assert (report.rolled_back, report.rolled_forward) == (False, False)

    # -- invariants --------------------------------------------------------------

    @invariant()
    def tree_matches_model(self) -> None:
        # Planning never changes the tree: it is the committed model throughout.
        want: Snapshot = self.model.entries
        assert tree_of(self.root, want) == want

    @invariant()
    def staging_is_clean_when_idle(self) -> None:
        if self.tx is None:
            assert staging_leftovers(self.root) == []
            assert fstx.status(self.root) == fstx.Status()
            assert fstx.recover(self.root) == fstx.RecoveryReport()


# Hypothesis leaves this function unannotated; the alias gives it a signature.
_run_machine: Callable[..., None] = run_state_machine_as_test


def test_stateful_model() -> None:
    _run_machine(
        FstxMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
