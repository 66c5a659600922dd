"""Transaction workloads for the scenario suites, and a pure model that predicts them.

A workload builds a before-tree under the root and a source tree outside it
(:meth:`Workload.setup`), plans a fixed list of operations on a transaction
(:meth:`Workload.plan`), and predicts the after-tree (:meth:`Workload.expected`)
by running the same operations on :class:`TreeModel`, a dictionary of
:func:`treeutil.snapshot` entries that knows fstx's planning rules and nothing
of its engine.

Model entries have the snapshot's shape. A file that the transaction leaves
in place (or only renames or chmods) keeps its ``(st_ino, st_mtime_ns)``, so
a comparison proves it is the very same file; a new file (written or copied)
has none, since its inode is not known in advance. :func:`project` drops the
identity of such files from a real snapshot before comparing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
import tempfile
import warnings
from collections import deque
from typing import (
    Any,
    Deque,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
)

import attrs

import fstx
from fstx import _commit, _journal, _os
from treeutil import Entry, Snapshot, installed, snapshot

Rel = Tuple[str, ...]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()
"""The process umask, which new files and directories are created under."""
STAGING = ".fstx"
_MAX_SYMLINKS = 40


class ModelPlanError(Exception):
    """The model refuses an operation: fstx must raise :class:`fstx.PlanError`."""


def _key(rel: Rel) -> str:
    return "/".join(rel)


def _parts(text: str) -> List[str]:
    return [p for p in text.split("/") if p not in ("", ".")]


def read_outside(path: str, *, follow: bool) -> Dict[Rel, Entry]:
    """A tree outside the root as model entries, keyed relative to ``path`` (``()`` is itself).

    Raises:
        ModelPlanError: ``path`` does not exist (fstx refuses to copy it).
    """
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise ModelPlanError(f"no source {path!r}") from None
    out: Dict[Rel, Entry] = {}

    def visit(full: str, rel: Rel, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(full))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", mode)
            for name in sorted(os.listdir(full)):
                child = os.path.join(full, name)
                visit(
                    child, (*rel, name), os.stat(child) if follow else os.lstat(child)
                )
        else:
            with open(full, "rb") as f:
                out[rel] = ("file", mode, f.read())

    visit(path, (), st)
    return out


@attrs.define
class TreeModel:
    """The tree under a root as fstx plans it, kept in memory.

    Attributes:
        root: the root's absolute path (absolute symlink targets are judged by it).
        entries: snapshot-shaped entries by ``/``-joined path.
    """

    root: str
    entries: Dict[str, Entry]

    @classmethod
    def of(cls, root: str | os.PathLike[str]) -> TreeModel:
        """The model of the tree now under ``root``, with every file's identity."""
        return cls(os.path.abspath(os.fspath(root)), snapshot(root))

    def clone(self) -> TreeModel:
        """An independent copy."""
        return TreeModel(self.root, dict(self.entries))

    # -- lookups -------------------------------------------------------------

    def get(self, rel: Rel) -> Optional[Entry]:
        """The entry at ``rel`` (None: absent)."""
        return self.entries.get(_key(rel))

    def subtree(self, rel: Rel) -> Dict[Rel, Entry]:
        """``rel`` and everything below it, keyed relative to ``rel``."""
        key = _key(rel)
        prefix = key + "/"
        out: Dict[Rel, Entry] = {}
        for path, entry in self.entries.items():
            if path == key:
                out[()] = entry
            elif path.startswith(prefix):
                out[tuple(path[len(prefix) :].split("/"))] = entry
        return out

    def _inside(self, text: str) -> Optional[str]:
        for base in (self.root, os.path.realpath(self.root)):
            if text == base:
                return ""
            if text.startswith(base.rstrip("/") + "/"):
                return text[len(base.rstrip("/")) + 1 :]
        return None

    def resolve(self, path: str, *, follow_last: bool = False) -> Rel:
        """Where ``path`` leads in the planned tree, as fstx resolves it.

        Symlinks in parent components are followed (and the last one too with
        ``follow_last``); a dangling one leads to its target's name.

        Raises:
            ModelPlanError: empty, outside the root, through a file, the root
                itself, or inside the staging directory.
        """
        if not path:
            raise ModelPlanError("empty path")
        if os.path.isabs(path):
            inner = self._inside(path)
            if inner is None:
                raise ModelPlanError(f"{path!r} is outside the root")
            path = inner
        todo: Deque[str] = deque(_parts(path))
        out: List[str] = []
        links = 0
        while todo:
            name = todo.popleft()
            if name == "..":
                if not out:
                    raise ModelPlanError("'..' leaves the root")
                out.pop()
                continue
            cand = (*out, name)
            if not todo and not follow_last:
                out.append(name)
                break
            entry = self.get(cand)
            if entry is None:
                out.append(name)
                continue
            if entry[0] == "link":
                links += 1
                if links > _MAX_SYMLINKS:
                    raise ModelPlanError("too many symlinks")
                target = entry[1]
                if os.path.isabs(target):
                    inner = self._inside(target)
                    if inner is None:
                        raise ModelPlanError(f"symlink {cand!r} leads outside")
                    out = []
                    target = inner
                todo.extendleft(reversed(_parts(target)))
                continue
            if todo and entry[0] != "dir":
                raise ModelPlanError(f"{cand!r} is not a directory")
            out.append(name)
        rel = tuple(out)
        if not rel:
            raise ModelPlanError("the root itself")
        if rel[0] == STAGING:
            raise ModelPlanError("inside the staging directory")
        return rel

    # -- changes -------------------------------------------------------------

    def set_tree(self, rel: Rel, tree: Dict[Rel, Entry]) -> None:
        """Replace ``rel`` and its subtree by ``tree`` (keyed relative to ``rel``)."""
        self.remove(rel)
        for sub, entry in tree.items():
            self.entries[_key((*rel, *sub))] = entry

    def remove(self, rel: Rel) -> None:
        """Forget ``rel`` and its subtree."""
        key = _key(rel)
        prefix = key + "/"
        for path in [p for p in self.entries if p == key or p.startswith(prefix)]:
            del self.entries[path]

    def _target(self, rel: Rel, *, is_dir: bool) -> Optional[Entry]:
        existing = self.get(rel)
        if existing is not None and (existing[0] == "dir" or is_dir):
            raise ModelPlanError(
                f"{rel!r}: a directory and a file would replace each other"
            )
        return existing

    def _ensure_parents(self, rel: Rel) -> None:
        for i in range(1, len(rel)):
            if self.get(rel[:i]) is None:
                self.entries[_key(rel[:i])] = ("dir", 0o777 & ~UMASK)

    def write(self, path: str, data: bytes, mode: Optional[int]) -> None:
        """``tx.write_bytes(path, data, mode=mode)``."""
        rel = self.resolve(path)
        existing = self._target(rel, is_dir=False)
        self._ensure_parents(rel)
        if mode is None:
            kept = existing is not None and existing[0] == "file"
            mode = existing[1] if existing is not None and kept else 0o666 & ~UMASK
        self.set_tree(rel, {(): ("file", mode, data)})

    def copy_in(self, tree: Dict[Rel, Entry], dst: str) -> None:
        """``tx.copy(outside, dst)`` of a tree read by :func:`read_outside`."""
        rel = self.resolve(dst)
        self._target(rel, is_dir=tree[()][0] == "dir")
        self._ensure_parents(rel)
        self.set_tree(rel, tree)

    def copy(self, src: str, dst: str) -> None:
        """``tx.copy(src, dst)`` with ``src`` inside the root."""
        key = self.resolve(src)
        tree = self.subtree(key)
        if not tree:
            raise ModelPlanError(f"no source {src!r}")
        is_dir = tree[()][0] == "dir"
        rel = self.resolve(dst)
        self._target(rel, is_dir=is_dir)
        if is_dir and rel[: len(key)] == key:
            raise ModelPlanError("a directory copied into itself")
        self._ensure_parents(rel)
        self.set_tree(rel, {sub: _fresh(e) for sub, e in tree.items()})

    def rename(self, src: str, dst: str) -> None:
        """``tx.rename(src, dst)``: identities travel with the items."""
        key = self.resolve(src)
        tree = self.subtree(key)
        if not tree:
            raise ModelPlanError(f"no source {src!r}")
        rel = self.resolve(dst)
        self._target(rel, is_dir=tree[()][0] == "dir")
        if rel == key:
            return
        if rel[: len(key)] == key:
            raise ModelPlanError("a directory moved into itself")
        self._ensure_parents(rel)
        self.remove(key)
        self.set_tree(rel, tree)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        """``tx.delete(path, missing_ok=...)``."""
        rel = self.resolve(path)
        if self.get(rel) is None:
            if not missing_ok:
                raise ModelPlanError(f"nothing to delete at {path!r}")
            return
        self.remove(rel)

    def mkdir(self, path: str, mode: int) -> None:
        """``tx.mkdir(path, mode=mode)``."""
        rel = self.resolve(path)
        existing = self.get(rel)
        if existing is not None:
            if existing[0] != "dir":
                raise ModelPlanError(f"a file is in the way of {path!r}")
            return
        self._ensure_parents(rel)
        self.entries[_key(rel)] = ("dir", mode & ~UMASK)

    def chmod(self, path: str, mode: int) -> None:
        """``tx.chmod(path, mode)``: identity is kept."""
        rel = self.resolve(path)
        existing = self.get(rel)
        if existing is None or existing[0] == "link":
            raise ModelPlanError(f"nothing to chmod at {path!r}")
        self.entries[_key(rel)] = (existing[0], mode, *existing[2:])

    def adopt(self, actual: Snapshot) -> None:
        """Take the identities of new files from ``actual`` (after checking it matches)."""
        for path, entry in self.entries.items():
            if entry[0] == "file" and len(entry) == 3:
                self.entries[path] = actual[path]


def _fresh(entry: Entry) -> Entry:
    return entry[:3] if entry[0] == "file" else entry


def without_identity(tree: Snapshot) -> Snapshot:
    """``tree`` with every file's identity dropped (to compare with another copy of it)."""
    return {path: _fresh(entry) for path, entry in tree.items()}


def project(actual: Snapshot, expected: Snapshot) -> Snapshot:
    """``actual`` without the identities that ``expected`` does not predict."""
    out: Snapshot = {}
    for path, entry in actual.items():
        want = expected.get(path)
        if (
            entry[0] == "file"
            and want is not None
            and want[0] == "file"
            and len(want) == 3
        ):
            out[path] = entry[:3]
        else:
            out[path] = entry
    return out


def tree_of(root: str | os.PathLike[str], expected: Snapshot) -> Snapshot:
    """The real tree under ``root``, shaped for comparison with ``expected``."""
    return project(snapshot(root), expected)


# -- operations: one description drives both the transaction and the model ---


def _outside(src_dir: str, src: str) -> str:
    return os.path.join(src_dir, src)


@attrs.frozen
class Write:
    """``write_bytes`` (or ``write_text``, or ``open``) of ``data`` at ``path``."""

    path: str
    data: bytes
    mode: Optional[int] = None
    how: str = "bytes"  # "bytes", "text" or "open"

    def on_tx(self, tx: fstx.Transaction, src_dir: str) -> None:
        """Plan it on ``tx``."""
        if self.how == "text":
            tx.write_text(self.path, self.data.decode("utf-8"), mode=self.mode)
        elif self.how == "open":
            with tx.open(self.path, "wb", file_mode=self.mode) as f:
                f.write(self.data[:3])
                f.write(self.data[3:])
        else:
            tx.write_bytes(self.path, self.data, mode=self.mode)

    def on_model(self, model: TreeModel, src_dir: str) -> None:
        """Apply it to ``model``."""
        model.write(self.path, self.data, self.mode)


@attrs.frozen
class Copy:
    """``copy`` from the source tree (``outside``) or from inside the root."""

    src: str
    dst: str
    outside: bool = True
    follow: bool = False
    link: bool = False  # hard-link the files from outside (an install from a cache)

    def on_tx(self, tx: fstx.Transaction, src_dir: str) -> None:
        """Plan it on ``tx``."""
        src = _outside(src_dir, self.src) if self.outside else self.src
        tx.copy(src, self.dst, follow_symlinks=self.follow, link=self.link)

    def on_model(self, model: TreeModel, src_dir: str) -> None:
        """Apply it to ``model``."""
        if self.outside:
            model.copy_in(
                read_outside(_outside(src_dir, self.src), follow=self.follow), self.dst
            )
        else:
            assert not self.follow, "the model copies inside the root without following"
            model.copy(self.src, self.dst)


@attrs.frozen
class Rename:
    """``rename(src, dst)`` inside the root."""

    src: str
    dst: str

    def on_tx(self, tx: fstx.Transaction, src_dir: str) -> None:
        """Plan it on ``tx``."""
        tx.rename(self.src, self.dst)

    def on_model(self, model: TreeModel, src_dir: str) -> None:
        """Apply it to ``model``."""
        model.rename(self.src, self.dst)


@attrs.frozen
class Delete:
    """``delete(path, missing_ok=...)``."""

    path: str
    missing_ok: bool = False

    def on_tx(self, tx: fstx.Transaction, src_dir: str) -> None:
        """Plan it on ``tx``."""
        tx.delete(self.path, missing_ok=self.missing_ok)

    def on_model(self, model: TreeModel, src_dir: str) -> None:
        """Apply it to ``model``."""
        model.delete(self.path, missing_ok=self.missing_ok)


@attrs.frozen
class Mkdir:
    """``mkdir(path, mode=mode)``."""

    path: str
    mode: int = 0o777

    def on_tx(self, tx: fstx.Transaction, src_dir: str) -> None:
        """Plan it on ``tx``."""
        tx.mkdir(self.path, mode=self.mode)

    def on_model(self, model: TreeModel, src_dir: str) -> None:
        """Apply it to ``model``."""
        model.mkdir(self.path, self.mode)


@attrs.frozen
class Chmod:
    """``chmod(path, mode)``."""

    path: str
    mode: int

    def on_tx(self, tx: fstx.Transaction, src_dir: str) -> None:
        """Plan it on ``tx``."""
        tx.chmod(self.path, self.mode)

    def on_model(self, model: TreeModel, src_dir: str) -> None:
        """Apply it to ``model``."""
        model.chmod(self.path, self.mode)


Op = Union[Write, Copy, Rename, Delete, Mkdir, Chmod]


# -- building trees ----------------------------------------------------------


@attrs.frozen
class File:
    """A file to build, with its mode bits."""

    data: bytes
    mode: int = 0o644


@attrs.frozen
class Dir:
    """A directory to build, with its mode bits."""

    mode: int = 0o755


@attrs.frozen
class Link:
    """A symlink to build."""

    target: str


@attrs.frozen
class HardLink:
    """A second name for a file built earlier (path relative to the same base)."""

    to: str


Spec = Mapping[str, Union[bytes, File, Dir, Link, HardLink]]

# Fixed, distinct, past mtimes: a file restored from a backup must come back
# with its own, not with "now".
_EPOCH_NS = 1_600_000_000 * 10**9


def build(base: str | os.PathLike[str], spec: Spec) -> None:
    """Create ``spec`` under ``base`` in order; parents default to mode 0o755."""
    base = os.fspath(base)
    dirs: List[Tuple[str, int]] = []
    for i, (rel, item) in enumerate(spec.items()):
        path = os.path.join(base, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(item, Dir):
            os.makedirs(path, exist_ok=True)
            dirs.append((path, item.mode))
        elif isinstance(item, Link):
            os.symlink(item.target, path)
        elif isinstance(item, HardLink):
            os.link(os.path.join(base, item.to), path)
        else:
            file = item if isinstance(item, File) else File(item)
            with open(path, "wb") as f:
                f.write(file.data)
            os.chmod(path, file.mode)
            os.utime(path, ns=(_EPOCH_NS + i * 10**9, _EPOCH_NS + i * 10**9))
    for path, mode in reversed(
        dirs
    ):  # modes last: a 0o500 parent still gets its children
        os.chmod(path, mode)


@attrs.frozen
class Workload:
    """A transaction to run against a known tree.

    Attributes:
        name: the test id.
        before: the tree under the root before the transaction.
        source: the tree outside the root that ``copy`` reads from.
        ops: what the transaction plans, in order.
        exchange: whether the commit may swap new content in for an old
            file with ``RENAME_EXCHANGE`` (Linux); without it, it takes the
            hard-link backup and rename, as where there is no exchange.
    """

    name: str
    before: Spec
    source: Spec
    ops: Tuple[Op, ...]
    exchange: bool = True

    def setup(
        self, root: str | os.PathLike[str], src_dir: str | os.PathLike[str]
    ) -> None:
        """Build the before-tree under ``root`` and the source tree under ``src_dir``."""
        os.makedirs(root, exist_ok=True)
        os.makedirs(src_dir, exist_ok=True)
        build(root, self.before)
        build(src_dir, self.source)

    def plan(self, tx: fstx.Transaction, src_dir: str | os.PathLike[str]) -> None:
        """Plan every operation on ``tx`` (and choose how its commit replaces files)."""
        # The commit reads this switch; each workload sets it, and conftest
        # puts the platform's default back after every test.
        _commit._EXCHANGE = self.exchange and _commit.EXCHANGE_DEFAULT
        for op in self.ops:
            op.on_tx(tx, os.fspath(src_dir))

    def expected(
        self, root: str | os.PathLike[str], src_dir: str | os.PathLike[str]
    ) -> Snapshot:
        """The after-tree the model predicts from the tree now under ``root``."""
        model = TreeModel.of(root)
        for op in self.ops:
            op.on_model(model, os.fspath(src_dir))
        return model.entries


# -- the catalogue -----------------------------------------------------------

NON_UTF8 = os.fsdecode(b"raw-\xff\xfe") if sys.platform != "win32" else "raw-ff"
"""A name that is not valid UTF-8 (surrogate-escaped), where the OS allows one."""

_PKG_V2: Spec = {
    "pkg/__init__.py": File(b"__version__ = '2.0'\n"),
    "pkg/core.py": File(b"def main():\n    return 2\n"),
    "pkg/données.txt": File(b"unicode name, v2\n"),
    "pkg/sub/data.json": File(b'{"v": 2}\n', 0o600),
    "pkg/sub/new/x.txt": File(b"brand new\n"),
    "pkg/sub/new": Dir(0o750),
}

WORKLOADS: Tuple[Workload, ...] = (
    Workload(
        name="replace-one-file",
        before={
            "app/config.toml": File(b"answer = 41\n", 0o640),
            "app/other.txt": b"untouched\n",
        },
        source={},
        ops=(Write("app/config.toml", b"answer = 42\n"),),
    ),
    Workload(
        name="installer-upgrade",
        before={
            "lib/site-packages/pkg/__init__.py": b"__version__ = '1.0'\n",
            "lib/site-packages/pkg/core.py": b"def main():\n    return 1\n",
            "lib/site-packages/pkg/old_only.py": b"# removed in 2.0\n",
            "lib/site-packages/pkg/sub/data.json": b'{"v": 1}\n',
            "lib/site-packages/pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n",
            "lib/site-packages/pkg-1.0.dist-info/RECORD": b"pkg/__init__.py,,\n",
            "lib/site-packages/pkg-1.0.dist-info/INSTALLER": b"pip\n",
            "lib/site-packages/other/__init__.py": b"# another package\n",
            "bin/tool": File(
                b"#!/usr/bin/python\nfrom pkg.core import main  # 1.0\n", 0o700
            ),
            "bin/python": File(b"ELF...", 0o755),
        },
        source=_PKG_V2,
        ops=(
            Delete("lib/site-packages/pkg"),
            Copy("pkg", "lib/site-packages/pkg"),
            Delete("lib/site-packages/pkg-1.0.dist-info"),
            Write(
                "lib/site-packages/pkg-2.0.dist-info/METADATA",
                b"Name: pkg\nVersion: 2.0\n",
            ),
            Write(
                "lib/site-packages/pkg-2.0.dist-info/RECORD",
                b"pkg/__init__.py,,\npkg/core.py,,\n",
            ),
            Write(
                "lib/site-packages/pkg-2.0.dist-info/INSTALLER", b"fstx\n", how="text"
            ),
            Write(
                "bin/tool",
                b"#!/usr/bin/python\nfrom pkg.core import main  # 2.0\n",
                mode=0o755,
            ),
        ),
    ),
    Workload(
        name="rename-dir-into-new-nested-path",
        before={
            "old/pkg/a.py": b"a\n",
            "old/pkg/b.py": File(b"b\n", 0o600),
            "old/pkg/c/d.txt": b"d\n",
            "old/pkg/c": Dir(0o700),
            "old/keep.txt": b"stays\n",
        },
        source={},
        ops=(Rename("old/pkg", "new/deep/nested/pkg"),),
    ),
    Workload(
        name="delete-tree",
        before={
            "cache/a/1.bin": b"1" * 100,
            "cache/a/2.bin": b"2" * 100,
            "cache/b/c/3.bin": b"3",
            "cache/b/link": Link("../a/1.bin"),
            "cache/empty": Dir(),
            "cache/ro": Dir(0o555),
            "keep/file": b"kept\n",
            "lonely.txt": b"goes too\n",
        },
        source={},
        ops=(
            Delete("cache"),
            Delete("lonely.txt"),
            Delete("never-there", missing_ok=True),
        ),
    ),
    Workload(
        name="chmod",
        before={
            "bin/script": File(b"#!/bin/sh\n", 0o644),
            "etc": Dir(0o755),
            "etc/secret": File(b"s3cret\n", 0o644),
            "etc/public": File(b"hello\n", 0o600),
        },
        source={},
        ops=(
            Chmod("bin/script", 0o755),
            Chmod("etc/secret", 0o600),
            Chmod("etc/public", 0o644),
            Chmod("etc", 0o700),
        ),
    ),
    Workload(
        name="write-then-rename",
        before={
            "a.txt": File(b"a, replacing b\n", 0o600),
            "b.txt": b"b, replaced\n",
            "final": Dir(),
        },
        source={},
        ops=(
            Write("tmp/new.txt", b"written, then moved\n", mode=0o640),
            Rename("tmp/new.txt", "final/new.txt"),
            Rename("a.txt", "b.txt"),
            Write("b.txt", b"then rewritten in place\n"),
            Delete("tmp"),
        ),
    ),
    Workload(
        name="mixed-8-ops-with-mkdir",
        before={
            "x.txt": b"x moves\n",
            "y.txt": b"y goes\n",
            "z.sh": File(b"z\n", 0o644),
            "existing": Dir(),
            "existing/keep": b"kept\n",
        },
        source={"src.txt": File(b"copied from outside\n", 0o604)},
        ops=(
            Mkdir("m/n", mode=0o750),
            Write("m/n/f.txt", b"in a new dir\n"),
            Copy("src.txt", "m/copied.txt"),
            Rename("x.txt", "m/x.txt"),
            Delete("y.txt"),
            Chmod("z.sh", 0o755),
            Write("m/opened.bin", b"\x00\x01through tx.open\n", mode=0o600, how="open"),
            Mkdir("existing"),
        ),
    ),
    Workload(
        name="symlinks-copied-and-deleted",
        before={
            "data/f": b"target of links\n",
            "links/to-file": Link("../data/f"),
            "links/dangling": Link("nowhere"),
            "links/to-dir": Link("../data"),
            "plain.txt": b"replaced by a link\n",
        },
        source={
            "tree/file": b"file in tree\n",
            "tree/rel-link": Link("file"),
            "tree/abs-link": Link("/nonexistent/absolute"),
            "tree/dir-link": Link("."),
            "lnk": Link("tree/file"),
        },
        ops=(
            Copy("tree", "copied"),
            Copy("lnk", "plain.txt"),
            Copy("lnk", "followed.txt", follow=True),
            Delete("links/to-file"),
            Delete("links/dangling"),
            Delete("links/to-dir"),
        ),
    ),
    Workload(
        name="replace-hard-linked-file",
        before={
            "data/shared.bin": File(b"old shared content\n", 0o640),
            "other/alias.bin": HardLink("data/shared.bin"),
            "data/plain": b"plain\n",
        },
        source={},
        ops=(
            Write("data/shared.bin", b"new content, alias keeps the old\n"),
            Rename("data/plain", "other/plain"),
        ),
    ),
    Workload(
        name="swap-two-dirs",
        before={
            "left/l.txt": b"left\n",
            "right/r.txt": b"right\n",
            "right/sub/deep.txt": b"deep\n",
        },
        source={},
        ops=(
            Rename("left", "tmp-swap"),
            Rename("right", "left"),
            Rename("tmp-swap", "right"),
        ),
    ),
    Workload(
        name="odd-names",
        before={
            f"{NON_UTF8}/x y.txt": b"space in name\n",
            "caf\u00e9.txt": b"NFC\n",
            "cafe\u0301.txt": b"NFD, a different name\n",
            "-dash": b"leading dash\n",
        },
        source={"n\u00e4me with space": b"copied\n"},
        ops=(
            Write(f"{NON_UTF8}/x y.txt", b"rewritten\n"),
            Copy("n\u00e4me with space", f"{NON_UTF8}/n\u00e4me with space"),
            Rename("caf\u00e9.txt", "caf\u00e9 moved.txt"),
            Delete("cafe\u0301.txt"),
            Write("\u65e5\u672c/\u30d5\u30a1\u30a4\u30eb", b"CJK\n"),
        ),
    ),
)

# The replacing workloads again, through the hard-link backup: the way files
# are replaced where RENAME_EXCHANGE is missing (macOS, Windows, some file
# systems) stays under every fault and crash sweep on Linux too.
WORKLOADS += tuple(
    attrs.evolve(w, name=f"{w.name}-link-backup", exchange=False)
    for w in WORKLOADS
    if w.name in ("replace-one-file", "installer-upgrade")
)
# The upgrade again, from a cache: its files hard-linked, not copied, and a
# replaced file that is a link to a cached one.
WORKLOADS += tuple(
    attrs.evolve(
        w,
        name="installer-upgrade-from-cache",
        ops=(
            *(
                attrs.evolve(op, link=True) if isinstance(op, Copy) else op
                for op in w.ops
            ),
            Copy("pkg/core.py", "bin/python", link=True),
        ),
    )
    for w in WORKLOADS
    if w.name == "installer-upgrade"
)

BY_NAME: Dict[str, Workload] = {w.name: w for w in WORKLOADS}


# -- tracing a clean run ------------------------------------------------------

_COMMITTED = _journal.encode([_journal.State(_journal.COMMITTED)])

Call = Tuple[str, Tuple[Any, ...]]


def signature(name: str, args: Tuple[Any, ...]) -> Tuple[str, ...]:
    """A call's name and its name arguments: the same in every run of a workload."""
    return (name, *(a for a in args if isinstance(a, str)))


@attrs.define
class Trace:
    """An OS-layer hook that records every mutating call (before it runs)."""

    calls: List[Call] = attrs.Factory(list)

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in _os.MUTATING:
            self.calls.append((name, args))

    def __len__(self) -> int:
        return len(self.calls)

    def name(self, k: int) -> str:
        """The name of call ``k`` (1-based)."""
        return self.calls[k - 1][0]

    def tolerated(self, k: int) -> bool:
        """Whether the engine works around a failure of call k by design.

        A backup hard link that cannot be made falls back to moving the old
        file away; a staged symlink whose times cannot be set (no lutimes) is
        kept as it is.
        """
        name = self.name(k)
        return name == "link" or (name == "utime" and self.name(k - 1) == "symlink")

    @property
    def committing(self) -> int:
        """The call (1-based) writing the ``committing`` record; the tree changes after it."""
        for k, (name, args) in enumerate(self.calls, start=1):
            if name == "write" and b'"committing"' in bytes(args[1]):
                return k
        raise AssertionError("the run never started its commit")

    @property
    def commit_point(self) -> int:
        """The call (1-based) that writes the ``committed`` record: the commit point."""
        for k, (name, args) in enumerate(self.calls, start=1):
            if name == "write" and bytes(args[1]) == _COMMITTED:
                return k
        raise AssertionError("the run never reached its commit point")

    @property
    def commit_done(self) -> int:
        """The last call of the commit point's append (its fsync, when durable)."""
        k = self.commit_point
        fd = self.calls[k - 1][1][0]
        if k < len(self.calls) and self.calls[k] == ("fsync", (fd,)):
            return k + 1
        return k


@attrs.define
class NoHardLinks:
    """Wraps a hook: every hard link then fails with EPERM, as on FAT or some FUSE mounts.

    The engine then moves replaced files out of the way instead of linking
    a backup (the path Windows always takes). ``inner`` sees each call first.
    """

    inner: Optional[_os.Hook] = None

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if self.inner is not None:
            self.inner(name, phase, args)
        if name == "link" and phase == "before":
            raise OSError(errno.EPERM, "hard links not supported here (injected)")


def wrapped(hook: _os.Hook, links: bool) -> _os.Hook:
    """``hook`` as is, or behind :class:`NoHardLinks` when ``links`` is False."""
    return hook if links else NoHardLinks(hook)


def traced_run(
    workload: Workload, root: str, src_dir: str, durability: str, *, links: bool = True
) -> Trace:
    """Set ``workload`` up and run it cleanly, recording its mutating calls."""
    workload.setup(root, src_dir)
    trace = Trace()
    with installed(wrapped(trace, links)):  # nested: 3.9 lacks parenthesised with-items
        with fstx.transaction(root, durability=durability) as tx:
            workload.plan(tx, src_dir)
    return trace


# -- processes -----------------------------------------------------------------


def fork() -> int:
    """``os.fork()``, without the 3.12+ warning about threads left by other tests.

    The children of these suites run fstx and end with ``os._exit``; they
    take no lock that a leftover idle thread (a timeout watcher, a finished
    test's helper) could hold.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r".*use of fork\(\) may lead to deadlocks",
            category=DeprecationWarning,
        )
        return os.fork()


# -- scratch space -----------------------------------------------------------


def fast_base() -> Optional[str]:
    """A tmpfs to build throwaway trees on, if this machine has one we may use."""
    shm = "/dev/shm"
    if (
        sys.platform.startswith("linux")
        and os.path.isdir(shm)
        and os.access(shm, os.W_OK)
    ):
        return shm
    return None


@contextlib.contextmanager
def scratch(fallback: str | os.PathLike[str]) -> Iterator[str]:
    """A fresh directory on tmpfs (sweeps create and delete thousands of files).

    Falls back to a directory under ``fallback`` where there is no tmpfs.
    """
    base = fast_base()
    path = tempfile.mkdtemp(prefix="fstx-scenario-", dir=base or os.fspath(fallback))
    try:
        yield path
    finally:
        _force_rmtree(path)


def _force_rmtree(path: str) -> None:
    # Open up read-only directories first (a 0o555 directory in a workload):
    # without root, their entries could not be removed.
    for top, dirs, _files in os.walk(path):
        for name in dirs:
            full = os.path.join(top, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path)
