"""Types shared by the platform modules."""

from __future__ import annotations


class Dir:
    """An open directory that names are resolved in.

    On POSIX ``fd`` is a directory file descriptor opened without following
    symlinks, so a directory swapped for a symlink later cannot redirect us.
    On Windows there are no directory descriptors (``fd`` is -1) and ``path``
    is used, checked component by component for reparse points.

    Attributes:
        fd: the descriptor, or -1.
        path: the absolute path it was opened as (for messages and Windows calls).
    """

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def __repr__(self) -> str:
        return f"Dir({self.path!r})"
