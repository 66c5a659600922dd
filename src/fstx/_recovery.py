"""Recovery after a crash, and a read-only look at a root's state.

Every journal left in ``<root>/.fstx`` belongs to a transaction whose process
is gone (the root's lock proves it). Its last durable state says what to do:

- no ``committing`` record: nothing under the root changed; the staging is swept;
- ``committing`` without ``committed``: the commit point was not reached;
  every step is undone (undo is idempotent, so a recovery that is itself
  interrupted just runs again);
- ``committed``: the commit stands; backups and staging are removed.

Then the trash (old files that were in use at commit time) is emptied as far
as the files are free.
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

import attrs

from fstx import _commit, _journal
from fstx._commit import ROOT_TRASH, STAGING, TRASH
from fstx._errors import JournalError, RollbackError
from fstx._lock import LOCK_NAME, RootLock
from fstx._platform import impl
from fstx._retry import Retrier
from fstx._tree import Rel, RootFS

_log = logging.getLogger("fstx")

__all__ = ["RecoveryReport", "Status", "recover", "recover_locked", "status"]


@attrs.frozen
class RecoveryReport:
    """What :func:`recover` did.

    Attributes:
        rolled_back: an interrupted commit was undone.
        rolled_forward: a committed transaction's clean-up was finished.
        purged: trash entries removed.
        deferred: original paths whose old files are still in use and stay
            in the trash for next time.
    """

    rolled_back: bool = False
    rolled_forward: bool = False
    purged: int = 0
    deferred: Tuple[str, ...] = ()


@attrs.frozen
class Status:
    """A root's state, as :func:`status` found it.

    Attributes:
        pending: an interrupted transaction awaits recovery.
        deferred: original paths whose old files wait in the trash.
        clean: neither.
    """

    pending: bool = False
    deferred: Tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True when nothing is pending and nothing is deferred."""
        return not self.pending and not self.deferred


def _staging_names(root: str) -> Optional[List[str]]:
    try:
        return os.listdir(os.path.join(root, STAGING))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _nothing_to_do(names: Optional[List[str]]) -> bool:
    return names is None or all(n == LOCK_NAME for n in names)


def recover(root: str | os.PathLike[str]) -> RecoveryReport:
    """Finish or undo an interrupted transaction under ``root`` and empty the trash.

    Idempotent, safe to call at every start and from several processes at
    once; when there is nothing to do it costs one directory listing.

    Raises:
        JournalError: a journal is damaged; nothing was changed.
        RollbackError: undoing failed; run it again once the cause is fixed.
    """
    path = os.path.abspath(os.fspath(root))
    if _nothing_to_do(_staging_names(path)):
        return RecoveryReport()
    with RootLock(path, os.path.join(path, STAGING), None):
        fs = RootFS(path)
        try:
            return recover_locked(fs, Retrier())
        finally:
            fs.close()


def _read_journal(fs: RootFS, rel: Rel) -> _journal.Journal:
    fd = fs.open(rel, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return _journal.parse(b"".join(chunks), fs.abspath(rel))


def recover_locked(fs: RootFS, retrier: Retrier) -> RecoveryReport:
    """:func:`recover`'s work, for a caller that already holds the root's lock."""
    staging = (STAGING,)
    try:
        names = fs.listdir(staging)
    except FileNotFoundError:
        return RecoveryReport()
    if _nothing_to_do(names):
        return RecoveryReport()
    journals = sorted(n for n in names if n.endswith(".journal"))
    # Read every journal before acting on any: damage anywhere changes nothing.
    parsed = []
    problems: List[str] = []
    for name in journals:
        try:
            parsed.append(((*staging, name), _read_journal(fs, (*staging, name))))
        except JournalError as exc:
            problems.extend(f"{name}: {p}" for p in exc.problems)
    if problems:
        raise JournalError(fs.abspath(staging), problems)
    rolled_back = rolled_forward = False
    deferred: List[Rel] = []
    for rel, journal in parsed:
        state = journal.state
        steps = journal.steps
        if state == _journal.COMMITTING:
            try:
                _commit.undo(fs, steps, retrier)
                if journal.header is None or journal.header.durable:
                    _commit.barrier(fs, journal.areas, _commit.undone_dirs(steps))
            except OSError as exc:
                # The journal stays: the next recovery starts the undo again.
                where = exc.filename if exc.filename is not None else fs.root
                raise RollbackError(
                    fs.root, "undo an interrupted commit at", where
                ) from exc
            rolled_back = True
        elif state == _journal.COMMITTED:
            _commit.purge_backups(fs, steps, deferred)
            rolled_forward = True
        for area in journal.areas:
            _commit.purge(fs, area, area, _commit.trash_for(area), deferred)
            _drop_mount_staging(fs, area[:-1])
        if any(fs.exists(area) for area in journal.areas):
            continue  # the journal alone lists them: kept for the next recovery
        if journal.header is None or journal.header.durable:
            _commit.settle_areas(fs, journal.areas)
        fs.unlink(rel)
    # Staging areas of transactions that died before their journal's first
    # append survived (their names are fixed-length: tx-<16 hex>).
    for name in names:
        if name.startswith("tx-"):
            area = (*staging, name)
            _commit.purge(fs, area, area, _commit.trash_for(area), deferred)
    purged, still = _empty_trash(fs)
    return RecoveryReport(
        rolled_back=rolled_back,
        rolled_forward=rolled_forward,
        purged=purged,
        deferred=tuple(dict.fromkeys(fs.abspath(p) for p in (*deferred, *still))),
    )


def _trash_notes(fs: RootFS) -> List[Tuple[Rel, Optional[Rel], Rel]]:
    """``(note, original path, entry)`` of every deferred entry, and stray entries."""
    try:
        names = set(fs.listdir(ROOT_TRASH))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: List[Tuple[Rel, Optional[Rel], Rel]] = []
    described = set()
    for name in sorted(names):
        if not name.endswith(_commit.ORIGIN_SUFFIX):
            continue
        note = (*ROOT_TRASH, name)
        origin, item = _commit.read_origin(fs, note)
        token = name[: -len(_commit.ORIGIN_SUFFIX)]
        found.append((note, origin, item or (*ROOT_TRASH, token)))
        described.add(token)
    found.extend(
        ((*ROOT_TRASH, name + _commit.ORIGIN_SUFFIX), None, (*ROOT_TRASH, name))
        for name in sorted(names - described)
        if not name.endswith(_commit.ORIGIN_SUFFIX)
    )
    return found


def _empty_trash(fs: RootFS) -> Tuple[int, List[Rel]]:
    purged = 0
    still: List[Rel] = []
    for note, origin, item in _trash_notes(fs):
        left: List[Rel] = []
        _commit.purge(fs, item, origin or item, None, left)
        if fs.exists(item):
            still.append(origin or item)
            if os.environ.get(REBOOT_ENV) == "1":
                _delete_on_reboot(fs, item)
            continue
        purged += 1
        if fs.exists(note):
            fs.unlink(note)
        _drop_mount_staging(fs, item[:-1])
        _drop_mount_staging(fs, item[:-2])
    if fs.exists(ROOT_TRASH) and not fs.listdir(ROOT_TRASH):
        fs.rmdir(ROOT_TRASH)
    return purged, still


REBOOT_ENV = "FSTX_DELETE_ON_REBOOT"
"""Set to ``1`` to have Windows delete trash entries still in use at the next boot."""


def _delete_on_reboot(fs: RootFS, item: Rel) -> None:
    """Opt-in (off by default): ask the OS to delete a held trash entry at boot.

    Only Windows can (``MOVEFILE_DELAY_UNTIL_REBOOT``, elevated processes
    only); elsewhere nothing holds a file against deletion and this is a no-op.
    The entry stays listed until a recovery finds it gone.
    """
    paths = [fs.abspath(p) for p in fs.walk_files(item)]
    if all(impl.schedule_delete_on_reboot(p) for p in paths):
        _log.info("%r will be deleted at the next boot", fs.abspath(item))


def _drop_mount_staging(fs: RootFS, rel: Rel) -> None:
    """Remove a mount's emptied staging directory (or its trash); the root's stays."""
    if (
        rel
        and rel[0] != STAGING
        and STAGING in rel
        and fs.is_dir(rel)
        and not fs.listdir(rel)
    ):
        fs.rmdir(rel)


def status(root: str | os.PathLike[str]) -> Status:
    """Look at ``root`` without changing anything.

    ``pending`` is True when a journal is left by a transaction whose process
    is gone (a live transaction holding the lock is not pending).
    """
    path = os.path.abspath(os.fspath(root))
    names = _staging_names(path)
    if _nothing_to_do(names):
        return Status()
    assert names is not None
    pending = False
    if any(n.endswith(".journal") or n.startswith("tx-") for n in names):
        lock = RootLock(path, os.path.join(path, STAGING), 0)
        if lock.try_acquire():
            lock.release()
            pending = True
    deferred: List[str] = []
    if TRASH in names:
        fs = RootFS(path)
        try:
            for _note, origin, item in _trash_notes(fs):
                deferred.append(fs.abspath(origin or item))
        finally:
            fs.close()
    return Status(pending=pending, deferred=tuple(dict.fromkeys(deferred)))
