"""The commit protocol: apply journaled steps, roll them back, clean up after.

A commit is, in order:

1. **Barrier.** With ``durability="full"``, staged content is made durable
   (``syncfs`` on each staging device, else an fsync per file and directory).
2. **Journal.** Every step plus the state ``committing`` is written in one
   append to ``.fstx/<txid>.journal`` and made durable. Nothing under the
   root has changed yet.
3. **Apply.** Each step is a rename: new content from staging into place
   (an existing file is first hard-linked into staging as its backup, so the
   rename over it is atomic for readers); deletions move into staging.
4. **Barrier.** The directories the renames touched are made durable.
5. **Commit point.** The state ``committed`` is appended and made durable.
6. **Clean-up.** Backups and staging are removed; what cannot be removed
   (a file in use) goes to the trash. The journal is removed last.

A crash before step 5 is rolled back by :func:`undo`; after it, recovery only
finishes step 6. Undo is idempotent: each step is undone only if its effect
is visibly there (a backup exists, or the item at the destination is the very
inode that was planned to move), so undoing twice, or undoing a step that
never ran, changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import stat
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from fstx import _journal, _os
from fstx._errors import InUseError
from fstx._journal import Place, Remove, Step
from fstx._platform import impl
from fstx._retry import Retrier, is_transient
from fstx._tree import Rel, RootFS, join

__all__ = [
    "STAGING",
    "JournalFile",
    "apply",
    "barrier",
    "purge",
    "undo",
]

_log = logging.getLogger("fstx")

STAGING = ".fstx"
"""Name of the staging directory at the top of the root (and of each mount in it)."""
TRASH = "trash"
ROOT_TRASH = (STAGING, TRASH)
ORIGIN_SUFFIX = ".origin"

# Where the platform allows it, the old file is hard-linked into staging and
# the new one renamed over it: readers never find the name missing. Windows
# cannot rename over a file that another process holds, so it moves the old
# file away first.
_LINK_BACKUPS: bool = impl.LINK_BACKUPS
EXCHANGE_DEFAULT: bool = impl.EXCHANGE_REPLACES
# Whether a replaced file may be swapped out in one call (a switch for tests).
_EXCHANGE: bool = EXCHANGE_DEFAULT


def away_name(backup: Rel) -> Rel:
    """The second backup name, used when the old file had to be moved away."""
    return (*backup[:-1], backup[-1] + "a")


# -- the journal file ------------------------------------------------------


class JournalFile:
    """An open journal, appended to in whole records.

    Args:
        fs: the root.
        rel: the journal's path, relative to the root.
        durable: fsync after each append.
    """

    def __init__(self, fs: RootFS, rel: Rel, *, durable: bool) -> None:
        self.fs = fs
        self.rel = rel
        self.durable = durable
        self.size = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        self.fd = fs.open(rel, flags, 0o644)
        self.created = True

    def append(self, records: Sequence[_journal.Record]) -> None:
        """Append whole records, durably if asked to."""
        data = _journal.encode(records)
        _os.write(self.fd, data)
        if self.durable:
            _os.fsync(self.fd)
            if self.created:
                self.fs.fsync_dir(self.rel[:-1])
                self.created = False
        self.size += len(data)

    def close(self) -> None:
        """Close the descriptor (the file stays)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _os.close(fd)

    def remove(self) -> None:
        """Close and delete the journal."""
        self.close()
        self.fs.unlink(self.rel)


# -- durability barriers ---------------------------------------------------


def barrier(
    fs: RootFS, areas: Iterable[Rel], dirs: Iterable[Rel], *, staged: bool = False
) -> None:
    """Make the entries of ``dirs`` durable; with ``staged``, all under ``areas``.

    One ``syncfs`` per staging area's file system where the platform has it
    (Linux), else an fsync of every directory (or, for a changed mode, file)
    in ``dirs`` and, with ``staged``, of every file and directory in the
    areas. Only the barrier before the journal needs ``staged``: after the
    renames, what is left in the areas is old content (backups, deleted
    items), durable already.
    """
    pending = set(dirs)
    synced_all = True
    for area in areas:
        if not fs.is_dir(area):
            # Swept already by a recovery that was itself interrupted: no
            # handle on that device, so fsync the directories one by one.
            synced_all = False
            continue
        if not _os.syncfs(fs.dir(area)):
            synced_all = False
            if not staged:
                continue
            _fsync_tree(fs, area)
            # The names of the area and of its staging directory may be new
            # too (a root's first transaction, a mount's first area).
            pending.update(area[:i] for i in range(max(len(area) - 2, 0), len(area)))
    if synced_all and pending:
        # syncfs covered the devices of the areas; a directory on another
        # device (not possible today: every step's device has an area) would
        # still need its own fsync.
        return
    for rel in sorted(pending, key=len, reverse=True):
        st = fs.lstat(rel)
        if st is not None and stat.S_ISDIR(st.st_mode):
            fs.fsync_dir(rel)
        elif st is not None and stat.S_ISREG(st.st_mode):
            _fsync_file(fs, rel)  # a changed mode lives in the file's inode


def _fsync_file(fs: RootFS, rel: Rel) -> None:
    fd = fs.open(rel, os.O_RDONLY)
    try:
        _os.fsync(fd)
    finally:
        _os.close(fd)


def _fsync_tree(fs: RootFS, rel: Rel) -> None:
    for item in fs.walk_files(rel):
        st = fs.lstat(item)
        if st is None or stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_ISDIR(st.st_mode):
            fs.fsync_dir(item)
            continue
        _fsync_file(fs, item)


def settle_areas(fs: RootFS, areas: Iterable[Rel]) -> None:
    """Make the removal of staging areas outside the root's ``.fstx`` durable.

    Recovery finds the root's own areas by name, a mount's only through the
    journal: the journal may go only once they are gone for good, or a power
    cut could leave them behind with nothing naming them.
    """
    for area in areas:
        if area[:-1] == (STAGING,):
            continue
        for rel in (area[:-1], area[:-2]):
            if fs.is_dir(rel):
                fs.fsync_dir(rel)
                break


def touched_dirs(steps: Iterable[Step]) -> Set[Rel]:
    """Every directory whose entries the steps change, and each item whose mode they do.

    Without ``syncfs`` these are fsynced one by one: a mode lives in the
    item's own inode, which an fsync of its directory does not flush. Each
    is named where it is once every step has run: a directory that a later
    step moved is fsynced under its new name.
    """
    return _named_after(list(steps), undone=False)


def undone_dirs(steps: Iterable[Step]) -> Set[Rel]:
    """What :func:`touched_dirs` names, but where it is once the steps are undone.

    Undoing a step changes the directories the step changed; by the end of
    the undo, a directory that an earlier step had moved in is back where
    it came from, and is fsynced there.
    """
    return _named_after(list(steps), undone=True)


def _changed(step: Step) -> List[Rel]:
    if isinstance(step, Place):
        found = [step.src[:-1], step.dst[:-1]]
        if step.backup is not None:
            found.append(step.backup[:-1])
        return found
    if isinstance(step, Remove):
        return [step.path[:-1], step.backup[:-1]]
    return [step.path]


def _named_after(steps: List[Step], *, undone: bool) -> Set[Rel]:
    # Moves by the name they take an item from: forward, a step's source;
    # undone, its destination (the undo moves it back).
    moves: Dict[Rel, List[Tuple[int, Rel]]] = {}
    for j, step in enumerate(steps):
        if isinstance(step, Place):
            src, dst = step.src, step.dst
        elif isinstance(step, Remove):
            src, dst = step.path, step.backup
        else:
            continue
        if undone:
            src, dst = dst, src
        moves.setdefault(src, []).append((j, dst))
    return {
        _follow(rel, i, moves, undone=undone)
        for i, step in enumerate(steps)
        for rel in _changed(step)
    }


def _follow(
    rel: Rel, at: int, moves: Dict[Rel, List[Tuple[int, Rel]]], *, undone: bool
) -> Rel:
    """The name ``rel`` (as of step ``at``) has after the later steps, or the undo."""
    while True:
        # The next move of this name or of a directory above it: the first
        # later step forward, the last earlier step when undone.
        found: Optional[Tuple[int, int, Rel]] = None
        for n in range(1, len(rel) + 1):
            for j, dst in moves.get(rel[:n], ()):
                if not ((j < at) if undone else (j > at)):
                    continue
                if found is None or ((j > found[0]) if undone else (j < found[0])):
                    found = (j, n, dst)
        if found is None:
            return rel
        at, n, dst = found
        rel = (*dst, *rel[n:])


# -- applying steps --------------------------------------------------------


def _in_use(fs: RootFS, rel: Rel, operation: str, exc: OSError) -> InUseError:
    path = fs.abspath(rel)
    try:
        holders = impl.holders(path)
    except OSError:
        holders = []
    error = InUseError(
        path, operation, holders, winerror=getattr(exc, "winerror", None)
    )
    error.__cause__ = exc
    return error


def _ino(fs: RootFS, rel: Rel) -> Optional[int]:
    st = fs.lstat(rel)
    return None if st is None else st.st_ino


def apply(fs: RootFS, step: Step, retrier: Retrier) -> None:
    """Carry out one step (safe to call again after it succeeded)."""
    if isinstance(step, Place):
        _apply_place(fs, step, retrier)
    elif isinstance(step, Remove):
        _apply_remove(fs, step, retrier)
    else:
        retrier.call(fs.chmod, step.path, step.mode, operation="chmod", path=step.path)


def _rename_noreplace(fs: RootFS, src: Rel, dst: Rel) -> None:
    try:
        fs.rename_noreplace(src, dst)
    except FileExistsError:
        raise
    except OSError as exc:
        # renameat2 is missing (old kernel, FUSE, macOS) and the hard-link
        # fallback does not work for directories: look first, then rename.
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise
        if fs.exists(dst):
            raise FileExistsError(
                errno.EEXIST, os.strerror(errno.EEXIST), join(dst)
            ) from exc
        fs.rename(src, dst)


def _within_defer(
    retrier: Retrier,
    func: Callable[[Rel, Rel], None],
    src: Rel,
    dst: Rel,
    operation: str,
    path: Rel,
    already_done: Callable[[], bool],
) -> bool:
    """Try ``func(src, dst)`` for ``defer_after`` seconds.

    Returns False when it stayed refused by a transient error (a file in use),
    so the caller can take its fallback; a permanent error is raised.
    """
    try:
        retrier.call(
            func, src, dst, operation=operation, path=path,
            budget=retrier.policy.defer_after, already_done=already_done,
        )  # fmt: skip
    except OSError as exc:
        if not is_transient(exc):
            raise
        return False
    return True


def _apply_place(fs: RootFS, step: Place, retrier: Retrier) -> None:
    src, dst, backup = step.src, step.dst, step.backup
    src_ino = _ino(fs, src)
    if src_ino is None and _ino(fs, dst) == step.ino:
        return  # already moved: a retried or repeated step
    if src_ino != step.ino:
        raise FileNotFoundError(
            errno.ENOENT, "changed or removed since it was planned", fs.abspath(src)
        )
    done = lambda: _ino(fs, src) is None  # noqa: E731 - a one-line idempotency check
    if backup is None or not fs.exists(dst):
        retrier.call(
            _rename_noreplace, fs, src, dst, operation="move into place", path=dst,
            already_done=done,
        )  # fmt: skip
        return
    swap = _exchange(fs, step, retrier) if _EXCHANGE and step.staged else None
    if swap is True:
        return
    if _LINK_BACKUPS and swap is None:
        try:
            fs.link(dst, backup)
        except OSError as exc:
            _log.debug("no hard-link backup of %r (%s); moving it away", join(dst), exc)
        else:
            if _within_defer(retrier, fs.rename, src, dst, "replace", dst, done):
                return
    # The old file would not be replaced (Windows, or a file in use): move it
    # away into staging, then put the new one in the free name.
    away = away_name(backup) if fs.exists(backup) else backup
    try:
        retrier.call(fs.rename, dst, away, operation="move out of the way", path=dst)
    except OSError as exc:
        if is_transient(exc):
            raise _in_use(fs, dst, "move out of the way", exc) from exc
        raise
    retrier.call(
        _rename_noreplace, fs, src, dst, operation="move into place", path=dst,
        already_done=done,
    )  # fmt: skip


def _exchange(fs: RootFS, step: Place, retrier: Retrier) -> Optional[bool]:
    """Swap new staged content in for the old file: one call, no backup name.

    The staged name then holds the old file, which undo swaps back and the
    clean-up deletes with the staging area. Readers find the name at every
    moment. Returns True once swapped; None where the swap is not to be had
    (not Linux, a file system without ``RENAME_EXCHANGE``): the hard-link
    backup takes over; False when it stayed refused for ``defer_after`` (the
    old file in use): a rename over it would be refused too, so the old file
    is moved away instead.
    """
    src, dst = step.src, step.dst
    try:
        retrier.call(
            fs.exchange, src, dst, operation="replace", path=dst,
            budget=retrier.policy.defer_after,
            already_done=lambda: _ino(fs, dst) == step.ino,
        )  # fmt: skip
    except OSError as exc:
        if _ino(fs, dst) == step.ino:
            return True  # the last attempt reported an error, yet took effect
        if exc.errno in _os.NO_EXCHANGE:
            return None
        if is_transient(exc):
            return False
        raise
    return True


def _apply_remove(fs: RootFS, step: Remove, retrier: Retrier) -> None:
    path, backup = step.path, step.backup
    st = fs.lstat(path)
    if st is None:
        # Gone already, unless a parent is no longer a directory of ours (a
        # symlink swapped in since planning reads as absent): then opening the
        # parent fails, and so does the commit. A parent that is gone too is fine.
        with contextlib.suppress(FileNotFoundError):
            fs.dir(path[:-1])
        return
    budget = retrier.policy.defer_after if stat.S_ISDIR(st.st_mode) else None
    # A rename that reported a transient error but happened is not repeated.
    done = lambda: _ino(fs, path) is None and _ino(fs, backup) == st.st_ino  # noqa: E731
    try:
        retrier.call(
            fs.rename, path, backup, operation="delete", path=path, budget=budget,
            already_done=done,
        )  # fmt: skip
    except OSError as exc:
        if not is_transient(exc):
            raise
        if not stat.S_ISDIR(st.st_mode):
            raise _in_use(fs, path, "delete", exc) from exc
        # A directory with a file in use below it cannot be moved (Windows):
        # move its entries one by one; only the held ones stay behind.
        _move_entries(fs, path, backup, retrier)


def _move_entries(fs: RootFS, path: Rel, backup: Rel, retrier: Retrier) -> None:
    if not fs.exists(backup):
        fs.mkdir(backup)
    for name in fs.listdir(path):
        child, target = (*path, name), (*backup, name)
        try:
            retrier.call(fs.rename, child, target, operation="delete", path=child)
        except OSError as exc:
            if not is_transient(exc) or not fs.is_dir(child):
                if is_transient(exc):
                    raise _in_use(fs, child, "delete", exc) from exc
                raise
            _move_entries(fs, child, target, retrier)
    # A rollback may have to recreate the directory from its backup (a file in
    # use keeps the backup from moving back): the backup keeps its mode.
    st = fs.lstat(path)
    if st is not None:
        fs.chmod(backup, stat.S_IMODE(st.st_mode))
    retrier.call(fs.rmdir, path, operation="delete", path=path)


# -- undoing steps ---------------------------------------------------------


def undo(
    fs: RootFS, steps: Sequence[Step], retrier: Retrier, *, last_failed: bool = False
) -> None:
    """Undo ``steps`` in reverse order; idempotent, and a no-op for steps never run.

    With ``last_failed``, the last step is the one whose failure stopped the
    commit: if its path cannot be reached any more (a parent swapped for a
    symlink, ``ELOOP``) and it left nothing in staging, it never reached the
    tree either, and is skipped instead of failing the whole rollback.
    """
    for i, step in enumerate(reversed(steps)):
        try:
            _undo_step(fs, step, retrier)
        except OSError as exc:
            if not (last_failed and i == 0 and exc.errno == errno.ELOOP):
                raise
            if _left_in_staging(fs, step):
                raise
            _log.debug("undo: %s could not have reached the tree (%s)", step, exc)


def _undo_step(fs: RootFS, step: Step, retrier: Retrier) -> None:
    if isinstance(step, Place):
        _undo_place(fs, step, retrier)
    elif isinstance(step, Remove):
        _undo_remove(fs, step.path, step.backup, retrier)
    elif _ino(fs, step.path) == step.ino:
        retrier.call(fs.chmod, step.path, step.old_mode, operation="restore mode",
                     path=step.path)  # fmt: skip


def _left_in_staging(fs: RootFS, step: Step) -> bool:
    """Whether a step left anything in staging that undo would have to put back."""
    if isinstance(step, Place):
        if step.staged and _ino(fs, step.src) != step.ino:
            return True  # moved in, or holding the old file it was swapped with
        backup = step.backup
        return backup is not None and (
            fs.exists(backup) or fs.exists(away_name(backup))
        )
    if isinstance(step, Remove):
        return fs.exists(step.backup)
    return False


def _undo_place(fs: RootFS, step: Place, retrier: Retrier) -> None:
    src, dst, backup = step.src, step.dst, step.backup
    src_ino = _ino(fs, src)
    if (
        step.staged
        and backup is not None
        and src_ino not in (None, step.ino)
        and _ino(fs, dst) in (step.ino, None)
    ):
        # Swapped in (see _exchange): the staged name holds the old file. (The
        # name may be missing: a crash cut this very undo's rename in half.)
        retrier.call(
            fs.rename, src, dst, operation="undo", path=dst,
            already_done=_moved(fs, src, dst, src_ino),
        )  # fmt: skip
        return
    moved_in = src_ino is None and _ino(fs, dst) == step.ino
    restore: Optional[Rel] = None
    if backup is not None:
        if fs.exists(backup):
            restore = backup
        elif fs.exists(away_name(backup)):
            restore = away_name(backup)
    if moved_in and (not step.staged or restore is None):
        # Put a rename back where it came from; take new content out of the
        # way unless the old file is about to be renamed over it anyway.
        retrier.call(
            fs.rename, dst, src, operation="undo", path=dst,
            already_done=_moved(fs, dst, src, step.ino),
        )  # fmt: skip
    if backup is not None and restore is not None:
        if fs.exists(dst) and fs.same(restore, dst):
            _drop_link(fs, restore)
        else:
            retrier.call(
                fs.rename, restore, dst, operation="undo", path=dst,
                already_done=_moved(fs, restore, dst, _ino(fs, restore)),
            )  # fmt: skip
        other = away_name(backup) if restore == backup else backup
        if fs.exists(other) and fs.same(other, dst):
            _drop_link(fs, other)


def _moved(fs: RootFS, src: Rel, dst: Rel, ino: Optional[int]) -> Callable[[], bool]:
    """``already_done`` of a rename that reported a transient error but happened."""
    return lambda: _ino(fs, src) is None and _ino(fs, dst) == ino


def _drop_link(fs: RootFS, rel: Rel) -> None:
    # A second name of the old file, which is back in place. While the file is
    # in use no name of it can be removed (Windows rules, winfs): the name
    # stays for the clean-up, which puts it in the trash. Undo must not fail
    # for a leftover.
    try:
        fs.unlink(rel)
    except OSError as exc:
        if not is_transient(exc):
            raise
        _log.debug("second name %r of a file in use left for clean-up", join(rel))


def _undo_remove(fs: RootFS, path: Rel, backup: Rel, retrier: Retrier) -> None:
    st = fs.lstat(backup)
    if st is None:
        return
    back = _moved(fs, backup, path, st.st_ino)
    here = fs.lstat(path)
    if here is None:
        if not stat.S_ISDIR(st.st_mode):
            retrier.call(
                fs.rename, backup, path, operation="undo delete", path=path,
                already_done=back,
            )  # fmt: skip
            return
        if _within_defer(retrier, fs.rename, backup, path, "undo delete", path, back):
            return
        # A file in use below keeps the directory from moving back (Windows,
        # winfs), as it kept it from moving away: recreate it, with its mode,
        # and move the entries back one by one.
        mode = stat.S_IMODE(st.st_mode)
        fs.mkdir(path, mode)
        fs.chmod(path, mode)
        here = fs.lstat(path)
        assert here is not None
    if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(here.st_mode):
        # A directory whose entries were moved one by one: move them back.
        for name in fs.listdir(backup):
            _undo_remove(fs, (*path, name), (*backup, name), retrier)
        retrier.call(
            fs.rmdir, backup, operation="undo delete", path=backup,
            already_done=lambda: not fs.exists(backup),
        )  # fmt: skip
        return
    retrier.call(
        fs.rename, backup, path, operation="undo delete", path=path,
        already_done=back,
    )  # fmt: skip


# -- clean-up and trash ----------------------------------------------------


def purge(
    fs: RootFS, rel: Rel, origin: Rel, trash: Optional[Rel], deferred: List[Rel]
) -> None:
    """Delete ``rel`` (a tree); what refuses goes to ``trash``, listed in ``deferred``.

    With ``trash`` None, what refuses stays where it is (emptying the trash).
    Never raises: clean-up must never undo a commit.
    """
    try:
        st = fs.lstat(rel)
    except OSError as exc:
        _log.warning("cannot look at %r during clean-up: %s", join(rel), exc)
        return
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            names = fs.listdir(rel)
        except OSError:
            names = []
        for name in names:
            purge(fs, (*rel, name), (*origin, name), trash, deferred)
        remove: Callable[[Rel], None] = fs.rmdir
    else:
        remove = fs.unlink
    try:
        remove(rel)
    except OSError as first:
        if stat.S_ISDIR(st.st_mode) and first.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return  # its held entries went to the trash; the directory is only a shell
        if _clear_readonly_and_retry(fs, rel, remove):
            return
        if trash is None:
            deferred.append(origin)
            return
        _to_trash(fs, rel, origin, trash, deferred, first)


def _clear_readonly_and_retry(
    fs: RootFS, rel: Rel, remove: Callable[[Rel], None]
) -> bool:
    try:
        parent, name = fs.dir(rel[:-1]), rel[-1]
        if not impl.is_readonly_blocker(parent, name):
            return False
        impl.clear_readonly(parent, name)
        remove(rel)
    except OSError:
        return False
    return True


def trash_for(area: Rel) -> Rel:
    """The trash on a staging area's device: beside the area, in its ``.fstx``."""
    return (*area[:-1], TRASH)


def _to_trash(
    fs: RootFS, rel: Rel, origin: Rel, trash: Rel, deferred: List[Rel], exc: OSError
) -> None:
    name = origin[-1] if origin else rel[-1]
    entry = _entry_of(fs, rel, origin) if origin in deferred else None
    if entry is not None:
        # Another name of a file deferred already (its hard-link backup and
        # the old file moved away): it joins that entry, which stays one
        # entry, deferred and reported once.
        n = 1
        while fs.exists((*entry, f"{name}.{n}")):
            n += 1
        try:
            fs.rename(rel, (*entry, f"{name}.{n}"))
        except OSError as move_exc:
            _log.warning(
                "cannot move a second name of %r to the trash (%s); it stays in "
                "staging", join(origin), move_exc,
            )  # fmt: skip
        return
    token = secrets.token_hex(8)
    # Each entry is a directory, so that every name of one file fits in it.
    target = (*trash, token)
    deferred.append(origin)
    try:
        for d in (trash, ROOT_TRASH):
            if not fs.exists(d):
                fs.mkdir(d)
        # The note comes first: an entry is never in the trash without it.
        _write_origin(fs, (*ROOT_TRASH, token + ORIGIN_SUFFIX), origin, target)
        fs.mkdir(target, 0o700)
        fs.rename(rel, (*target, name))
    except OSError as move_exc:
        _log.warning(
            "cannot remove %r (%s) nor move it to the trash (%s); it stays in staging",
            join(origin), exc, move_exc,
        )  # fmt: skip
        _drop_entry(fs, token, target)
        return
    if is_transient(exc):
        _log.warning(
            "%r is in use; deferred its removal to the next recovery", join(origin)
        )
    else:
        _log.warning(
            "%r could not be removed (%s); deferred its removal to the next recovery",
            join(origin), exc,
        )  # fmt: skip


def _drop_entry(fs: RootFS, token: str, target: Rel) -> None:
    # What stays in staging is swept by the next recovery: an empty entry and
    # its note would only report it as in the trash.
    try:
        if fs.exists(target):
            fs.rmdir(target)
        note = (*ROOT_TRASH, token + ORIGIN_SUFFIX)
        if fs.exists(note):
            fs.unlink(note)
        for d in {target[:-1], ROOT_TRASH}:
            if fs.exists(d) and not fs.listdir(d):
                fs.rmdir(d)
    except OSError as exc:
        _log.debug("empty trash entry %r left for recovery: %s", join(target), exc)


def _entry_of(fs: RootFS, rel: Rel, origin: Rel) -> Optional[Rel]:
    """The trash entry deferred from ``origin`` that holds another name of ``rel``."""
    try:
        names = fs.listdir(ROOT_TRASH)
    except OSError:
        return None
    for note in sorted(names):
        if not note.endswith(ORIGIN_SUFFIX):
            continue
        path, item = read_origin(fs, (*ROOT_TRASH, note))
        if path != origin or item is None or not fs.is_dir(item):
            continue
        if any(fs.same((*item, child), rel) for child in fs.listdir(item)):
            return item
    return None


def _write_origin(fs: RootFS, rel: Rel, origin: Rel, item: Rel) -> None:
    fd = fs.open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        note = {"path": join(origin), "item": join(item)}
        _os.write(fd, json.dumps(note).encode("ascii"))
    finally:
        _os.close(fd)


def read_origin(fs: RootFS, rel: Rel) -> Tuple[Optional[Rel], Optional[Rel]]:
    """``(original path, trash entry)`` from a note in the trash (None: unreadable)."""
    try:
        fd = fs.open(rel, os.O_RDONLY)
    except OSError:
        return None, None
    try:
        data = os.read(fd, 1 << 16)
    finally:
        _os.close(fd)
    found: List[Optional[Rel]] = [None, None]
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        # A half-written note (a crash while deferring): the entry is still
        # purged, just reported without its original name.
        note = json.loads(data.decode("ascii"))
        for i, key in enumerate(("path", "item")):
            value = note.get(key)
            if isinstance(value, str) and value and ".." not in value.split("/"):
                found[i] = tuple(value.split("/"))
    return found[0], found[1]


def purge_backups(fs: RootFS, steps: Iterable[Step], deferred: List[Rel]) -> None:
    """Delete every backup the steps keep, as :func:`purge` does (never raises).

    Of a replaced file, every name its old version may have in staging: the
    staged name it was swapped to, else its hard-link backup and the name it
    was moved away to. What cannot be deleted goes to the trash of its own
    staging area, listed under the path it came from.
    """
    for step in steps:
        if isinstance(step, Place) and step.backup is not None:
            if step.staged:
                try:
                    st = fs.lstat(step.src)
                except OSError:
                    st = None  # purge below says why, if it matters
                if st is not None and st.st_ino != step.ino:
                    # Swapped out: the old file is here, and only here.
                    purge(fs, step.src, step.dst, trash_for(step.src[:-1]), deferred)
                    continue
            for name in (step.backup, away_name(step.backup)):
                purge(fs, name, step.dst, trash_for(name[:-1]), deferred)
        elif isinstance(step, Remove):
            purge(fs, step.backup, step.path, trash_for(step.backup[:-1]), deferred)
