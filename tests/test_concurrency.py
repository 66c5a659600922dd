"""One transaction per root at a time, across threads and processes.

Real processes started behind a barrier append to one shared file by
read-then-write inside a transaction: the lock must serialise them, so the
final file holds every token exactly once (some serial order, nothing lost).
A holder killed with SIGKILL releases its ``flock``; the next transaction, or
several ``fstx.recover`` calls racing each other, finish its journal exactly
once, leaving the tree exactly before or exactly after.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import IO, TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import pytest

import fstx
from treeutil import Snapshot, assert_clean, make_tree, snapshot

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="SIGKILL and flock semantics are POSIX"
)

WAIT = 120.0  # seconds before a child is declared hung (a failure, not a timing)

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import fstx
    from fstx import _os

    mode, root = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]

    def say(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    def wait_go():
        say("ready")
        return sys.stdin.readline().strip()

    def pause(where):
        say("paused " + where)
        os.read(0, 1)  # blocks until the parent kills us
        os._exit(3)

    if mode == "append":
        ident, count, durability = args[0], int(args[1]), args[2]
        wait_go()
        for k in range(count):
            with fstx.transaction(root, durability=durability) as tx:
                with open(os.path.join(root, "shared"), "rb") as f:
                    data = f.read()
                time.sleep(0.001)  # widen the read-modify-write window
                tx.write_bytes("shared", data + f"{ident}-{k}\\n".encode())
                tx.write_bytes(f"own/{ident}", str(k).encode())
        say("done")

    elif mode == "hold":
        tx = fstx.transaction(root)
        tx.write_bytes("held", b"by the holder")
        say("held")
        if sys.stdin.readline().strip() == "commit":
            tx.commit()
        else:
            tx.rollback()
        say("released")

    elif mode == "crash":
        where = args[0]
        tx = fstx.transaction(root, durability="full")
        tx.write_bytes("a/old", b"replaced")
        if where == "planning":
            pause(where)
        tx.write_bytes("a/new", b"new")
        tx.delete("gone")
        tx.rename("mv", "a/mv")
        tx.chmod("a/keep", 0o600)
        state = {"journaled": False, "committed": False, "applied": 0}

        def hook(name, phase, call_args):
            if name == "write" and phase == "after":
                data = bytes(call_args[1])
                if b'"committing"' in data:
                    state["journaled"] = True
                    if where == "journaled":
                        pause(where)
                if b'"committed"' in data:
                    state["committed"] = True
                    if where == "committed":
                        pause(where)
            if (phase == "after" and state["journaled"] and not state["committed"]
                    and name in ("rename", "rename_noreplace")):
                state["applied"] += 1
                if where == "mid-apply" and state["applied"] == 2:
                    pause(where)
            if (phase == "before" and state["committed"] and where == "cleanup"
                    and name in ("unlink", "rmdir")):
                pause(where)

        _os.set_hook(hook)
        tx.commit()
        say("not paused")

    elif mode == "recover":
        wait_go()
        report = fstx.recover(root)
        say(json.dumps({"rolled_back": report.rolled_back,
                        "rolled_forward": report.rolled_forward}))
    """
)


def spawn(mode: str, root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(root), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def line(proc: subprocess.Popen[str]) -> str:
    """The child's next line (its stderr on an early exit)."""
    out: IO[str] = proc.stdout  # type: ignore[assignment]
    text = out.readline()
    if not text:
        proc.wait(WAIT)
        err = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"child exited with {proc.returncode} without a word: {err}")
    return text.strip()


def tell(proc: subprocess.Popen[str], text: str) -> None:
    stdin: IO[str] = proc.stdin  # type: ignore[assignment]
    stdin.write(text + "\n")
    stdin.flush()


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    return out


def start_together(procs: Sequence[subprocess.Popen[str]]) -> None:
    """A barrier: every child is ready before any is told to go."""
    for proc in procs:
        assert line(proc) == "ready"
    for proc in procs:
        tell(proc, "go")


@pytest.fixture
def children() -> Any:
    """Every child a test starts; any still running at the end is killed."""
    started: List[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def tokens(content: bytes) -> List[str]:
    return content.decode().splitlines()


def check_serial(content: bytes, idents: Sequence[str], count: int) -> None:
    """Every token exactly once, and each writer's tokens in its own order."""
    got = tokens(content)
    assert sorted(got) == sorted(f"{i}-{k}" for i in idents for k in range(count))
    for ident in idents:
        mine = [t for t in got if t.split("-")[0] == ident]
        assert mine == [f"{ident}-{k}" for k in range(count)]


# --- serialisation -----------------------------------------------------------------

COUNT = 8


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_processes_on_one_root_take_turns(
    root: Path, children: List[subprocess.Popen[str]], processes: int
) -> None:
    (root / "shared").write_bytes(b"")
    idents = [f"p{n}" for n in range(processes)]
    children.extend(spawn("append", root, i, str(COUNT), "none") for i in idents)
    start_together(children)
    for proc in children:
        assert finish(proc) == "done\n"
    check_serial((root / "shared").read_bytes(), idents, COUNT)
    tree = snapshot(root, inodes=False)
    assert sorted(tree) == ["own", *(f"own/{i}" for i in idents), "shared"]
    assert all(tree[f"own/{i}"][2] == str(COUNT - 1).encode() for i in idents)
    assert_clean(root)
    assert fstx.status(root).clean


def test_processes_on_disjoint_roots_run_side_by_side(
    tmp_path: Path, children: List[subprocess.Popen[str]]
) -> None:
    roots = [tmp_path / f"root{n}" for n in range(3)]
    for r in roots:
        r.mkdir()
        (r / "shared").write_bytes(b"")
    children.extend(spawn("append", r, "p0", str(COUNT), "full") for r in roots)
    start_together(children)
    for proc in children:
        assert finish(proc) == "done\n"
    for r in roots:
        check_serial((r / "shared").read_bytes(), ["p0"], COUNT)
        assert sorted(snapshot(r)) == ["own", "own/p0", "shared"]
        assert_clean(r)


def test_threads_in_one_process_take_turns(root: Path) -> None:
    (root / "shared").write_bytes(b"")
    idents = [f"t{n}" for n in range(4)]
    errors: List[BaseException] = []
    barrier = threading.Barrier(len(idents))

    def work(ident: str) -> None:
        try:
            barrier.wait(WAIT)
            for k in range(COUNT):
                with fstx.transaction(root, durability="none") as tx:
                    data = (root / "shared").read_bytes()
                    threading.Event().wait(0.001)  # widen the window
                    tx.write_bytes("shared", data + f"{ident}-{k}\n".encode())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in idents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    check_serial((root / "shared").read_bytes(), idents, COUNT)
    assert sorted(snapshot(root)) == ["shared"]
    assert_clean(root)


# --- waiting for the lock -----------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, 0.2])
def test_lock_timeout_while_another_process_holds_the_root(
    root: Path, children: List[subprocess.Popen[str]], timeout: float
) -> None:
    make_tree(root, {"keep": b"keep"})
    holder = spawn("hold", root)
    children.append(holder)
    assert line(holder) == "held"
    before = snapshot(root)
    with pytest.raises(fstx.LockTimeout) as info:
        fstx.transaction(root, lock_timeout=timeout)
    assert isinstance(info.value, TimeoutError)
    assert repr(str(root)) in str(info.value)
    # A live holder's journal is not "pending", and nothing changed.
    assert fstx.status(root).pending is False
    assert snapshot(root) == before
    tell(holder, "commit")
    assert finish(holder) == "released\n"
    with fstx.transaction(root, lock_timeout=0) as tx:
        tx.write_bytes("mine", b"after the holder")
    tree = snapshot(root, inodes=False)
    assert {k: v[2] for k, v in tree.items()} == {
        "keep": b"keep",
        "held": b"by the holder",
        "mine": b"after the holder",
    }
    assert_clean(root)


def test_rolled_back_holder_leaves_nothing_for_the_waiter(
    root: Path, children: List[subprocess.Popen[str]]
) -> None:
    make_tree(root, {"keep": b"keep"})
    before = snapshot(root)
    holder = spawn("hold", root)
    children.append(holder)
    assert line(holder) == "held"
    with pytest.raises(fstx.LockTimeout):
        fstx.transaction(root, lock_timeout=0)
    tell(holder, "rollback")
    assert finish(holder) == "released\n"
    assert snapshot(root) == before
    assert_clean(root)


class _Releaser(logging.Handler):
    """Tells the holder to commit once the waiter says it is waiting."""

    def __init__(self, holder: subprocess.Popen[str]) -> None:
        super().__init__(logging.INFO)
        self.holder = holder
        self.told = False

    def emit(self, record: logging.LogRecord) -> None:
        if (
            not self.told
            and "waiting for another fstx transaction" in record.getMessage()
        ):
            self.told = True
            tell(self.holder, "commit")


def test_no_timeout_waits_for_the_holder_and_logs_at_info(
    root: Path,
    children: List[subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder = spawn("hold", root)
    children.append(holder)
    assert line(holder) == "held"
    releaser = _Releaser(holder)
    logger = logging.getLogger("fstx")
    logger.addHandler(releaser)
    caplog.set_level(logging.INFO, logger="fstx")
    try:
        with fstx.transaction(root, lock_timeout=None) as tx:
            # The holder committed before we got the lock: we see its file.
            assert (root / "held").read_bytes() == b"by the holder"
            tx.write_bytes("mine", (root / "held").read_bytes() + b" then me")
    finally:
        logger.removeHandler(releaser)
    assert releaser.told
    assert finish(holder) == "released\n"
    waits = [
        r
        for r in caplog.records
        if r.name == "fstx" and "waiting for another fstx transaction" in r.getMessage()
    ]
    assert waits
    assert all(r.levelno == logging.INFO for r in waits)
    assert str(root) in waits[0].getMessage()
    tree = snapshot(root, inodes=False)
    assert {k: v[2] for k, v in tree.items()} == {
        "held": b"by the holder",
        "mine": b"by the holder then me",
    }
    assert_clean(root)


# --- a holder killed with SIGKILL ---------------------------------------------------


def crash_tree(root: Path) -> Snapshot:
    make_tree(root, {"a/old": b"old", "a/keep": b"keep", "gone": b"gone", "mv": b"mv"})
    os.chmod(root / "a" / "keep", 0o644)
    return snapshot(root)


def after_state(pre: Snapshot) -> Dict[str, Any]:
    """The crash workload's after-tree, in ``(type, mode, data)`` form."""
    out = {k: v[:3] for k, v in pre.items()}
    del out["gone"], out["mv"]
    out["a/old"] = ("file", pre["a/old"][1], b"replaced")
    out["a/new"] = ("file", 0o666 & ~_umask(), b"new")
    out["a/mv"] = pre["mv"][:3]
    out["a/keep"] = ("file", 0o600, b"keep")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def crash_at(root: Path, where: str) -> None:
    """Run the crash workload in a child, stop it at ``where`` and SIGKILL it."""
    proc = spawn("crash", root, where)
    try:
        assert line(proc) == f"paused {where}"
        # It holds the lock right now.
        with pytest.raises(fstx.LockTimeout):
            fstx.transaction(root, lock_timeout=0)
        assert fstx.status(root).pending is False  # a live holder is not pending
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WAIT)
    assert proc.returncode == -signal.SIGKILL


def check_outcome(root: Path, pre: Snapshot, outcome: str) -> None:
    if outcome == "pre":
        assert snapshot(root) == pre
    else:
        got = {k: v[:3] for k, v in snapshot(root).items()}
        assert got == after_state(pre)
        # Renamed and chmodded files are the very same files.
        now = snapshot(root)
        assert now["a/mv"][3] == pre["mv"][3]
        assert now["a/keep"][3] == pre["a/keep"][3]


CRASH_POINTS = [
    pytest.param("planning", "pre", id="planning"),
    pytest.param("journaled", "pre", id="journaled"),
    pytest.param("mid-apply", "pre", id="mid-apply"),
    pytest.param("committed", "post", id="committed"),
    pytest.param("cleanup", "post", id="cleanup"),
]


@pytest.mark.parametrize(("where", "outcome"), CRASH_POINTS)
def test_killed_holder_releases_the_lock_and_next_transaction_recovers(
    root: Path, where: str, outcome: str
) -> None:
    pre = crash_tree(root)
    crash_at(root, where)
    assert fstx.status(root).pending is True
    with fstx.transaction(root, lock_timeout=WAIT) as tx:
        # Opening recovered first: the tree is exactly before or after.
        check_outcome(root, pre, outcome)
        tx.write_bytes("next", b"next")
    assert (root / "next").read_bytes() == b"next"
    (root / "next").unlink()
    check_outcome(root, pre, outcome)
    assert_clean(root)
    assert fstx.status(root).clean


@pytest.mark.parametrize(
    ("where", "outcome", "flag"),
    [
        pytest.param("planning", "pre", None, id="planning"),
        pytest.param("mid-apply", "pre", "rolled_back", id="mid-apply"),
        pytest.param("committed", "post", "rolled_forward", id="committed"),
        pytest.param("cleanup", "post", "rolled_forward", id="cleanup"),
    ],
)
def test_recover_from_several_processes_at_once(
    root: Path,
    children: List[subprocess.Popen[str]],
    where: str,
    outcome: str,
    flag: Optional[str],
) -> None:
    pre = crash_tree(root)
    crash_at(root, where)
    children.extend(spawn("recover", root) for _ in range(4))
    start_together(children)
    reports = [json.loads(finish(proc)) for proc in children]
    if flag is None:
        assert not any(r["rolled_back"] or r["rolled_forward"] for r in reports)
    else:
        other = "rolled_forward" if flag == "rolled_back" else "rolled_back"
        assert sum(r[flag] for r in reports) == 1, reports
        assert not any(r[other] for r in reports)
    check_outcome(root, pre, outcome)
    assert_clean(root)
    assert fstx.status(root).clean
    assert fstx.recover(root) == fstx.RecoveryReport()
