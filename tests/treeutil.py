"""Helpers the test suites share: exact tree snapshots and fault hooks."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Dict, List, Optional, Tuple

from fstx import _os

Entry = Tuple[Any, ...]
Snapshot = Dict[str, Entry]

STAGING = ".fstx"


def snapshot(root: str | os.PathLike[str], *, inodes: bool = True) -> Snapshot:
    """Every path under ``root`` (staging excluded) with type, mode, content or target.

    With ``inodes``, regular files also carry ``(st_ino, st_mtime_ns)`` so a
    comparison proves that replaced and deleted files came back as the very
    same files.
    """
    out: Snapshot = {}
    base = os.fspath(root)

    def visit(rel: str) -> None:
        path = os.path.join(base, rel) if rel else base
        for name in sorted(os.listdir(path)):
            if not rel and name == STAGING:
                continue
            child = os.path.join(rel, name) if rel else name
            full = os.path.join(base, child)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[child] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[child] = ("dir", mode)
                visit(child)
            else:
                with open(full, "rb") as f:
                    data = f.read()
                ident = (st.st_ino, st.st_mtime_ns) if inodes else ()
                out[child] = ("file", mode, data, *ident)

    visit("")
    return out


def staging_leftovers(root: str | os.PathLike[str]) -> List[str]:
    """What the staging directory holds besides its lock file."""
    path = os.path.join(os.fspath(root), STAGING)
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n != "lock")


def assert_clean(root: str | os.PathLike[str]) -> None:
    """The staging directory holds nothing but its lock file."""
    left = staging_leftovers(root)
    assert left == [], f"staging leftovers: {left}"


def make_tree(root: str | os.PathLike[str], spec: Dict[str, Optional[bytes]]) -> None:
    """Create files (bytes) and directories (None) under ``root``."""
    base = os.fspath(root)
    for rel, data in spec.items():
        path = os.path.join(base, rel)
        if data is None:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)


class FailAt:
    """An OS-layer hook that raises ``OSError(err)`` at the k-th mutating call (1-based)."""

    def __init__(
        self, k: int, err: int = errno.EIO, *, persistent: bool = False
    ) -> None:
        self.k = k
        self.err = err
        self.persistent = persistent
        self.count = 0
        self.calls: List[str] = []

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase != "before" or name not in _os.MUTATING:
            return
        self.count += 1
        self.calls.append(name)
        if self.count == self.k or (self.persistent and self.count > self.k):
            raise OSError(
                self.err, f"{os.strerror(self.err)} (injected at {name} #{self.count})"
            )


class installed:  # noqa: N801 - reads as a statement: with installed(hook): ...
    """Install an OS-layer hook for the duration of a ``with`` block."""

    def __init__(self, hook: _os.Hook) -> None:
        self.hook = hook
        self.previous: Optional[_os.Hook] = None

    def __enter__(self) -> _os.Hook:
        self.previous = _os.set_hook(self.hook)
        return self.hook

    def __exit__(self, *exc: object) -> None:
        _os.set_hook(self.previous)
