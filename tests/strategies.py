"""Hypothesis strategies for fstx's scenario suites.

Names come from a deliberately tiny namespace, so that drawn operations
collide (replace, rename over, delete what another one created) far more
often than random names would, and it is full of names that break naive
code: a space, a precomposed and a decomposed accent (two different names on
POSIX), a non-UTF-8 byte carried as a surrogate escape, a leading dash.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Dict, List, Optional, Tuple, Union

from hypothesis import strategies as st

from workloads import Dir, File, Link, Spec

_POSIX = sys.platform != "win32"

NAMES: Tuple[str, ...] = (
    "a",
    "b",
    "x y",
    "\u00e9",  # é, precomposed (NFC)
    *(("e\u0301", os.fsdecode(b"\xfe")) if _POSIX else ()),  # NFD é; a lone byte 0xfe
    "-n",
)
"""The namespace every drawn path is made of."""


def names() -> st.SearchStrategy[str]:
    """One path component from :data:`NAMES`, small names first (they shrink well)."""
    return st.sampled_from(NAMES)


def paths(max_depth: int = 3) -> st.SearchStrategy[str]:
    """A relative path of 1 to ``max_depth`` components."""
    return st.lists(names(), min_size=1, max_size=max_depth).map("/".join)


# Paths that fstx must refuse, or must normalise, whatever the tree holds.
_ODD_PATHS = (
    "../escape",
    "a/../../escape",
    ".fstx/inside-staging",
    "./a",
    "a//b",
    "a/./b/..",
    "",
)


def any_paths() -> st.SearchStrategy[str]:
    """Mostly :func:`paths`, sometimes one of a few paths with ``..``, ``.`` or staging."""
    return st.one_of(paths(), paths(), paths(), st.sampled_from(_ODD_PATHS))


def file_data() -> st.SearchStrategy[bytes]:
    """File contents, empty included."""
    return st.binary(max_size=48)


# Modes keep the owner's read bit on files and rwx on directories: without
# root, a tree the owner cannot read or enter could not even be compared.
FILE_MODES = (0o644, 0o600, 0o755, 0o444, 0o640)
DIR_MODES = (0o755, 0o700, 0o750, 0o777)


def file_modes() -> st.SearchStrategy[Optional[int]]:
    """The ``mode`` of a write: None (keep, or the default) or explicit bits."""
    return st.one_of(st.none(), st.sampled_from(FILE_MODES))


def dir_modes() -> st.SearchStrategy[int]:
    """The ``mode`` of a mkdir."""
    return st.sampled_from(DIR_MODES)


def chmod_modes() -> st.SearchStrategy[int]:
    """The ``mode`` of a chmod (directories get the owner's rwx added by the caller)."""
    return st.sampled_from(FILE_MODES + DIR_MODES)


def fault_errnos() -> st.SearchStrategy[int]:
    """Permanent errors an OS call may fail with."""
    return st.sampled_from((errno.EIO, errno.ENOSPC, errno.EACCES))


# -- the tree outside the root that copies read from ---------------------------

RAW = os.fsdecode(b"raw-\xff") if _POSIX else "raw-ff"

SOURCE: Spec = {
    "f": File(b"source file\n"),
    "exe": File(b"#!/bin/sh\n", 0o755),
    "x y": File(b"spaced\n", 0o600),
    "\u00e9": File(b"unicode name\n"),
    RAW: File(b"non-UTF-8 name\n"),
    "sub/g": File(b"g\n"),
    "sub/deep/h": File(b"h\n", 0o444),
    "sub/deep": Dir(0o700),
    "sub/ln-g": Link("g"),
    "sub": Dir(0o755),
    "link-f": Link("f"),
    "link-sub": Link("sub"),
    "dangling": Link("nowhere"),
}
"""Files, a tree, and symlinks (to a file, to a tree, dangling) with odd names."""

SOURCE_NAMES = (
    "f",
    "exe",
    "x y",
    "\u00e9",
    RAW,
    "sub",
    "sub/deep",
    "link-f",
    "link-sub",
    "dangling",
    "missing",  # does not exist
)


def source_names() -> st.SearchStrategy[str]:
    """What to copy from :data:`SOURCE`."""
    return st.sampled_from(SOURCE_NAMES)


# -- initial trees --------------------------------------------------------------

LINK_TARGETS = ("a", "b/a", "nowhere", ".", "..", "/nonexistent/outside", "loop")


@st.composite
def initial_trees(draw: st.DrawFn) -> Spec:
    """A before-tree: for some top names a file, a directory of files, or a symlink."""
    spec: Dict[str, Union[File, Dir, Link]] = {}
    for top in draw(st.lists(names(), unique=True, min_size=2, max_size=5)):
        kind = draw(st.sampled_from(("file", "dir", "dir", "link")))
        if kind == "file":
            spec[top] = File(draw(file_data()), draw(st.sampled_from(FILE_MODES)))
        elif kind == "link":
            target = draw(st.sampled_from(LINK_TARGETS))
            spec[top] = Link(top if target == "loop" else target)
        else:
            children: List[str] = draw(st.lists(names(), unique=True, max_size=3))
            for child in children:
                spec[f"{top}/{child}"] = File(
                    draw(file_data()), draw(st.sampled_from(FILE_MODES))
                )
            spec[top] = Dir(draw(st.sampled_from(DIR_MODES)))
    return spec
