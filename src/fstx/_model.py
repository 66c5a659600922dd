"""The planned tree: what the root will look like once the planned steps apply.

Every planned path maps to a real location under the root: itself if no
operation touched it, a staged item (new content), or where an earlier
rename found it. An overlay trie records only what operations changed, so a
lookup costs one dictionary step per path component, whatever the size of
the transaction.
"""

from __future__ import annotations

import os
import stat
from typing import Dict, List, Optional, Set

from fstx._tree import Rel, RootFS

__all__ = ["PlannedTree"]


class _Node:
    __slots__ = ("children", "dir_st", "is_set", "loc")

    def __init__(self) -> None:
        self.children: Dict[str, _Node] = {}
        self.is_set = False
        self.loc: Optional[Rel] = None
        # The lstat of the directory this path is planned to be, once looked
        # up: planning never changes a directory's type, device or inode, so
        # resolving the parents of each new path costs no system call.
        self.dir_st: Optional[os.stat_result] = None


def _any_set(node: _Node) -> bool:
    return any(child.is_set or _any_set(child) for child in node.children.values())


class PlannedTree:
    """The tree as planned so far, over the real one.

    Args:
        fs: the root, for looking at real and staged items.
    """

    def __init__(self, fs: RootFS) -> None:
        self.fs = fs
        self._top = _Node()
        # The directories' lstat results again, by path: one dictionary
        # lookup instead of a walk down the trie. Emptied whenever a path at
        # or above a remembered one is planned anew (``_prefixes`` tells).
        self._memo: Dict[Rel, os.stat_result] = {}
        self._prefixes: Set[Rel] = set()

    def locate(self, path: Rel) -> Optional[Rel]:
        """Where the planned ``path`` is now on disk (None: planned absent)."""
        node = self._top
        found: Optional[Rel] = path
        for i, name in enumerate(path):
            child = node.children.get(name)
            if child is None:
                break
            node = child
            if node.is_set:
                found = None if node.loc is None else node.loc + path[i + 1 :]
        return found

    def lstat(self, path: Rel) -> Optional[os.stat_result]:
        """``lstat`` of the planned ``path`` (None: absent).

        A directory's result is remembered until an operation plans that
        path (or a parent) anew, or :meth:`changed` says its item changed.
        """
        st = self._memo.get(path)
        if st is not None:
            return st
        node = self._top
        found: Optional[Rel] = path
        exact = True
        for i, name in enumerate(path):
            child = node.children.get(name)
            if child is None:
                exact = False
                break
            node = child
            if node.is_set:
                found = None if node.loc is None else node.loc + path[i + 1 :]
        if found is None:
            return None
        if exact and node.dir_st is not None:
            self._remember(path, node.dir_st)
            return node.dir_st
        st = self.fs.lstat(found)
        if st is not None and stat.S_ISDIR(st.st_mode):
            (node if exact else self._make(path)).dir_st = st
            self._remember(path, st)
        return st

    def known_dir(self, path: Rel) -> bool:
        """Whether ``path`` was looked up lately and is a planned directory.

        No lookup is made. Such a path was reached one directory at a time,
        never through a symlink: none of its parents is one either.
        """
        return path in self._memo

    def _remember(self, path: Rel, st: os.stat_result) -> None:
        self._memo[path] = st
        self._prefixes.update(path[:i] for i in range(1, len(path) + 1))

    def _replanned(self, path: Rel) -> None:
        """``path`` and what lies below it are planned anew: drop what may be stale."""
        if path in self._prefixes:
            self._memo.clear()
            self._prefixes.clear()

    def changed(self, path: Rel) -> None:
        """Forget what :meth:`lstat` remembers of ``path`` (its item was changed)."""
        self._replanned(path)
        node = self._node(path)
        if node is not None:
            node.dir_st = None

    def planned(self, path: Rel) -> bool:
        """Whether an operation planned something at ``path`` or below it."""
        node = self._node(path)
        return node is not None and (node.is_set or _any_set(node))

    def is_dir(self, path: Rel) -> bool:
        """Whether the planned ``path`` is a directory."""
        st = self.lstat(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def listdir(self, path: Rel) -> List[str]:
        """Names in the planned directory ``path``."""
        loc = self.locate(path)
        names = set(self.fs.listdir(loc)) if loc is not None else set()
        node = self._node(path)
        if node is not None:
            for name, child in node.children.items():
                if not child.is_set:
                    continue
                if child.loc is None:
                    names.discard(name)
                else:
                    names.add(name)
        return sorted(names)

    def _node(self, path: Rel) -> Optional[_Node]:
        node = self._top
        for name in path:
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def _make(self, path: Rel) -> _Node:
        node = self._top
        for name in path:
            node = node.children.setdefault(name, _Node())
        return node

    def set(self, path: Rel, loc: Optional[Rel]) -> None:
        """Plan ``path`` (and its subtree) to be what is at ``loc`` (None: absent)."""
        self._replanned(path)
        node = self._make(path)
        node.children = {}
        node.is_set = True
        node.loc = loc
        node.dir_st = None

    def move(self, src: Rel, dst: Rel) -> None:
        """Plan a rename: ``dst`` becomes what ``src`` is, with its planned subtree."""
        self._replanned(src)
        self._replanned(dst)
        loc = self.locate(src)
        old = self._node(src)
        children = old.children if old is not None else {}
        node = self._make(dst)
        node.children = children  # what they remember is still true: no item moved yet
        node.is_set = True
        node.loc = loc
        node.dir_st = None
        gone = self._make(src)
        gone.children = {}
        gone.is_set = True
        gone.loc = None
        gone.dir_st = None
