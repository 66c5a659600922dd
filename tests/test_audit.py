"""Syscall audit: the commit protocol as the kernel sees it, checked under strace.

Each reference workload runs in a fresh interpreter under
``strace -f -tt -y -xx`` (every string and every descriptor's path in hex,
so any name parses back exactly). The trace between two marker calls is
turned into events (creates, writes, renames, fsyncs...) and checked:

(a) every rename of a staged item into place comes after a barrier that
    covers everything written into that item (its data, its mode, the
    entries of a staged tree): an fsync of it after its last change, or a
    ``syncfs`` of its file system;
(b) the directories (and chmodded items) that the commit changed are made
    durable before the ``committed`` record is written, and that record is
    durable before ``commit()`` returns;
(c) the journal is durable (the file after its ``committing`` record, and
    its directory entry) before the first change outside the staging
    directory;
(d) nothing outside the root is created, written, renamed, linked, chmodded
    or deleted;
(e) ``durability="none"`` makes no fsync, fdatasync, syncfs or sync at all;
(f) before a journal is removed, every change that an undo made outside the
    staging directory is durable (rollback after a failed commit, recovery
    after a crash).

Three variants run: ``full`` (Linux: one ``syncfs`` per staging device),
``full-fsync`` (``syncfs`` unavailable, as on macOS and the BSDs: an fsync
per file and directory) and ``none``. The fsync and syncfs counts of each
run are printed (``-s``) for docs/testing.md. The checker is itself tested:
traces with a barrier removed, or a stray change added, must fail it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import attrs
import pytest

import fstx
from fstx import _os
from mounts import Mounts, why_no_mounts
from stracetools import split_args, string_arg, unescape
from treeutil import Snapshot, assert_clean, installed, snapshot
from workloads import (
    BY_NAME,
    WORKLOADS,
    Delete,
    File,
    Rename,
    Spec,
    Workload,
    Write,
    build,
    tree_of,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="strace is Linux only"
    ),
]

TESTS = os.path.dirname(os.path.abspath(__file__))
STAGING = ".fstx"
SYNCS = ("fsync", "fdatasync", "syncfs", "sync")
VARIANTS = ("full", "full-fsync", "none")

# Every call that can change a name, data or metadata, plus the syncs and
# close (descriptor bookkeeping). "?" lets strace skip calls that this
# architecture does not have (aarch64 has no open, rename, link...).
TRACED = (
    "openat,?open,?creat,?rename,renameat,?renameat2,?link,linkat,?symlink,"
    "symlinkat,?unlink,unlinkat,?mkdir,mkdirat,?rmdir,fsync,fdatasync,syncfs,"
    "sync,write,pwrite64,writev,copy_file_range,?sendfile,ftruncate,ioctl,fchmod,"
    "fchmodat,?fchmodat2,utimensat,close"
)


# -- the cross-device workload ---------------------------------------------------

CROSS = Workload(
    name="cross-device",
    before={
        "root-file.txt": File(b"moves onto the mount\n", 0o640),
        "tree/a.txt": b"tree a\n",
        "tree/sub/b.txt": b"tree b\n",
        "keep.txt": b"kept\n",
    },
    source={},
    ops=(
        Write("mnt/new.txt", b"written on the mount\n"),
        Rename("root-file.txt", "mnt/moved.txt"),
        Rename("tree", "mnt/tree"),
        Rename("mnt/m.txt", "back.txt"),
        Delete("mnt/gone.txt"),
        Write("keep.txt", b"replaced on the root's device\n"),
    ),
)
MOUNT_TREE: Spec = {"m.txt": File(b"on the mount\n", 0o600), "gone.txt": b"deleted\n"}

# A directory whose entries change, then moves: its new name must be synced
# (and an undo changes them where the directory was before it moved in).
MOVED_PARENT = Workload(
    name="change-then-move-parent",
    before={
        "A/old.txt": b"old\n",
        "A/sub/y.txt": b"y\n",
        "C/keep": b"kept\n",
        "X/z": b"z\n",
    },
    source={},
    ops=(
        Rename("X", "D"),
        Write("D/x.txt", b"new in D\n"),
        Delete("D/z"),
        Write("A/x.txt", b"new in A\n"),
        Delete("A/old.txt"),
        Rename("A/sub/y.txt", "C/y.txt"),
        Rename("A", "B"),
        Write("C/keep", b"last\n"),
    ),
)

AUDITED: Dict[str, Workload] = {
    **BY_NAME,
    CROSS.name: CROSS,
    MOVED_PARENT.name: MOVED_PARENT,
}


# -- the traced program ------------------------------------------------------------

# Runs in a fresh interpreter under strace. argv: tests dir, mode, workload,
# root, source dir, variant. Markers are failed opens of "/fstx-audit-*".
SCRIPT = r"""
import errno, os, sys
sys.path.insert(0, sys.argv[1])
import fstx
from fstx import _os
from test_audit import AUDITED, FailRename
mode, name, root, src, variant, at = sys.argv[2:8]
def mark(what):
    try:
        os.open("/fstx-audit-" + what, os.O_RDONLY)
    except FileNotFoundError:
        pass
if variant == "full-fsync":
    _os.syncfs = lambda d: False
durability = "none" if variant == "none" else "full"
mark("begin")
if mode == "recover":
    fstx.recover(root)
elif mode == "abort":
    _os.set_hook(FailRename(int(at)))
    try:
        with fstx.transaction(root, durability=durability) as tx:
            AUDITED[name].plan(tx, src)
    except fstx.CommitError:
        mark("aborted")
else:
    with fstx.transaction(root, durability=durability) as tx:
        AUDITED[name].plan(tx, src)
    mark("acked")
mark("end")
"""


@attrs.define
class FailRename:
    """An OS hook: EIO from the n-th rename after the ``committing`` record."""

    n: int
    renames: int = 0
    committing: bool = False

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase != "before":
            return
        if name == "write" and b'"committing"' in bytes(args[1]):
            self.committing = True
        if self.committing and name in ("rename", "rename_noreplace"):
            self.renames += 1
            if self.renames == self.n:
                raise OSError(errno.EIO, "injected by the audit")


def renames_of(workload: Workload, where: Setup, made: Mounts) -> int:
    """How many renames a clean commit of ``workload`` makes after its ``committing`` record.

    Counted on a second root prepared like the first (mounts included), so
    that the audited run can fail at its very last rename.
    """
    counter = FailRename(10**6)
    twin = Setup(where.root + "-count", where.src + "-count", where.log)
    prepare(workload, twin, made)
    with installed(counter), fstx.transaction(twin.root) as tx:
        workload.plan(tx, twin.src)
    return counter.renames


@attrs.define
class CrashRename:
    """An OS hook ending the process at the n-th rename after the ``committing`` record."""

    inner: FailRename

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        try:
            self.inner(name, phase, args)
        except OSError:
            os._exit(137)


# -- parsing strace output ---------------------------------------------------------

_LINE = re.compile(r"^(\d+)\s+\d\d:\d\d:\d\d\.\d+\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(.*)$", re.DOTALL)
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<(.*)>$", re.DOTALL)


def fd_arg(arg: str) -> Tuple[Optional[int], Optional[str]]:
    """``(fd, path)`` of a descriptor argument or return value decorated by ``-y``."""
    m = _FD.match(arg.strip())
    if m is None:
        return None, None
    path = os.fsdecode(unescape(m.group(2)))
    path = path.removesuffix(" (deleted)")
    fd = None if m.group(1) == "AT_FDCWD" else int(m.group(1))
    return fd, path


@attrs.frozen
class Event:
    """One traced call, as what it did to which paths.

    ``kind``: ``create``, ``open-write``, ``write``, ``attr``, ``mkdir``,
    ``rmdir``, ``unlink``, ``rename``, ``exchange``, ``link``, ``symlink``,
    ``fsync``, ``fdatasync``, ``syncfs``, ``sync`` or ``mark``. ``paths``:
    ``(src, dst)`` for rename, exchange and link, else the one path.
    """

    index: int
    pid: int
    kind: str
    call: str
    paths: Tuple[str, ...]
    ok: bool = True
    data: bytes = b""
    is_dir: bool = False


CHANGES = frozenset(
    {
        "create",
        "write",
        "attr",
        "mkdir",
        "rmdir",
        "unlink",
        "rename",
        "exchange",
        "link",
        "symlink",
    }
)


def _at(dirfd: str, name: Optional[str]) -> Optional[str]:
    _, base = fd_arg(dirfd)
    if name is None or base is None:
        return base if name is None else name
    return os.path.normpath(os.path.join(base, name))


def _joined(lines: Iterator[str]) -> Iterator[Tuple[int, str]]:
    """``(pid, "call(args) = ret")`` with unfinished and resumed halves put together."""
    pending: Dict[int, str] = {}
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.startswith(("+++", "---")):
            continue
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        if rest.startswith("<..."):
            head = pending.pop(pid, "")
            rest = head + rest[rest.index("resumed>") + len("resumed>") :]
        yield pid, rest


def parse_trace(text: str, cwd: str) -> List[Event]:
    """The events of an ``strace -f -y -xx`` log."""
    events: List[Event] = []
    dirfds: Dict[Tuple[int, int], bool] = {}

    def add(pid: int, kind: str, call: str, *paths: Optional[str], ok: bool = True,
            data: bytes = b"", is_dir: bool = False) -> None:  # fmt: skip
        if any(p is None for p in paths):
            return
        clean = tuple(
            os.path.normpath(os.path.join(cwd, p)) for p in paths if p is not None
        )
        events.append(Event(len(events), pid, kind, call, clean, ok, data, is_dir))

    for pid, rest in _joined(iter(text.splitlines())):
        m = _CALL.match(rest)
        if m is None:
            continue
        call, args, ret = m.group(1), split_args(m.group(2)), m.group(3).strip()
        ok = not ret.startswith("-1")
        if call in ("openat", "open", "creat"):
            name = string_arg(args[1] if call == "openat" else args[0])
            flags = (
                args[2]
                if call == "openat"
                else (args[1] if call == "open" else "O_CREAT")
            )
            path = _at(args[0], name) if call == "openat" else name
            if name is not None and name.startswith("/fstx-audit-"):
                add(pid, "mark", call, name)
                continue
            if not ok:
                continue
            fd, real = fd_arg(ret)
            if fd is not None:
                dirfds[(pid, fd)] = "O_DIRECTORY" in flags
            target = real or path
            if "O_CREAT" in flags:
                add(pid, "create", call, target)
            elif any(f in flags for f in ("O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND")):
                add(pid, "open-write", call, target)
            if "O_TRUNC" in flags:
                add(pid, "write", call, target)
        elif call == "close":
            fd, _ = fd_arg(args[0])
            if fd is not None:
                dirfds.pop((pid, fd), None)
        elif not ok and call not in SYNCS:
            continue
        elif call in ("write", "pwrite64", "writev", "ftruncate"):
            _, path = fd_arg(args[0])
            data = (
                unescape(args[1][1:-1])
                if call == "write" and args[1].startswith('"')
                else b""
            )
            if path is not None and path.startswith("/"):
                add(pid, "write", call, path, data=data)
        elif call == "copy_file_range":
            add(pid, "write", call, fd_arg(args[2])[1])
        elif call == "sendfile":
            add(pid, "write", call, fd_arg(args[0])[1])
        elif call == "ioctl":
            if "FICLONE" in args[1]:
                add(pid, "write", call, fd_arg(args[0])[1])
        elif call in ("fchmodat", "fchmodat2", "utimensat"):
            add(pid, "attr", call, _at(args[0], string_arg(args[1])))
        elif call == "fchmod":
            add(pid, "attr", call, fd_arg(args[0])[1])
        elif call in ("mkdir", "rmdir", "unlink"):
            add(pid, call, call, string_arg(args[0]))
        elif call == "mkdirat":
            add(pid, "mkdir", call, _at(args[0], string_arg(args[1])))
        elif call == "unlinkat":
            kind = "rmdir" if "AT_REMOVEDIR" in args[2] else "unlink"
            add(pid, kind, call, _at(args[0], string_arg(args[1])))
        elif call in ("rename", "link"):
            add(pid, call, call, string_arg(args[0]), string_arg(args[1]))
        elif call in ("renameat", "renameat2", "linkat"):
            kind = "link" if call == "linkat" else "rename"
            if call == "renameat2" and "RENAME_EXCHANGE" in args[4]:
                kind = "exchange"
            src = _at(args[0], string_arg(args[1]))
            add(pid, kind, call, src, _at(args[2], string_arg(args[3])))
        elif call == "symlink":
            add(pid, "symlink", call, string_arg(args[1]))
        elif call == "symlinkat":
            add(pid, "symlink", call, _at(args[1], string_arg(args[2])))
        elif call in ("fsync", "fdatasync", "syncfs"):
            fd, path = fd_arg(args[0])
            is_dir = fd is not None and dirfds.get((pid, fd), False)
            add(pid, call, call, path, ok=ok, is_dir=is_dir)
        elif call == "sync":
            events.append(Event(len(events), pid, "sync", call, (), ok))
    return events


def between_marks(
    events: List[Event], first: str = "begin", last: str = "end"
) -> List[Event]:
    """The events of the marked process from mark ``first`` to mark ``last``."""
    start = next(e for e in events if e.kind == "mark" and e.paths[0].endswith(first))
    end = next(
        (e for e in events if e.kind == "mark" and e.paths[0].endswith(last)),
        events[-1],
    )
    return [
        e for e in events if start.index <= e.index <= end.index and e.pid == start.pid
    ]


# -- the rules -------------------------------------------------------------------------


@attrs.define
class Audit:
    """The rules, over the events of one run under ``root``."""

    root: str
    events: List[Event]
    _devs: Dict[str, int] = attrs.Factory(dict)
    symlinks: Set[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.symlinks = {e.paths[0] for e in self.events if e.kind == "symlink"}

    # -- where things are ------------------------------------------------------

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + "/")

    def staged(self, path: str) -> bool:
        """Inside a staging directory (the root's, or a mount's under it)."""
        if not self.inside(path):
            return False
        return STAGING in os.path.relpath(path, self.root).split("/")

    def dev(self, path: str) -> int:
        """The device of ``path``, or of its nearest ancestor that still exists."""
        probe = path
        while probe not in self._devs:
            try:
                self._devs[probe] = os.lstat(probe).st_dev
            except OSError:
                probe = os.path.dirname(probe)
                continue
        dev = self._devs[probe]
        self._devs[path] = dev
        return dev

    # -- what an event changed, what a sync covers --------------------------------

    def objects(self, e: Event) -> Set[str]:
        """What must be made durable for ``e`` to be: entries' directories, or items.

        A symlink's own times (``utimensat`` with ``AT_SYMLINK_NOFOLLOW``)
        have no fsync: no descriptor can be opened on a symlink, so only a
        ``syncfs`` or the file system's own journal makes them durable. They
        are not asked for.
        """
        parent = os.path.dirname
        if e.kind == "create":
            return {parent(e.paths[0]), e.paths[0]}
        if e.kind == "attr" and e.paths[0] in self.symlinks:
            return set()
        if e.kind in ("write", "attr"):
            return {e.paths[0]}
        if e.kind in ("rename", "exchange"):
            return {parent(e.paths[0]), parent(e.paths[1])}
        if e.kind == "link":
            return {parent(e.paths[1])}
        return {parent(e.paths[0])}

    def covers(self, sync: Event, obj: str) -> bool:
        if not sync.ok or sync.kind not in SYNCS:
            return False
        if sync.kind == "sync":
            return True
        if sync.kind == "syncfs":
            return self.dev(sync.paths[0]) == self.dev(obj)
        return sync.paths[0] == obj

    def covered(self, obj: str, after: int, before: int) -> bool:
        """Whether a sync between two events (by index) covers ``obj``."""
        return any(
            self.covers(s, obj)
            for s in self.events
            if after < s.index < before and s.kind in SYNCS
        )

    def durable(self, obj: str, after: int, before: int) -> bool:
        """Whether ``obj``, changed at event ``after``, is durable by event ``before``.

        Renames of ``obj`` or of a parent are followed: a sync under any of
        its names counts, and one moved into staging (deleted later in the
        same commit) need not be durable at all.
        """
        name = obj
        for e in self.events[after + 1 : before]:
            if self.covers(e, name):
                return True
            if e.kind == "rename" and (
                name == e.paths[0] or name.startswith(e.paths[0] + "/")
            ):
                name = e.paths[1] + name[len(e.paths[0]) :]
        return name != obj and self.staged(name)

    def changes_outside_staging(self, e: Event) -> bool:
        if e.kind not in CHANGES:
            return False
        paths = e.paths[1:] if e.kind == "link" else e.paths
        return any(not self.staged(p) for p in paths)

    # -- landmarks -------------------------------------------------------------------

    def journal_write(self, state: str) -> Optional[Event]:
        needle = b'"state":"%s"' % state.encode()
        return next(
            (
                e
                for e in self.events
                if e.kind == "write"
                and e.paths[0].endswith(".journal")
                and needle in e.data
            ),
            None,
        )

    def mark(self, name: str) -> Optional[Event]:
        return next(
            (e for e in self.events if e.kind == "mark" and e.paths[0].endswith(name)),
            None,
        )

    # -- rules -------------------------------------------------------------------------

    def rule_a(self) -> List[str]:
        """Staged items are durable before they are renamed into place."""
        bad: List[str] = []
        for r in self.events:
            if (
                r.kind != "rename"
                or not self.staged(r.paths[0])
                or self.staged(r.paths[1])
            ):
                continue
            src = r.paths[0]
            last: Dict[str, int] = {}
            for m in self.events[: r.index]:
                if m.kind not in CHANGES:
                    continue
                for obj in self.objects(m):
                    if obj == src or obj.startswith(src + "/"):
                        last[obj] = m.index
            for obj, at in sorted(last.items()):
                if not self.covered(obj, at, r.index):
                    bad.append(
                        f"(a) {self.events[at].call} of {obj!r} (event {at}) not durable "
                        f"before {r.call} {src!r} -> {r.paths[1]!r} (event {r.index})"
                    )
        return bad

    def rule_b(self) -> List[str]:
        """What the commit changed is durable before ``committed``; that record before the return."""
        start, done = self.journal_write("committing"), self.journal_write("committed")
        if start is None or done is None:
            return ["(b) no committing and committed records in the trace"]
        bad: List[str] = []
        for m in self.events[start.index + 1 : done.index]:
            if m.kind not in CHANGES or m.kind == "write":
                continue
            bad.extend(
                f"(b) {m.call} {m.paths} (event {m.index}): {obj!r} not durable before "
                f"the committed record (event {done.index})"
                for obj in sorted(self.objects(m))
                if not self.durable(obj, m.index, done.index)
            )
        acked = self.mark("acked")
        if acked is not None and not self.covered(
            done.paths[0], done.index, acked.index
        ):
            bad.append("(b) the committed record is not durable when commit() returns")
        return bad

    def rule_c(self) -> List[str]:
        """The journal and its name are durable before the first change outside staging."""
        start = self.journal_write("committing")
        if start is None:
            return ["(c) no committing record in the trace"]
        journal = start.paths[0]
        first = next(
            (
                e
                for e in self.events[start.index + 1 :]
                if self.changes_outside_staging(e)
            ),
            None,
        )
        if first is None:
            return []
        bad: List[str] = []
        if not self.covered(journal, start.index, first.index):
            bad.append(
                f"(c) the committing record (event {start.index}) is not durable before "
                f"{first.call} {first.paths} (event {first.index})"
            )
        created = next(
            (e for e in self.events if e.kind == "create" and e.paths[0] == journal),
            None,
        )
        if created is None:
            bad.append(f"(c) the journal {journal!r} was not created in this run")
        elif not self.covered(os.path.dirname(journal), created.index, first.index):
            bad.append(
                f"(c) the journal's directory entry is not durable before event {first.index}"
            )
        return bad

    def rule_d(self) -> List[str]:
        """Nothing outside the root changes.

        A hard link's source (a cached file that ``copy(link=True)`` links
        in) only gains a name inside the root: its own name is not a change.
        """
        bad: List[str] = []
        for e in self.events:
            if e.kind not in CHANGES and e.kind != "open-write":
                continue
            named = e.paths[1:] if e.kind == "link" else e.paths
            paths = [
                p for p in named if p != os.devnull and not p.startswith("/dev/pts/")
            ]
            bad.extend(
                f"(d) {e.call} {p!r} (event {e.index}) is outside the root"
                for p in paths
                if not self.inside(p)
            )
        return bad

    def rule_e(self) -> List[str]:
        """No sync of any kind."""
        return [
            f"(e) {e.call} {e.paths} (event {e.index})"
            for e in self.events
            if e.kind in SYNCS
        ]

    def rule_f(self) -> List[str]:
        """Every change outside staging is durable before its journal is removed."""
        gone = [
            e
            for e in self.events
            if e.kind == "unlink" and e.paths[0].endswith(".journal")
        ]
        if not gone:
            return ["(f) no journal was removed"]
        end = gone[-1]
        bad: List[str] = []
        for m in self.events[: end.index]:
            if not self.changes_outside_staging(m) or m.kind == "write":
                continue
            bad.extend(
                f"(f) {m.call} {m.paths} (event {m.index}): {obj!r} not durable before the "
                f"journal is removed (event {end.index})"
                for obj in sorted(self.objects(m))
                if not self.durable(obj, m.index, end.index)
            )
        return bad

    def counts(self) -> Dict[str, int]:
        """How many of each sync the run made."""
        out = {"fsync file": 0, "fsync dir": 0, "fdatasync": 0, "syncfs": 0, "sync": 0}
        for e in self.events:
            if e.kind == "fsync":
                out["fsync dir" if e.is_dir else "fsync file"] += 1
            elif e.kind in out:
                out[e.kind] += 1
        return out


# -- running under strace --------------------------------------------------------------


def strace_or_skip() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(
            f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()}"
        )
    return strace


@attrs.define
class Setup:
    """Where one audited run happens: its root, its source tree, its strace log."""

    root: str
    src: str
    log: str


def traced(
    strace: str, where: Setup, mode: str, name: str, variant: str, *, at: int = 0
) -> Audit:
    """Run the script under strace; the audit of its marked events."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    root, src, log = where.root, where.src, where.log
    cwd = os.path.dirname(log)
    done = subprocess.run(
        [strace, "-f", "-tt", "-y", "-xx", "-s", "1048576", "-e", "signal=none",
         "-e", f"trace={TRACED}", "-o", log,
         sys.executable, "-c", SCRIPT, TESTS, mode, name, root, src, variant, str(at)],
        cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(log, encoding="ascii", errors="surrogateescape") as f:
        events = between_marks(parse_trace(f.read(), cwd))
    return Audit(os.path.realpath(root), renumber(events))


def renumber(events: Sequence[Event]) -> List[Event]:
    """The events indexed from 0 in order (so that ``events[i].index == i``)."""
    return [attrs.evolve(e, index=i) for i, e in enumerate(events)]


def check(audit: Audit, rules: Sequence[Callable[[Audit], List[str]]]) -> None:
    problems = [p for rule in rules for p in rule(audit)]
    assert problems == [], "\n".join(problems)


@pytest.fixture
def setup(tmp_path: Any) -> Iterator[Tuple[Setup, Mounts]]:
    made = Mounts()
    try:
        yield (
            Setup(
                str(tmp_path / "root"),
                str(tmp_path / "src"),
                str(tmp_path / "strace.log"),
            ),
            made,
        )
    finally:
        made.close()


def without_inodes(snap: Snapshot) -> Snapshot:
    """File entries as (type, mode, data, mtime): a move across devices keeps all but the inode."""
    return {k: v[:3] + v[4:] if v[0] == "file" else v for k, v in snap.items()}


def prepare(workload: Workload, where: Setup, made: Mounts) -> None:
    workload.setup(where.root, where.src)
    if workload is CROSS:
        reason = why_no_mounts()
        if reason is not None:
            pytest.skip(reason)
        mnt = made.tmpfs(os.path.join(where.root, "mnt"), size="4m")
        build(mnt, MOUNT_TREE)


RULES_FULL = (Audit.rule_a, Audit.rule_b, Audit.rule_c, Audit.rule_d, Audit.rule_f)
RULES_NONE = (Audit.rule_d, Audit.rule_e)

PARAMS = [pytest.param(w, id=w.name) for w in (*WORKLOADS, CROSS, MOVED_PARENT)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("workload", PARAMS)
def test_commit_protocol_in_the_syscall_trace(
    workload: Workload, variant: str, setup: Tuple[Setup, Mounts]
) -> None:
    strace = strace_or_skip()
    where, made = setup
    prepare(workload, where, made)
    after = workload.expected(where.root, where.src)
    audit = traced(strace, where, "commit", workload.name, variant)
    assert without_inodes(tree_of(where.root, after)) == without_inodes(after)
    assert_clean(where.root)
    assert audit.journal_write("committed") is not None, "the parser saw the commit"
    check(audit, RULES_NONE if variant == "none" else RULES_FULL)
    print(f"\naudit {workload.name} {variant}: {audit.counts()}")  # for docs/testing.md


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "name",
    [
        "installer-upgrade",
        "swap-two-dirs",
        "write-then-rename",
        "cross-device",
        "change-then-move-parent",
    ],
)
def test_rollback_after_a_failed_commit_in_the_syscall_trace(
    name: str, variant: str, setup: Tuple[Setup, Mounts]
) -> None:
    strace = strace_or_skip()
    where, made = setup
    workload = AUDITED[name]
    prepare(workload, where, made)
    before = snapshot(where.root)
    audit = traced(
        strace, where, "abort", name, variant, at=renames_of(workload, where, made)
    )
    assert audit.mark("aborted") is not None, "the injected failure was reached"
    assert snapshot(where.root) == before
    assert_clean(where.root)
    check(
        audit,
        (Audit.rule_d, Audit.rule_e)
        if variant == "none"
        else (Audit.rule_c, Audit.rule_d, Audit.rule_f),
    )
    print(f"\naudit rollback {name} {variant}: {audit.counts()}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "name",
    ["installer-upgrade", "swap-two-dirs", "cross-device", "change-then-move-parent"],
)
def test_recovery_after_a_crash_in_the_syscall_trace(
    name: str, variant: str, setup: Tuple[Setup, Mounts]
) -> None:
    strace = strace_or_skip()
    where, made = setup
    workload = AUDITED[name]
    prepare(workload, where, made)
    before = snapshot(where.root)
    last = renames_of(workload, where, made)
    pid = os.fork()
    if pid == 0:  # the child dies at its second rename of the commit
        try:
            _os.set_hook(CrashRename(FailRename(last)))
            with fstx.transaction(
                where.root, durability="none" if variant == "none" else "full"
            ) as tx:
                workload.plan(tx, where.src)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 137
    assert fstx.status(where.root).pending
    audit = traced(strace, where, "recover", name, variant)
    assert snapshot(where.root) == before
    assert_clean(where.root)
    assert any(audit.changes_outside_staging(e) for e in audit.events), (
        "recovery undid something"
    )
    check(
        audit,
        (Audit.rule_d, Audit.rule_e)
        if variant == "none"
        else (Audit.rule_d, Audit.rule_f),
    )
    print(f"\naudit recovery {name} {variant}: {audit.counts()}")


# -- the checker catches what it should ---------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: Any) -> Dict[str, Audit]:
    """Audits of clean runs of the installer upgrade, with and without syncfs."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    out = {}
    for variant in ("full", "full-fsync"):
        base = tmp_path_factory.mktemp(f"ref-{variant}")
        where = Setup(str(base / "root"), str(base / "src"), str(base / "strace.log"))
        BY_NAME["installer-upgrade"].setup(where.root, where.src)
        out[variant] = traced(
            strace_or_skip(), where, "commit", "installer-upgrade", variant
        )
    return out


def without(audit: Audit, drop: Callable[[Event], bool]) -> Audit:
    return Audit(audit.root, renumber([e for e in audit.events if not drop(e)]))


@pytest.mark.parametrize(
    ("variant", "drop", "rule", "expect"),
    [
        pytest.param("full", lambda e: e.kind == "syncfs", Audit.rule_a, "(a)", id="no-syncfs-a"),
        pytest.param("full", lambda e: e.kind == "syncfs", Audit.rule_b, "(b)", id="no-syncfs-b"),
        pytest.param("full", lambda e: e.kind in SYNCS, Audit.rule_c, "(c)", id="no-sync-c"),
        pytest.param("full-fsync", lambda e: e.kind == "fsync" and e.paths[0].endswith("/.fstx"), Audit.rule_c, "directory entry", id="no-journal-dir-fsync"),
        pytest.param("full-fsync", lambda e: e.kind == "fsync" and not e.is_dir and ".fstx/tx-" in e.paths[0], Audit.rule_a, "(a)", id="no-staged-file-fsync"),
        pytest.param("full-fsync", lambda e: e.kind == "fsync" and e.is_dir and ".fstx" not in e.paths[0], Audit.rule_b, "(b)", id="no-target-dir-fsync"),
        pytest.param("full-fsync", lambda e: e.kind == "fsync" and e.paths[0].endswith(".journal"), Audit.rule_c, "committing record", id="no-journal-fsync"),
    ],
)  # fmt: skip
def test_the_checker_catches_a_missing_barrier(
    reference: Dict[str, Audit], variant: str, drop: Callable[[Event], bool],
    rule: Callable[[Audit], List[str]], expect: str,
) -> None:  # fmt: skip
    audit = reference[variant]
    assert rule(audit) == []
    problems = rule(without(audit, drop))
    assert problems, "the rule did not notice"
    assert all(expect in p for p in problems[:1]), problems


def test_the_checker_catches_a_change_outside_the_root(
    reference: Dict[str, Audit],
) -> None:
    audit = reference["full"]
    assert audit.rule_d() == []
    assert audit.rule_e() != []
    stray = Event(len(audit.events), 1, "unlink", "unlinkat", ("/etc/outside",))
    assert Audit(audit.root, [*audit.events, stray]).rule_d() == [
        f"(d) unlinkat '/etc/outside' (event {stray.index}) is outside the root"
    ]


@pytest.mark.parametrize(
    ("line", "kind", "paths"),
    [
        pytest.param(r'7 12:00:00.000001 renameat2(3<\x2f\x72>, "\x61", 4<\x2f\x6f\xff>, "\x62\x3e", RENAME_NOREPLACE) = 0',
                     "rename", ("/r/a", os.fsdecode(b"/o\xff/b>")), id="renameat2-non-utf8"),
        pytest.param(r'7 12:00:00.000001 unlinkat(AT_FDCWD<\x2f\x63>, "\x78", AT_REMOVEDIR) = 0',
                     "rmdir", ("/c/x",), id="rmdir-at-cwd"),
        pytest.param(r'7 12:00:00.000001 openat(5<\x2f\x64>, "\x6a", O_WRONLY|O_CREAT|O_EXCL, 0644) = 6<\x2f\x64\x2f\x6a>',
                     "create", ("/d/j",), id="openat-create"),
        pytest.param(r"7 12:00:00.000001 syncfs(7<\x2f\x64\x2f\x74>) = 0", "syncfs", ("/d/t",), id="syncfs"),
        pytest.param(r"7 12:00:00.000001 fsync(6<\x2f\x64\x2f\x6a (deleted)>) = 0", "fsync", ("/d/j",), id="fsync-deleted"),
    ],
)  # fmt: skip
def test_trace_parser(line: str, kind: str, paths: Tuple[str, ...]) -> None:
    events = parse_trace(line + "\n", "/cwd")
    assert [(e.kind, e.paths) for e in events] == [(kind, paths)]


def test_trace_parser_joins_unfinished_calls() -> None:
    log = (
        r'7 12:00:00.000001 renameat(3<\x2f\x72>, "\x61", <unfinished ...>'
        "\n"
        r"8 12:00:00.000002 +++ exited with 0 +++"
        "\n"
        r'7 12:00:00.000003 <... renameat resumed>4<\x2f\x6f>, "\x62") = 0'
        "\n"
    )
    assert [(e.kind, e.paths) for e in parse_trace(log, "/")] == [
        ("rename", ("/r/a", "/o/b"))
    ]
