"""A shadow durability model: the crash states a power cut may leave of a recorded run.

This is crash.md §6.3 (and family F3 of its §10) in Python, in three parts.

**Recording.** :class:`Recorder` is an ``fstx._os`` hook. It logs every call
of a transaction with the absolute paths involved, and turns each mutating
call into a *group* of micro-operations on a model of the tree: ``new``
(an inode comes to be), ``entry`` (a name in a directory is set or cleared),
``data`` (a file's content) and ``mode``. Inodes and directories are
identified by model ids, mapped from the real ``st_ino``. Before every
mutating call the recorder scans the real tree and compares it with the
model's volatile state: the model must be exactly what a ``kill -9`` would
leave. A difference is a change that bypassed the seam (``os.mkdir`` of the
staging directory, a file written through ``os.fdopen``); it is adopted as a
group of its own and reported, so that the model never drifts from reality.

**Durability.** Each group names the objects whose ``fsync`` makes it durable:
the directories whose entries it changes, or the inode whose data or mode it
changes. An ``fsync`` (file) or ``fsync_dir`` (directory) marks that object
synced for every group issued before it; a group is durable once all its
objects are. ``syncfs`` makes everything durable (the whole test tree is one
file system). The tree as it was before the transaction is durable. As in
ALICE's pessimistic persistence model (crash.md §1.2), ``fsync(file)`` does
not make its name durable, data is not durable because a rename of it is,
and a rename is durable only once both directories are.

**Order.** Under the ``ordered`` model (the default, :data:`APMS`) the
changes to one inode land in the order they were made: its data in order,
its metadata (entries, mode, link count, a directory's ``..``) in order;
nothing orders two inodes but an fsync. That is crash.md §9, item 9, and
less than any journaling file system gives. The ``strict`` model (ALICE's
default) orders nothing at all without an fsync. Either way a group never
lands without the groups it depends on: the last writer of each name it
reads (a rename of a name an earlier group created), and under ``ordered``
the last earlier group on each inode it touches.

**Crash states.** At crash point ``k`` (after ``k`` mutating calls, ``0..N``),
with ``D`` the durable groups and ``P`` the pending ones, in issue order:

- ``process``: every group (what ``kill -9`` leaves);
- ``max-loss``: ``D`` (and what it needs). An inode reachable only through names that were
  never made durable is lost; a durable name whose data never was holds its
  last durable content, or nothing;
- ``prefix``: ``D`` plus the first ``j`` groups of ``P``;
- ``except-one``: every group but one of ``P``, and but the later pending
  groups that depend on it;
- ``torn-append``: a pending journal append cut at a few offsets (on a
  record boundary, mid-record) or zero-filled, after ``D`` and the earlier
  pending groups;
- ``rename-half``: a pending rename over an existing name that only got as
  far as removing the destination (ALICE's micro-op split), likewise.

A state in which a durable group would land without one it depends on is
not one a file system produces, and is not generated.

**Checking.** :class:`Checker` materialises each state (deduplicated by its
canonical form) into a fresh directory, hard links included, runs
``fstx.recover`` on it (in process, and every so often in a new
interpreter), and asks: is the tree exactly the before-tree or exactly the
after-tree (types, modes, contents, symlink targets); the before-tree while
the commit had not begun (the ``committing`` record not yet written); the
after-tree once the commit was acknowledged (the ``committed`` record's
fsync returned); is the staging directory then empty but for its lock, and
is a second recovery a no-op. Inode numbers cannot be kept when a state is
written out again, so the journal's ``ino`` fields are translated to the new
files' numbers, as a real crash would have kept them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
import zlib
from collections import Counter
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import attrs

import fstx
from fstx import _journal, _os
from fstx._os import Dir
from treeutil import Snapshot, installed, snapshot, staging_leftovers
from workloads import Delete, File, Rename, Workload, Write

if TYPE_CHECKING:
    from types import CodeType, FrameType

Id = int
Key = Tuple[Id, str]
"""A name in a directory: ``(directory id, name)``."""
Payload = Union[bytes, str, None]
Op = Tuple[Any, ...]
Entries = Dict[Id, Dict[str, Id]]

NEW = "new"
ENTRY = "entry"
DATA = "data"
MODE = "mode"

KINDS = ("process", "max-loss", "prefix", "except-one", "torn-append", "rename-half")
"""Every kind of crash state, in the order a search for a failure tries them."""

APMS = ("ordered", "strict")
"""Abstract persistence models (crash.md §1.2, §6.3). Both: a call's effect lands
whole or not at all (a rename across two directories too, but see the
``rename-half`` states), and nothing is durable before its fsync. ``ordered``:
effects on the same file or directory land in the order they were made, and
nothing else is ordered without an fsync (crash.md §9, item 9; what journaling
file systems give and more). ``strict``: no order at all without an fsync,
ALICE's default APM, under which even two renames in one directory may land
out of order."""

UNKNOWN_INO = 1 << 60
"""Journal ``ino`` of an item that a crash state lost: above any real inode number."""

STAGING = ".fstx"
_COMMITTING = _journal.encode([_journal.State(_journal.COMMITTING)])
_COMMITTED = _journal.encode([_journal.State(_journal.COMMITTED)])


class Inode(NamedTuple):
    """What a model inode holds (immutable: states share them).

    ``payload`` is a file's content, a symlink's target, or None for a
    directory. ``inomap`` is set on a journal's content: the real inode
    numbers in it, mapped to model ids as they were when it was written.
    """

    kind: str
    mode: int
    payload: Payload
    inomap: Optional[Mapping[int, Id]] = None


@attrs.define(eq=False)
class Group:
    """One call's effect on the tree: micro-operations that a crash keeps or loses together.

    Attributes:
        index: position in issue order.
        label: what happened, with absolute paths where the recorder knows them.
        ops: the micro-operations.
        objs: the inodes (files or directories) whose fsync makes it durable.
        reads: the names whose current value it relies on.
        deps: the groups that last wrote those names before it.
        unsynced: the objects not fsynced since it was issued.
        durable_at: the first crash point at which it is durable.
        journal: a journal append (torn variants are made of it).
        prev: a journal's content before this append.
        half: for a rename over an existing name: the op that only removes
            the destination.
        bypass: adopted from a change that did not go through the seam.
    """

    index: int
    label: str
    ops: Tuple[Op, ...]
    objs: FrozenSet[Id]
    reads: FrozenSet[Key] = frozenset()
    deps: FrozenSet[int] = frozenset()
    unsynced: Set[Id] = attrs.Factory(set)
    durable_at: Optional[int] = None
    journal: bool = False
    prev: Optional[bytes] = None
    half: Optional[Op] = None
    bypass: bool = False


@attrs.frozen(eq=False)
class CrashState:
    """One tree a crash at ``point`` may leave.

    Attributes:
        point: the crash point (mutating calls completed).
        kind: one of :data:`KINDS`.
        detail: which groups were kept or lost.
        entries: directory id -> name -> inode id.
        inodes: inode id -> :class:`Inode`.
    """

    point: int
    kind: str
    detail: str
    entries: Entries
    inodes: Dict[Id, Inode]


def _apply(
    entries: Entries, inodes: Dict[Id, Inode], ops: Iterable[Op], copied: Set[Id]
) -> None:
    """Apply micro-operations in place; directories not in ``copied`` are copied first."""
    for op in ops:
        tag = op[0]
        if tag == ENTRY:
            _, d, name, target = op
            if d not in copied:
                entries[d] = dict(entries.get(d, {}))
                copied.add(d)
            if target is None:
                entries[d].pop(name, None)
            else:
                entries[d][name] = target
        elif tag == NEW:
            _, i, node = op
            inodes[i] = node
            if node.kind == "dir":
                entries[i] = {}
                copied.add(i)
        elif tag == DATA:
            _, i, payload, inomap = op
            old = inodes.get(i)
            if old is not None:
                inodes[i] = old._replace(payload=payload, inomap=inomap)
        elif tag == MODE:
            _, i, mode = op
            old = inodes.get(i)
            if old is not None:
                inodes[i] = old._replace(mode=mode)
        else:  # pragma: no cover - a programming error
            raise AssertionError(f"unknown micro-op {op!r}")


def _torn(prev: bytes, new: bytes) -> List[Tuple[str, bytes]]:
    """Torn versions of an append of ``new[len(prev):]`` to ``prev``."""
    delta = new[len(prev) :]
    out: Dict[bytes, str] = {}
    cuts = {1, len(delta) // 2, len(delta) - 1}
    # On a record boundary: whole records that look valid, the rest missing.
    ends = [i + 1 for i, byte in enumerate(delta) if byte == 0x0A][:-1]
    cuts.update(ends[:4] + ends[-4:])
    for cut in sorted(c for c in cuts if 0 < c < len(delta)):
        out.setdefault(prev + delta[:cut], f"cut at {cut}/{len(delta)}")
    out.setdefault(prev + bytes(len(delta)), f"zero-filled {len(delta)}")
    return [(what, data) for data, what in out.items()]


class Model:
    """Groups of micro-operations over a durable initial tree.

    Args:
        root: the root directory's id.
        entries: the initial directories' entries.
        inodes: the initial inodes.
    """

    def __init__(
        self, root: Id, entries: Entries, inodes: Dict[Id, Inode], apm: str = "ordered"
    ) -> None:
        if apm not in APMS:
            raise ValueError(f"unknown persistence model {apm!r}")
        self.root = root
        self.apm = apm
        self.base_entries: Entries = {d: dict(e) for d, e in entries.items()}
        self.base_inodes: Dict[Id, Inode] = dict(inodes)
        self.entries: Entries = {d: dict(e) for d, e in entries.items()}
        self.inodes: Dict[Id, Inode] = dict(inodes)
        self.groups: List[Group] = []
        self.points: List[int] = []
        self._writer: Dict[Key, int] = {}
        self._last_on: Dict[Tuple[Id, str], int] = {}
        self._pending: List[int] = []
        self._next = max(inodes, default=0) + 1
        self._bases: Dict[int, Tuple[Entries, Dict[Id, Inode]]] = {}

    @classmethod
    def empty(cls, mode: int = 0o755, apm: str = "ordered") -> Model:
        """A model whose initial tree is an empty root directory (id 0)."""
        return cls(0, {0: {}}, {0: Inode("dir", mode, None)}, apm)

    # -- building ------------------------------------------------------------

    def new_id(self) -> Id:
        """A fresh inode id."""
        self._next += 1
        return self._next - 1

    def lookup(self, d: Id, name: str) -> Optional[Id]:
        """The inode at ``name`` in directory ``d`` now (volatile)."""
        return self.entries.get(d, {}).get(name)

    def add(
        self,
        label: str,
        ops: Sequence[Op],
        objs: Iterable[Id],
        reads: Iterable[Key] = (),
        *,
        also: Iterable[Id] = (),
        journal: bool = False,
        half: Optional[Op] = None,
        bypass: bool = False,
    ) -> Group:
        """Issue a group now: apply it to the volatile state and queue it for durability.

        Under the ``ordered`` persistence model a group lands after every
        earlier group on the same inode: its data if it changes a file's
        content, else its metadata (entries, mode, link count, a directory's
        parent). ``objs`` are the inodes whose fsync makes it durable; ``also``
        names inodes whose metadata it changes without their fsync being
        needed (a moved directory's ``..``, a link count).
        """
        reads = frozenset(reads)
        objs = frozenset(objs)
        channel = "data" if ops and all(op[0] == DATA for op in ops) else "meta"
        keys = {(o, channel) for o in objs} | {(o, "meta") for o in also}
        found = {self._writer[k] for k in reads if k in self._writer}
        if self.apm == "ordered":
            found.update(self._last_on[key] for key in keys if key in self._last_on)
        deps = frozenset(found)
        prev = None
        if journal:
            (op,) = ops
            node = self.inodes.get(op[1])
            prev = (
                node.payload
                if node is not None and isinstance(node.payload, bytes)
                else b""
            )
        group = Group(
            len(self.groups),
            label,
            tuple(ops),
            objs,
            reads,
            deps,
            set(objs),
            journal=journal,
            prev=prev,
            half=half,
            bypass=bypass,
        )
        _apply(self.entries, self.inodes, ops, set(self.entries))
        for op in ops:
            if op[0] == ENTRY:
                self._writer[(op[1], op[2])] = group.index
        for key in keys:
            self._last_on[key] = group.index
        self.groups.append(group)
        self._pending.append(group.index)
        return group

    def create(
        self,
        d: Id,
        name: str,
        kind: str = "file",
        mode: int = 0o644,
        payload: Payload = None,
        *,
        label: Optional[str] = None,
        bypass: bool = False,
    ) -> Id:
        """Create an inode and its name: durable once ``d`` is fsynced."""
        i = self.new_id()
        if kind == "file" and payload is None:
            payload = b""
        node = Inode(kind, mode, payload)
        self.add(
            label or f"create {kind} {d}/{name}",
            [(NEW, i, node), (ENTRY, d, name, i)],
            [d],
            [(d, name)],
            bypass=bypass,
        )
        return i

    def mkdir(
        self, d: Id, name: str, mode: int = 0o755, *, label: Optional[str] = None
    ) -> Id:
        """Create a directory."""
        return self.create(d, name, "dir", mode, label=label or f"mkdir {d}/{name}")

    def symlink(
        self, d: Id, name: str, target: str, *, label: Optional[str] = None
    ) -> Id:
        """Create a symlink."""
        return self.create(
            d, name, "link", 0o777, target, label=label or f"symlink {d}/{name}"
        )

    def write(
        self,
        i: Id,
        data: bytes,
        *,
        journal: bool = False,
        inomap: Optional[Mapping[int, Id]] = None,
        label: Optional[str] = None,
        bypass: bool = False,
    ) -> None:
        """Set file ``i``'s content (a write, copy or truncate): durable once ``i`` is fsynced."""
        self.add(
            label or f"data {i} ({len(data)} bytes)",
            [(DATA, i, data, inomap)],
            [i],
            journal=journal,
            bypass=bypass,
        )

    def chmod(
        self, i: Id, mode: int, *, label: Optional[str] = None, bypass: bool = False
    ) -> None:
        """Set inode ``i``'s mode bits: durable once ``i`` is fsynced."""
        self.add(label or f"chmod {i} {mode:o}", [(MODE, i, mode)], [i], bypass=bypass)

    def link(
        self, sd: Id, sn: str, dd: Id, dn: str, *, label: Optional[str] = None
    ) -> None:
        """A second name ``dn`` in ``dd`` for what ``sn`` in ``sd`` names."""
        i = self.lookup(sd, sn)
        assert i is not None, f"link of a missing name {sn!r}"
        self.add(
            label or f"link {sd}/{sn} -> {dd}/{dn}",
            [(ENTRY, dd, dn, i)],
            [dd],
            [(sd, sn), (dd, dn)],
            also=[i],
        )

    def unlink(
        self, d: Id, name: str, *, label: Optional[str] = None, bypass: bool = False
    ) -> None:
        """Remove a name (a file's, or an empty directory's)."""
        gone = self.lookup(d, name)
        self.add(
            label or f"unlink {d}/{name}",
            [(ENTRY, d, name, None)],
            [d],
            [(d, name)],
            also=[] if gone is None else [gone],
            bypass=bypass,
        )

    def rename(
        self, sd: Id, sn: str, dd: Id, dn: str, *, label: Optional[str] = None
    ) -> None:
        """Rename, replacing what ``dn`` named: durable once both directories are fsynced."""
        i = self.lookup(sd, sn)
        assert i is not None, f"rename of a missing name {sn!r}"
        if (sd, sn) == (dd, dn):
            return
        replaced = self.lookup(dd, dn)
        half = None if replaced is None else (ENTRY, dd, dn, None)
        also = [] if replaced is None else [replaced]
        if self.inodes[i].kind == "dir" and sd != dd:
            also.append(i)  # its ".." changes
        self.add(
            label or f"rename {sd}/{sn} -> {dd}/{dn}",
            [(ENTRY, dd, dn, i), (ENTRY, sd, sn, None)],
            [sd, dd],
            [(sd, sn)],
            also=also,
            half=half,
        )

    def exchange(
        self, sd: Id, sn: str, dd: Id, dn: str, *, label: Optional[str] = None
    ) -> None:
        """Swap two names atomically."""
        a, b = self.lookup(sd, sn), self.lookup(dd, dn)
        assert a is not None, "exchange of a missing name"
        assert b is not None, "exchange of a missing name"
        self.add(
            label or f"exchange {sd}/{sn} <-> {dd}/{dn}",
            [(ENTRY, dd, dn, a), (ENTRY, sd, sn, b)],
            [sd, dd],
            [(sd, sn), (dd, dn)],
            also=[x for x in (a, b) if self.inodes[x].kind == "dir" and sd != dd],
        )

    def fsync(self, obj: Id) -> None:
        """``fsync`` of a file or directory: what was issued on it so far is synced."""
        k = len(self.points)
        still = []
        for g in self._pending:
            group = self.groups[g]
            group.unsynced.discard(obj)
            if group.unsynced:
                still.append(g)
            else:
                group.durable_at = k
        self._pending = still

    def syncfs(self) -> None:
        """``syncfs`` (or ``sync``): everything issued so far is durable."""
        k = len(self.points)
        for g in self._pending:
            self.groups[g].unsynced.clear()
            self.groups[g].durable_at = k
        self._pending = []

    def point(self) -> int:
        """Mark a crash point here; returns its number."""
        self.points.append(len(self.groups))
        return len(self.points) - 1

    # -- crash states --------------------------------------------------------

    def _base(self, first: int) -> Tuple[Entries, Dict[Id, Inode]]:
        """The state after groups ``[0, first)`` (all durable wherever this is asked)."""
        base = self._bases.get(first)
        if base is None:
            lower = max((i for i in self._bases if i <= first), default=None)
            if lower is None:
                entries = {d: dict(e) for d, e in self.base_entries.items()}
                inodes = dict(self.base_inodes)
                start = 0
            else:
                e0, i0 = self._bases[lower]
                entries, inodes, start = (
                    {d: dict(e) for d, e in e0.items()},
                    dict(i0),
                    lower,
                )
            copied = set(entries)
            for g in range(start, first):
                _apply(entries, inodes, self.groups[g].ops, copied)
            base = (entries, inodes)
            self._bases[first] = base
        return base

    def _build(
        self,
        k: int,
        kind: str,
        detail: str,
        first: int,
        include: Iterable[int],
        *,
        replace: Optional[Tuple[int, Sequence[Op]]] = None,
    ) -> CrashState:
        e0, i0 = self._base(first)
        entries: Entries = dict(e0)
        inodes = dict(i0)
        copied: Set[Id] = set()
        for g in sorted(include):
            ops = self.groups[g].ops
            if replace is not None and replace[0] == g:
                ops = tuple(replace[1])
            _apply(entries, inodes, ops, copied)
        return CrashState(k, kind, detail, entries, inodes)

    def _closed(self, chosen: Set[int], first: int) -> Set[int]:
        """``chosen`` plus what it depends on (a group never lands without its dependencies)."""
        out = set(chosen)
        todo = list(chosen)
        while todo:
            for d in self.groups[todo.pop()].deps:
                if d >= first and d not in out:
                    out.add(d)
                    todo.append(d)
        return out

    def durable(self, g: int, k: int) -> bool:
        """Whether group ``g`` is durable at crash point ``k``."""
        at = self.groups[g].durable_at
        return at is not None and at <= k

    def states(self, k: int, kinds: Iterable[str] = KINDS) -> Iterator[CrashState]:
        """The crash states at point ``k`` of the given kinds (duplicates included)."""
        n = self.points[k]
        pending = [g for g in range(n) if not self.durable(g, k)]
        first = pending[0] if pending else n
        tail = range(first, n)
        durable = {g for g in tail if self.durable(g, k)}
        label = self.groups_label
        for kind in kinds:
            if kind == "process":
                yield self._build(k, kind, "every group", first, tail)
            elif kind == "max-loss":
                lost = [g for g in pending if g not in self._closed(durable, first)]
                yield self._build(
                    k,
                    kind,
                    f"lost {len(lost)} pending: {label(lost)}",
                    first,
                    self._closed(durable, first),
                )
            elif kind == "prefix":
                for j in range(1, len(pending)):
                    chosen = self._closed(durable | set(pending[:j]), first)
                    yield self._build(
                        k,
                        kind,
                        f"first {j} of {len(pending)} pending, up to "
                        f"{label(pending[j - 1 : j])}",
                        first,
                        chosen,
                    )
            elif kind == "except-one":
                for p in pending:
                    dropped = self._dependents(p, n)
                    if dropped & durable:
                        continue  # a durable group needs it: no file system drops it
                    yield self._build(
                        k,
                        kind,
                        f"all but {label(sorted(dropped))}",
                        first,
                        [g for g in tail if g not in dropped],
                    )
            elif kind in ("torn-append", "rename-half"):
                for i, g in enumerate(pending):
                    group = self.groups[g]
                    variants: List[Tuple[str, Sequence[Op]]] = []
                    if kind == "torn-append" and group.journal:
                        (op,) = group.ops
                        assert group.prev is not None
                        if isinstance(op[2], bytes) and op[2].startswith(group.prev):
                            variants = [
                                (what, [(DATA, op[1], data, op[3])])
                                for what, data in _torn(group.prev, op[2])
                            ]
                    elif kind == "rename-half" and group.half is not None:
                        variants = [("destination removed, source kept", [group.half])]
                    chosen = self._closed(durable | set(pending[:i]), first) | {g}
                    if chosen & (self._dependents(g, n) - {g}):
                        continue  # a durable group needs all of g: g landed whole
                    for what, ops in variants:
                        yield self._build(
                            k,
                            kind,
                            f"{label([g])}: {what}",
                            first,
                            chosen,
                            replace=(g, ops),
                        )
            else:
                raise ValueError(f"unknown kind of crash state {kind!r}")

    def _dependents(self, p: int, n: int) -> Set[int]:
        out = {p}
        for g in range(p + 1, n):
            if self.groups[g].deps & out:
                out.add(g)
        return out

    def groups_label(self, groups: Sequence[int]) -> str:
        """The labels of some groups, shortened."""
        labels = [f"#{g} {self.groups[g].label}" for g in groups[:3]]
        if len(groups) > 3:
            labels.append(f"... ({len(groups)} in all)")
        return "; ".join(labels) or "nothing"

    # -- looking at a state --------------------------------------------------

    def walk(
        self, state: CrashState
    ) -> Optional[List[Tuple[Tuple[str, ...], Id, Inode]]]:
        """Every reachable ``(path, id, inode)`` in a state, parents first and sorted.

        None when the state is not a tree (a directory reached twice, a name
        of an inode that was never created): no file system leaves that.
        """
        out: List[Tuple[Tuple[str, ...], Id, Inode]] = []
        seen = {self.root}
        stack: List[Tuple[Tuple[str, ...], Id]] = [((), self.root)]
        while stack:
            path, d = stack.pop()
            children = state.entries.get(d, {})
            for name in sorted(children, reverse=True):
                i = children[name]
                node = state.inodes.get(i)
                if node is None:
                    return None
                if node.kind == "dir":
                    if i in seen:
                        return None
                    seen.add(i)
                    stack.append(((*path, name), i))
                out.append(((*path, name), i, node))
        out.sort(key=lambda item: item[0])
        return out

    def key(self, state: CrashState) -> Optional[Tuple[Any, ...]]:
        """A canonical form: equal for states that recovery cannot tell apart."""
        items = self.walk(state)
        if items is None:
            return None
        return tuple((p, i, n.kind, n.mode, n.payload) for p, i, n in items)

    def render(self, state: CrashState) -> Dict[str, Tuple[Any, ...]]:
        """``path -> ("file", mode, data) | ("dir", mode) | ("link", target)``, as snapshot does."""
        items = self.walk(state)
        assert items is not None, "not a tree"
        out: Dict[str, Tuple[Any, ...]] = {}
        for path, _i, node in items:
            if node.kind == "file":
                out["/".join(path)] = ("file", node.mode, node.payload)
            elif node.kind == "dir":
                out["/".join(path)] = ("dir", node.mode)
            else:
                out["/".join(path)] = ("link", node.payload)
        return out

    def state(self, k: int, kind: str) -> CrashState:
        """The one state of a kind that has exactly one (``process`` or ``max-loss``)."""
        (only,) = list(self.states(k, [kind]))
        return only


# -- writing a state out ----------------------------------------------------------


def _translate(
    payload: bytes, inomap: Mapping[int, Id], made: Mapping[Id, int]
) -> bytes:
    """A journal with its ``ino`` fields renumbered for the materialised files."""
    lines = payload.split(b"\n")
    tail = lines.pop()
    out = []
    for line in lines:
        crc, _, raw = line.partition(b" ")
        try:
            good = len(crc) == 8 and int(crc, 16) == zlib.crc32(raw)
        except ValueError:
            good = False
        if good:
            fields = json.loads(raw.decode("ascii"))
            if isinstance(fields, dict) and isinstance(fields.get("ino"), int):
                old = fields["ino"]
                model_id = inomap.get(old)
                new = made.get(model_id) if model_id is not None else None
                fields["ino"] = new if new is not None else UNKNOWN_INO + old
                raw = json.dumps(
                    fields, separators=(",", ":"), ensure_ascii=True
                ).encode("ascii")
                line = b"%08x %s" % (zlib.crc32(raw), raw)
        out.append(line)
    out.append(tail)
    return b"\n".join(out)


def materialise(model: Model, state: CrashState, path: str) -> None:
    """Write ``state`` out as a real tree at ``path`` (which must not exist)."""
    items = model.walk(state)
    assert items is not None, "not a tree"
    os.mkdir(path, 0o755)
    made: Dict[Id, int] = {}
    first_name: Dict[Id, str] = {}
    journals: List[Tuple[str, Inode]] = []
    dirs: List[Tuple[str, int]] = []
    for rel, i, node in items:
        full = os.path.join(path, *rel)
        if node.kind == "dir":
            os.mkdir(full, 0o700)
            dirs.append((full, node.mode))
        elif node.kind == "link":
            assert isinstance(node.payload, str)
            os.symlink(node.payload, full)
        elif i in first_name:
            os.link(first_name[i], full)
            continue
        else:
            assert isinstance(node.payload, bytes)
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if node.inomap is None:
                    os.write(fd, node.payload)
                else:
                    journals.append((full, node))
            finally:
                os.close(fd)
            os.chmod(full, node.mode)
            first_name[i] = full
        made[i] = os.lstat(full).st_ino
    for full, node in journals:
        assert isinstance(node.payload, bytes)
        assert node.inomap is not None
        with open(full, "r+b") as f:
            f.write(_translate(node.payload, node.inomap, made))
    for full, mode in reversed(dirs):
        os.chmod(full, mode)


def remove_tree(path: str) -> None:
    """Remove a materialised tree, read-only directories included."""
    for top, dirs, _files in os.walk(path):
        for name in dirs:
            full = os.path.join(top, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path)


# -- recording a real run ------------------------------------------------------------


Ino = Tuple[int, int]
"""A real inode: ``(st_dev, st_ino)`` (a workload may hold a second file system)."""
Real = Dict[Tuple[str, ...], Tuple[Ino, str, int, Payload]]
"""A scan of a real tree: ``path -> ((st_dev, st_ino), kind, mode, payload)``."""


def _ino(st: os.stat_result) -> Ino:
    return (st.st_dev, st.st_ino)


def _scan(root: str, cache: Dict[Tuple[int, ...], bytes]) -> Real:
    out: Real = {}

    def visit(path: str, rel: Tuple[str, ...]) -> None:
        with os.scandir(path) as it:
            entries = list(it)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            sub = (*rel, entry.name)
            if stat.S_ISDIR(st.st_mode):
                out[sub] = (_ino(st), "dir", stat.S_IMODE(st.st_mode), None)
                visit(entry.path, sub)
            elif stat.S_ISLNK(st.st_mode):
                out[sub] = (_ino(st), "link", 0o777, os.readlink(entry.path))
            else:
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                data = cache.get(key)
                if data is None:
                    with open(entry.path, "rb") as f:
                        data = f.read()
                    cache[key] = data
                out[sub] = (_ino(st), "file", stat.S_IMODE(st.st_mode), data)

    visit(root, ())
    return out


@attrs.frozen
class Call:
    """One OS-layer call as logged: its number among mutating calls, name and paths."""

    point: int
    name: str
    mutating: bool
    paths: Tuple[str, ...]

    def __str__(self) -> str:
        return f"[{self.point}] {self.name} {' '.join(self.paths)}"


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


class Recorder:
    """An OS-layer hook that drives a :class:`Model` from a real run under ``root``.

    The tree under ``root`` when it is made is the durable initial state.

    Attributes:
        model: the model.
        log: every call, with absolute paths.
        calls: mutating calls so far.
        commit_write: the mutating call (1-based) that wrote the
            ``committing`` record; crash points before it must recover to
            the before-tree.
        ack: the first crash point at which the commit counts as
            acknowledged: the ``committed`` record written and its fsync
            returned (or, if there is no fsync, the engine moved on).
        committed_write: the mutating call that wrote the ``committed`` record.
        bypass: changes that did not go through the seam, with whether they
            are expected (the staging directory and its lock file created by
            ``os`` calls, a file written through ``os.fdopen`` after
            ``open_file``).
        fixed: if set, what every crash point must recover to (a recorded
            recovery: it must not change the outcome of the crash it repairs).
        final: if set, what the last crash point must recover to (a commit
            that failed and rolled back, as the caller was told).
        fail_at: the mutating call (1-based) made to fail with ``EIO``.
    """

    def __init__(
        self, root: str, apm: str = "ordered", fail_at: Optional[int] = None
    ) -> None:
        self.root = os.path.abspath(root)
        self._cache: Dict[Tuple[int, ...], bytes] = {}
        real = _scan(self.root, self._cache)
        st = os.stat(self.root)
        self.ino_map: Dict[Ino, Id] = {_ino(st): 0}
        entries: Entries = {0: {}}
        inodes: Dict[Id, Inode] = {0: Inode("dir", stat.S_IMODE(st.st_mode), None)}
        ids: Dict[Tuple[str, ...], Id] = {(): 0}
        for path in sorted(real, key=len):
            ino, kind, mode, payload = real[path]
            parent = ids[path[:-1]]
            i = self.ino_map.get(ino)
            if i is None:
                i = len(inodes)
                self.ino_map[ino] = i
                inodes[i] = Inode(kind, mode, payload)
                if kind == "dir":
                    entries[i] = {}
            entries[parent][path[-1]] = i
            ids[path] = i
        self._journals: Set[Id] = set()
        for path, i in ids.items():
            if len(path) == 2 and path[0] == STAGING and path[1].endswith(".journal"):
                # A journal left by a crash: its inode numbers are this tree's.
                self._journals.add(i)
                inodes[i] = inodes[i]._replace(inomap=self._inomap())
        self.model = Model(0, entries, inodes, apm)
        self.log: List[Call] = []
        self.calls = 0
        self.commit_write: Optional[int] = None
        self.committed_write: Optional[int] = None
        self.ack: Optional[int] = None
        self.fixed: Optional[str] = None
        self.final: Optional[str] = None
        self.fail_at = fail_at
        self.bypass: List[Tuple[str, bool]] = []
        self._writable: Set[Id] = set()
        self._ack_of: Optional[Tuple[Id, int]] = None
        self._existed = False

    # -- the hook ------------------------------------------------------------

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        mutating = name in _os.MUTATING
        if phase == "before":
            if mutating:
                self._reconcile()
                self.model.point()
                self.calls += 1
                if self.calls == self.fail_at:
                    self.log.append(Call(self.calls, name, True, ("(failed: EIO)",)))
                    raise OSError(errno.EIO, f"injected at {name} #{self.calls}")
                self._check_ack(name, args)
                if name == "open_file":
                    d, entry = args[0], args[1]
                    self._existed = self.model.lookup(self._dir(d), entry) is not None
            self.log.append(Call(self.calls, name, mutating, self._paths(name, args)))
            return
        if mutating:
            getattr(self, f"_on_{name}")(*args)

    def _inomap(self) -> Dict[int, Id]:
        return {ino: i for (_dev, ino), i in self.ino_map.items()}

    def _check_ack(self, name: str, args: Tuple[Any, ...]) -> None:
        """After the ``committed`` record: the append returns now, unless this is its fsync."""
        if self._ack_of is None or self.ack is not None:
            return
        i, written = self._ack_of
        if self.calls == written + 1 and not (
            name == "fsync" and self._fd(args[0]) == i
        ):
            self.ack = written

    def finish(self) -> None:
        """The run is over: adopt what happened since the last call and mark the last point."""
        self._reconcile()
        self.model.point()

    def acknowledged(self) -> None:
        """``commit()`` returned: the commit is acknowledged now at the latest."""
        if self.ack is None:
            self.ack = self.calls

    def verdict(self, k: int) -> str:
        """What recovery must give at crash point ``k``: ``before``, ``after`` or ``either``."""
        if self.fixed is not None:
            return self.fixed
        if self.final is not None and k == len(self.model.points) - 1:
            return self.final
        if self.commit_write is None or k < self.commit_write:
            return "before"
        if self.ack is not None and k >= self.ack:
            return "after"
        return "either"

    # -- helpers -----------------------------------------------------------------

    def _paths(self, name: str, args: Tuple[Any, ...]) -> Tuple[str, ...]:
        out: List[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if isinstance(a, Dir):
                if i + 1 < len(args) and isinstance(args[i + 1], str):
                    out.append(os.path.join(a.path, args[i + 1]))
                    i += 1
                else:
                    out.append(a.path)
            elif isinstance(a, str):
                out.append(a if name != "symlink" else f"(target {a!r})")
            elif isinstance(a, int) and name in ("write", "fsync", "close", "copy_fd"):
                out.append(_fd_path(a))
            elif isinstance(a, (bytes, bytearray, memoryview)):
                out.append(f"({len(a)} bytes)")
            i += 1
        return tuple(out)

    def _dir(self, d: Dir) -> Id:
        ino = _ino(os.fstat(d.fd))
        try:
            return self.ino_map[ino]
        except KeyError:
            raise AssertionError(
                f"a directory the model does not know: {d.path!r}"
            ) from None

    def _fd(self, fd: int) -> Id:
        ino = _ino(os.fstat(fd))
        try:
            return self.ino_map[ino]
        except KeyError:
            raise AssertionError(
                f"a file the model does not know: {_fd_path(fd)!r}"
            ) from None

    def _name(self, d: Dir, name: str) -> str:
        return os.path.join(d.path, name)

    def _new(self, d: Dir, name: str) -> Tuple[Id, os.stat_result]:
        st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
        i = self.model.new_id()
        self.ino_map[_ino(st)] = i
        return i, st

    def _add_new(self, d: Dir, name: str, kind: str, payload: Payload = None) -> Id:
        i, st = self._new(d, name)
        mode = 0o777 if kind == "link" else stat.S_IMODE(st.st_mode)
        if kind == "file":
            payload = b""
        parent = self._dir(d)
        self.model.add(
            f"{'create' if kind == 'file' else kind} {self._name(d, name)}",
            [(NEW, i, Inode(kind, mode, payload)), (ENTRY, parent, name, i)],
            [parent],
            [(parent, name)],
        )
        return i

    def _content(self, i: Id, fd: int, label: str) -> None:
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            data = f.read()
        node = self.model.inodes[i]
        if data == node.payload:
            return
        journal = i in self._journals
        # The journal holds bare st_ino numbers: on two file systems they
        # could clash, which the workloads' small second file system makes
        # unlikely (the last one mapped wins).
        inomap = self._inomap() if journal else None
        prev = node.payload if isinstance(node.payload, bytes) else b""
        self.model.write(i, data, journal=journal, inomap=inomap, label=label)
        if journal and data.startswith(prev):
            delta = data[len(prev) :]
            if _COMMITTING in delta and self.commit_write is None:
                self.commit_write = self.calls
            if _COMMITTED in delta:
                self.committed_write = self.calls
                self._ack_of = (i, self.calls)

    # -- one handler per mutating call -----------------------------------------

    def _on_mkdir(self, d: Dir, name: str, mode: int) -> None:
        self._add_new(d, name, "dir")

    def _on_symlink(self, target: str, d: Dir, name: str) -> None:
        self._add_new(d, name, "link", target)

    def _on_rmdir(self, d: Dir, name: str) -> None:
        self.model.unlink(self._dir(d), name, label=f"rmdir {self._name(d, name)}")

    def _on_unlink(self, d: Dir, name: str) -> None:
        self.model.unlink(self._dir(d), name, label=f"unlink {self._name(d, name)}")

    def _on_rename(self, sd: Dir, sn: str, dd: Dir, dn: str) -> None:
        self.model.rename(
            self._dir(sd),
            sn,
            self._dir(dd),
            dn,
            label=f"rename {self._name(sd, sn)} -> {self._name(dd, dn)}",
        )

    _on_rename_noreplace = _on_rename

    def _on_exchange(self, sd: Dir, sn: str, dd: Dir, dn: str) -> None:
        self.model.exchange(
            self._dir(sd),
            sn,
            self._dir(dd),
            dn,
            label=f"exchange {self._name(sd, sn)} <-> {self._name(dd, dn)}",
        )

    def _on_link(self, sd: Dir, sn: str, dd: Dir, dn: str) -> None:
        self.model.link(
            self._dir(sd),
            sn,
            self._dir(dd),
            dn,
            label=f"link {self._name(sd, sn)} -> {self._name(dd, dn)}",
        )

    def _add_copy(self, d: Dir, name: str, label: str) -> None:
        """A new file whose content came whole from elsewhere (not durable yet)."""
        i = self._add_new(d, name, "file")
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=d.fd)
        try:
            self._content(i, fd, label)
        finally:
            os.close(fd)

    def _on_clone_into(self, src: int, d: Dir, name: str) -> None:
        # macOS only (fclonefileat): a new file with the source's content.
        self._add_copy(d, name, f"clone {_fd_path(src)} -> {self._name(d, name)}")

    def _on_link_in(self, src: str, d: Dir, name: str, follow: bool) -> None:
        # A file from outside the tree gets a name in it: to the model, a new
        # file with that content (not durable before an fsync, to be safe).
        del follow
        st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
        known = self.ino_map.get(_ino(st))
        if known is not None and known in self.model.inodes:
            # Linked in before (one cached file installed twice): another name.
            parent = self._dir(d)
            self.model.add(
                f"link {src} -> {self._name(d, name)}",
                [(ENTRY, parent, name, known)],
                [parent],
                [(parent, name)],
                also=[known],
            )
            return
        self._add_copy(d, name, f"link {src} -> {self._name(d, name)}")

    def _on_open_file(self, d: Dir, name: str, flags: int, mode: int = 0o666) -> None:
        parent = self._dir(d)
        if not self._existed and flags & os.O_CREAT:
            i = self._add_new(d, name, "file")
            if name.endswith(".journal") and os.path.basename(d.path) == STAGING:
                self._journals.add(i)
        else:
            found = self.model.lookup(parent, name)
            assert found is not None, (
                f"opened a name the model lacks: {self._name(d, name)!r}"
            )
            i = found
            if flags & os.O_TRUNC and self.model.inodes[i].payload:
                self.model.write(i, b"", label=f"truncate {self._name(d, name)}")
        if flags & (os.O_WRONLY | os.O_RDWR):
            self._writable.add(i)

    def _on_chmod(self, d: Dir, name: str, mode: int) -> None:
        i = self.model.lookup(self._dir(d), name)
        assert i is not None
        st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
        self.model.chmod(
            i, stat.S_IMODE(st.st_mode), label=f"chmod {self._name(d, name)} {mode:o}"
        )

    def _on_utime(self, d: Dir, name: str, ns: Tuple[int, int]) -> None:
        """Times are not compared by the oracle, nor used by recovery."""

    def _on_write(self, fd: int, data: bytes) -> None:
        self._content(self._fd(fd), fd, f"write {_fd_path(fd)} (+{len(data)} bytes)")

    def _on_copy_fd(self, src: int, dst: int, clone: bool = True) -> None:
        del clone
        self._content(self._fd(dst), dst, f"copy into {_fd_path(dst)}")

    def _on_fsync(self, fd: int) -> None:
        i = self._fd(fd)
        self.model.fsync(i)
        if self._ack_of is not None and self._ack_of == (i, self.calls - 1):
            self.ack = self.calls

    def _on_fsync_dir(self, d: Dir) -> None:
        self.model.fsync(self._dir(d))

    def _on_syncfs(self, d: Dir) -> None:
        self.model.syncfs()

    def _on_close(self, fd: int) -> None:
        """Closing changes nothing on disk."""

    # -- changes that bypassed the seam ----------------------------------------

    def _volatile(self) -> Dict[Tuple[str, ...], Tuple[Id, Inode]]:
        out: Dict[Tuple[str, ...], Tuple[Id, Inode]] = {}
        stack: List[Tuple[Tuple[str, ...], Id]] = [((), self.model.root)]
        while stack:
            path, d = stack.pop()
            for name, i in self.model.entries.get(d, {}).items():
                node = self.model.inodes[i]
                sub = (*path, name)
                out[sub] = (i, node)
                if node.kind == "dir":
                    stack.append((sub, i))
        return out

    def _bypassed(self, what: str, path: Tuple[str, ...], expected: bool) -> None:
        self.bypass.append((f"{what} {os.path.join(self.root, *path)}", expected))

    def _reconcile(self) -> None:
        """Adopt whatever changed on disk without going through the seam."""
        real = _scan(self.root, self._cache)
        model = self._volatile()
        ids: Dict[Tuple[str, ...], Id] = {(): self.model.root}
        gone = set()
        for path in sorted(model, key=len, reverse=True):
            i, node = model[path]
            r = real.get(path)
            if r is None or self.ino_map.get(r[0]) != i or r[1] != node.kind:
                parent = model[path[:-1]][0] if len(path) > 1 else self.model.root
                self.model.unlink(
                    parent, path[-1], label="(bypass) remove", bypass=True
                )
                self._bypassed("removed", path, expected=False)
                gone.add(path)
        alive = {i for p, (i, _n) in model.items() if p not in gone}
        for path in sorted(real, key=len):
            ino, kind, mode, payload = real[path]
            parent = ids[path[:-1]]
            if path in model and path not in gone:
                i, node = model[path]
                ids[path] = i
                if node.mode != mode:
                    self.model.chmod(i, mode, label="(bypass) chmod", bypass=True)
                    self._bypassed("mode changed", path, expected=False)
                if node.payload != payload:
                    assert isinstance(payload, bytes)
                    self.model.write(i, payload, label="(bypass) write", bypass=True)
                    self._bypassed("written", path, expected=i in self._writable)
                continue
            known = self.ino_map.get(ino)
            if known is not None and known in alive and kind == "file":
                self.model.add(
                    "(bypass) link",
                    [(ENTRY, parent, path[-1], known)],
                    [parent],
                    [(parent, path[-1])],
                    bypass=True,
                )
                self._bypassed("linked", path, expected=False)
                ids[path] = known
                continue
            start: Payload = b"" if kind == "file" else payload
            made = self.model.create(
                parent,
                path[-1],
                kind,
                mode,
                start,
                label=f"(bypass) create {kind}",
                bypass=True,
            )
            self.ino_map[ino] = ids[path] = made
            expected = path in ((STAGING,), (STAGING, "lock"))
            self._bypassed(f"created {kind}", path, expected=expected)
            if kind == "file" and payload:
                assert isinstance(payload, bytes)
                self.model.write(made, payload, label="(bypass) write", bypass=True)


# -- the durability call sites, and removing one -------------------------------------

_FSTX_DIR = os.path.dirname(os.path.abspath(fstx.__file__))
_THIN = (
    os.path.join(_FSTX_DIR, "_os.py"),
    os.path.join(_FSTX_DIR, "_tree.py"),
    os.path.join(_FSTX_DIR, "_platform", ""),
)
SYNC_CALLS = ("fsync", "fsync_dir", "syncfs")

Frame = Tuple[str, str, int]
"""``(file relative to the package, qualified function name, line)``."""


@attrs.frozen
class SyncCall:
    """One durability call as the engine made it: the call and the engine's frames, innermost first.

    The thin path layers (``_os``, ``_tree``, ``_platform``) are left out: the
    call site is the engine code that asked for the flush.
    """

    name: str
    frames: Tuple[Frame, ...]

    @property
    def site(self) -> Frame:
        """The line that asked for it."""
        return self.frames[0]

    @property
    def context(self) -> Optional[Frame]:
        """The innermost frame outside the site's module: which step of the protocol asked."""
        for frame in self.frames[1:]:
            if frame[0] != self.site[0]:
                return frame
        return None


def _qualname(frame: FrameType) -> str:
    code: CodeType = frame.f_code
    name = getattr(code, "co_qualname", None)  # Python 3.11+
    if isinstance(name, str):
        return name
    for value in frame.f_globals.values():
        if isinstance(value, type):
            func = value.__dict__.get(code.co_name)
            if func is not None and getattr(func, "__code__", None) is code:
                return f"{value.__qualname__}.{code.co_name}"
    return str(code.co_name)


def _engine_frames(frame: Optional[FrameType]) -> Tuple[Frame, ...]:
    out: List[Frame] = []
    f = frame
    while f is not None:
        filename = f.f_code.co_filename
        if filename.startswith(_FSTX_DIR) and not filename.startswith(_THIN):
            relative = os.path.relpath(filename, _FSTX_DIR)
            out.append((relative, _qualname(f), f.f_lineno))
        elif out:
            break
        f = f.f_back
    return tuple(out)


@contextlib.contextmanager
def sync_calls(
    *,
    syncfs: bool = True,
    skip: Optional[Callable[[SyncCall], bool]] = None,
    seen: Optional[List[SyncCall]] = None,
) -> Iterator[None]:
    """Wrap ``_os.fsync``, ``_os.fsync_dir`` and ``_os.syncfs`` for a ``with`` block.

    The engine looks these up on the module at each call, so swapping the
    module attributes is enough; nothing in the engine changes.

    Args:
        syncfs: False makes ``syncfs`` report "not supported" (as on macOS
            and Windows), so the engine takes its fsync-by-fsync path.
        skip: a call it returns True for is not made at all (removed from
            the engine, as a mutation): it returns as if done (``syncfs``
            says True), and the OS-layer hook does not see it.
        seen: every call that would be made is appended here.
    """
    originals: Dict[str, Callable[..., Any]] = {n: getattr(_os, n) for n in SYNC_CALLS}

    def wrap(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if name == "syncfs" and not syncfs:
                return False
            if skip is None and seen is None:
                return func(*args)
            made = SyncCall(name, _engine_frames(sys._getframe(1)))
            if seen is not None:
                seen.append(made)
            if skip is not None and skip(made):
                return True if name == "syncfs" else None
            return func(*args)

        return call

    for name, func in originals.items():
        setattr(_os, name, wrap(name, func))
    try:
        yield
    finally:
        for name, func in originals.items():
            setattr(_os, name, func)


# -- a recording of a workload, and checking its crash states -----------------------

PROTOCOLS = ("syncfs", "fsync")
"""How the engine makes things durable: one ``syncfs`` per barrier (Linux), or an
fsync per file and directory (where ``syncfs`` is missing)."""


def _plain(tree: Snapshot) -> Snapshot:
    return {p: (e[:3] if e[0] == "file" else e) for p, e in tree.items()}


@attrs.define
class Recording:
    """A workload's run, recorded.

    Attributes:
        name: the workload's name (and protocol).
        recorder: the recorder, holding the model, log and verdicts.
        before: the tree before (no inode identities).
        after: the tree after.
    """

    name: str
    recorder: Recorder
    before: Snapshot
    after: Snapshot

    @property
    def model(self) -> Model:
        """The recorder's model."""
        return self.recorder.model

    @property
    def points(self) -> int:
        """How many crash points (``0..N``)."""
        return len(self.model.points)

    def around(self, k: int, width: int = 6) -> str:
        """The logged mutating calls around crash point ``k``."""
        calls = [c for c in self.recorder.log if c.mutating]
        return "\n".join(f"  {c}" for c in calls[max(0, k - width) : k + 2])


SCENARIOS = ("commit", "first", "fail-apply", "fail-commit", "undo", "forward")
"""What is recorded of a workload:

- ``commit``: a clean commit, on a root where an earlier transaction left
  ``.fstx`` and its lock file;
- ``first``: the root's first transaction (``.fstx`` is created by it);
- ``fail-apply``: the commit fails (``EIO``) at its last call before the
  ``committed`` record, after every rename: it rolls back;
- ``fail-commit``: the fsync of the ``committed`` record fails: it rolls back
  after saying ``committing`` again;
- ``undo``: a kill -9 just before the ``committed`` record, then the
  recovery that undoes every step, recorded;
- ``forward``: a kill -9 just after the commit point, then the recovery that
  finishes the clean-up, recorded.
"""


class MountUnavailableError(Exception):
    """A tmpfs cannot be mounted here (not root, no ``mount``)."""


def _mount(where: str) -> None:
    os.makedirs(where, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", where],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise MountUnavailableError(
            done.stderr.strip() or f"mount exited {done.returncode}"
        )


def _unmount(where: str) -> None:
    done = subprocess.run(["umount", where], capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", where], capture_output=True, check=False)


def record(
    workload: Workload,
    base: str,
    *,
    protocol: str = "syncfs",
    scenario: str = "commit",
    skip: Optional[Callable[[SyncCall], bool]] = None,
    apm: str = "ordered",
    mount: Optional[str] = None,
) -> Recording:
    """Set ``workload`` up under ``base`` and record a durable run of it.

    Args:
        workload: what to run.
        base: an empty scratch directory (``root``, ``src`` and the like go in it).
        protocol: one of :data:`PROTOCOLS`.
        scenario: one of :data:`SCENARIOS`.
        skip: durability calls to remove (see :func:`sync_calls`).
        apm: the persistence model, one of :data:`APMS`.
        mount: a directory under the root to mount a tmpfs on first (a
            second device: staging of its own, in its own ``.fstx``).

    Raises:
        MountUnavailableError: ``mount`` was asked for and cannot be had.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}")
    tag = "" if apm == "ordered" else f", {apm}"
    name = f"{workload.name}[{protocol}, {scenario}{tag}]"
    if scenario in ("commit", "first"):
        return _record_commit(
            workload,
            base,
            name,
            protocol=protocol,
            fresh=scenario == "first",
            skip=skip,
            apm=apm,
            mount=mount,
        )
    # The other scenarios start from a clean run, to know where to fail or crash.
    clean = _record_commit(
        workload,
        os.path.join(base, "clean"),
        name,
        protocol=protocol,
        fresh=False,
        skip=skip,
        apm=apm,
        mount=mount,
    )
    committed = clean.recorder.committed_write
    assert committed is not None, f"{name}: no commit record"
    assert clean.recorder.ack is not None, f"{name}: never acknowledged"
    if scenario == "fail-apply":
        return _record_commit(
            workload,
            os.path.join(base, "run"),
            name,
            protocol=protocol,
            fresh=False,
            skip=skip,
            apm=apm,
            mount=mount,
            fail_at=committed - 1,
        )
    if scenario == "fail-commit":
        if clean.recorder.ack == committed:
            raise ValueError(f"{name}: the committed record has no fsync to fail")
        return _record_commit(
            workload,
            os.path.join(base, "run"),
            name,
            protocol=protocol,
            fresh=False,
            skip=skip,
            apm=apm,
            mount=mount,
            fail_at=committed + 1,
        )
    k = committed - 1 if scenario == "undo" else clean.recorder.ack
    return _record_recovery(
        clean, k, os.path.join(base, "run"), name, protocol=protocol, skip=skip, apm=apm
    )


def _record_commit(
    workload: Workload,
    base: str,
    name: str,
    *,
    protocol: str,
    fresh: bool,
    skip: Optional[Callable[[SyncCall], bool]],
    apm: str,
    mount: Optional[str],
    fail_at: Optional[int] = None,
) -> Recording:
    root, src = os.path.join(base, "root"), os.path.join(base, "src")
    where = os.path.join(root, mount) if mount is not None else None
    if where is not None:
        _mount(where)
    try:
        workload.setup(root, src)
        if not fresh:
            fstx.transaction(root, durability="none").rollback()
        expected = _plain(workload.expected(root, src))
        before = snapshot(root, inodes=False)
        recorder = Recorder(root, apm, fail_at)
        with sync_calls(syncfs=protocol == "syncfs", skip=skip), installed(recorder):
            try:
                with fstx.transaction(root, durability="full") as tx:
                    workload.plan(tx, src)
            except fstx.CommitError:
                if fail_at is None:
                    raise
                recorder.final = "before"  # the caller was told: rolled back
            else:
                assert fail_at is None, (
                    f"{name}: the injected failure did not fail the commit"
                )
                recorder.acknowledged()
        recorder.finish()
        after = snapshot(root, inodes=False)
        want = before if fail_at is not None else expected
        assert after == want, f"{name}: the run itself did not give the expected tree"
        assert staging_leftovers(root) == [], (
            f"{name}: the run itself left staging behind"
        )
        assert not (where and os.path.exists(os.path.join(where, STAGING))), name
        return Recording(name, recorder, before, expected)
    finally:
        if where is not None:
            _unmount(where)


def _record_recovery(
    clean: Recording,
    k: int,
    base: str,
    name: str,
    *,
    protocol: str,
    skip: Optional[Callable[[SyncCall], bool]],
    apm: str,
) -> Recording:
    """Crash ``clean``'s run at point ``k`` (kill -9), then record the recovery."""
    os.makedirs(base)
    state = clean.model.state(k, "process")
    # What a recovery without interruption gives is the outcome every crash
    # during the recovery must keep.
    probe = os.path.join(base, "probe")
    materialise(clean.model, state, probe)
    fstx.recover(probe)
    got = snapshot(probe, inodes=False)
    remove_tree(probe)
    outcome = (
        "before" if got == clean.before else "after" if got == clean.after else None
    )
    assert outcome is not None, f"{name}: recovering crash point {k} gave neither tree"
    root = os.path.join(base, "root")
    materialise(clean.model, state, root)
    recorder = Recorder(root, apm)
    recorder.fixed = outcome
    with sync_calls(syncfs=protocol == "syncfs", skip=skip), installed(recorder):
        fstx.recover(root)
    recorder.finish()
    return Recording(name, recorder, clean.before, clean.after)


@attrs.define
class Stats:
    """What a check of a recording's crash states did."""

    name: str
    calls: int = 0
    points: int = 0
    groups: int = 0
    generated: Dict[str, int] = attrs.Factory(dict)
    not_a_tree: int = 0
    unique: int = 0
    checked: int = 0
    fresh: int = 0
    by_verdict: Dict[str, int] = attrs.Factory(dict)
    bypass: List[str] = attrs.Factory(list)
    failures: List[str] = attrs.Factory(list)
    seconds: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        """A JSON-ready summary."""
        return attrs.asdict(self)

    def line(self) -> str:
        """One line for the test output."""
        gen = sum(self.generated.values())
        kinds = ", ".join(f"{k} {v}" for k, v in self.generated.items())
        return (
            f"{self.name}: {self.calls} calls, {self.points} crash points, "
            f"{self.groups} groups; {gen} states generated ({kinds}), "
            f"{self.unique} unique, {self.checked} checked "
            f"({self.fresh} in a fresh interpreter), {len(self.failures)} failing, "
            f"{self.seconds:.1f} s"
        )


_FRESH = (
    "import fstx, pickle, sys; "
    "sys.stdout.buffer.write(pickle.dumps(fstx.recover(sys.argv[1])))"
)


def _recover_fresh(path: str) -> fstx.RecoveryReport:
    done = subprocess.run(
        [sys.executable, "-c", _FRESH, path],
        capture_output=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(
            done.stderr.decode(errors="replace").strip().splitlines()[-1]
        )
    report = pickle.loads(done.stdout)
    assert isinstance(report, fstx.RecoveryReport)
    return report


def _diff(got: Snapshot, want: Snapshot) -> str:
    lines = []
    for path in sorted(set(got) | set(want)):
        a, b = got.get(path), want.get(path)
        if a != b:
            lines.append(f"    {path}: {_short(a)} (expected {_short(b)})")
    return "\n".join(lines[:12]) + ("\n    ..." if len(lines) > 12 else "")


def _short(entry: Optional[Tuple[Any, ...]]) -> str:
    if entry is None:
        return "absent"
    if entry[0] == "file":
        data = entry[2]
        return f"file {entry[1]:o} {data[:24]!r}{'...' if len(data) > 24 else ''}"
    if entry[0] == "dir":
        return f"dir {entry[1]:o}"
    return f"link -> {entry[1]!r}"


class Checker:
    """Materialise crash states, recover them, and judge the result.

    Args:
        recording: the recorded run.
        work: an empty directory to materialise states in.
        keep: where to copy the first failing state (and its recovered tree).
        fresh_every: recover one checked state in this many in a new
            interpreter (0: never).
    """

    def __init__(
        self,
        recording: Recording,
        work: str,
        keep: Optional[str] = None,
        fresh_every: int = 0,
    ) -> None:
        self.rec = recording
        self.work = work
        self.keep = keep
        self.fresh_every = fresh_every
        self.seen: Set[Tuple[Any, ...]] = set()
        self.stats = Stats(
            recording.name,
            calls=recording.recorder.calls,
            points=recording.points,
            groups=len(recording.model.groups),
            bypass=[what for what, _ in recording.recorder.bypass],
        )
        self._n = 0

    def run(
        self,
        points: Optional[Iterable[int]] = None,
        kinds: Sequence[str] = KINDS,
        *,
        stop_at_first: bool = False,
        max_failures: int = 3,
    ) -> Stats:
        """Check every state of ``kinds`` at ``points`` (all by default), kind by kind."""
        start = time.monotonic()
        chosen = list(range(self.rec.points) if points is None else points)
        model = self.rec.model
        try:
            for kind in kinds:
                for k in chosen:
                    for state in model.states(k, [kind]):
                        self.stats.generated[kind] = (
                            self.stats.generated.get(kind, 0) + 1
                        )
                        problem = self.check(state)
                        if problem is None:
                            continue
                        self.stats.failures.append(problem)
                        if stop_at_first or len(self.stats.failures) >= max_failures:
                            return self.stats
        finally:
            self.stats.seconds += time.monotonic() - start
        return self.stats

    def check(self, state: CrashState) -> Optional[str]:
        """Check one state (skipped if an equivalent one was checked); a problem, or None."""
        verdict = self.rec.recorder.verdict(state.point)
        key = self.rec.model.key(state)
        if key is None:
            self.stats.not_a_tree += 1
            return None
        if (key, verdict) in self.seen:
            return None
        self.seen.add((key, verdict))
        self.stats.unique += 1
        self._n += 1
        path = os.path.join(self.work, f"s{self._n}")
        materialise(self.rec.model, state, path)
        try:
            problem = self._judge(
                path,
                verdict,
                fresh=bool(self.fresh_every and self._n % self.fresh_every == 0),
            )
            if problem is not None:
                where = (
                    f"{self.rec.name}: crash point {state.point} ({state.kind}: "
                    f"{state.detail}); must recover to {verdict}: {problem}\n"
                    f"  calls around it:\n{self.rec.around(state.point)}"
                )
                if self.keep is not None and not self.stats.failures:
                    kept = os.path.join(self.keep, f"failing-{self._n}")
                    shutil.copytree(path, kept, symlinks=True)
                    where += f"\n  recovered tree kept at {kept}"
                return where
            return None
        finally:
            remove_tree(path)

    def _judge(self, path: str, verdict: str, *, fresh: bool) -> Optional[str]:
        self.stats.checked += 1
        self.stats.by_verdict[verdict] = self.stats.by_verdict.get(verdict, 0) + 1
        try:
            if fresh:
                self.stats.fresh += 1
                _recover_fresh(path)
            else:
                fstx.recover(path)
        except Exception as exc:  # any failure of recovery is the finding
            return f"recover raised {exc!r}"
        got = snapshot(path, inodes=False)
        before, after = got == self.rec.before, got == self.rec.after
        if verdict == "before" and not before:
            return "not the before-tree:\n" + _diff(got, self.rec.before)
        if verdict == "after" and not after:
            return "not the after-tree:\n" + _diff(got, self.rec.after)
        if not (before or after):
            return "neither before nor after; against after:\n" + _diff(
                got, self.rec.after
            )
        left = staging_leftovers(path)
        if left:
            return f"staging not clean after recovery: {left}"
        try:
            again = fstx.recover(path)
        except Exception as exc:  # as above
            return f"a second recover raised {exc!r}"
        if again != fstx.RecoveryReport() or snapshot(path, inodes=False) != got:
            return f"a second recover was not a no-op: {again}"
        return None


# -- a second device, and reports -----------------------------------------------------

SECOND_DEVICE = Workload(
    name="second-device",
    before={
        "mnt/pkg/a.py": b"a, v1\n",
        "mnt/old.txt": b"goes\n",
        "top.txt": File(b"moves onto the mount\n", 0o600),
    },
    source={},
    ops=(
        Write("mnt/pkg/a.py", b"a, v2\n"),
        Delete("mnt/old.txt"),
        Rename("top.txt", "mnt/top.txt"),
        Write("mnt/new/b.py", b"b\n"),
    ),
)
"""A tmpfs mounted at ``mnt`` (record with ``mount="mnt"``): staging of its own in
``mnt/.fstx``, which only the journal names, and a rename across devices."""

REPORT_ENV = "FSTX_CRASHMODEL_REPORT"
"""A directory to write one JSON summary per checked recording into."""


def report(stats: Stats) -> None:
    """Write ``stats`` as JSON into ``$FSTX_CRASHMODEL_REPORT`` (if set)."""
    where = os.environ.get(REPORT_ENV)
    if not where:
        return
    os.makedirs(where, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in stats.name)
    with open(os.path.join(where, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(stats.as_dict(), f, indent=1, sort_keys=True)


def summarise(where: str) -> Dict[str, int]:
    """Totals over the JSON reports in ``where``."""
    totals: Counter[str] = Counter()
    for name in sorted(os.listdir(where)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(where, name), encoding="utf-8") as f:
            one = json.load(f)
        totals["recordings"] += 1
        for key in (
            "calls",
            "points",
            "groups",
            "unique",
            "checked",
            "fresh",
            "not_a_tree",
        ):
            totals[key] += one[key]
        totals["generated"] += sum(one["generated"].values())
        for kind, n in one["generated"].items():
            totals[f"generated {kind}"] += n
        totals["failing"] += len(one["failures"])
    return dict(totals)


if __name__ == "__main__":  # pragma: no cover - a reporting aid
    for key, value in summarise(sys.argv[1]).items():
        print(f"{key}: {value}")
