r"""The journal: what a transaction is about to do, kept where a crash cannot lose it.

A journal is a text file ``<root>/.fstx/<txid>.journal``, one record a line::

    1c9f02aa {"t":"header","version":1,"txid":"5f0c...","root":"/srv/venv"}
    7d41e0b2 {"t":"place","src":".fstx/tx-5f0c/s0","dst":"bin/tool","backup":null,...}
    0a11c3f4 {"t":"state","state":"committing"}

Each line starts with the CRC-32 of its JSON text, so a record is trusted only
whole. A torn last line (a crash mid-append) is ignored; damage anywhere else
raises :class:`~fstx.JournalError` and nothing is acted on. Paths are stored
relative to the root as ``/``-joined components; JSON's ``\\u`` escapes carry
undecodable (surrogate-escaped) names through unchanged.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import attrs

from fstx._errors import JournalError

__all__ = [
    "VERSION",
    "Area",
    "Chmod",
    "Header",
    "Journal",
    "Place",
    "Record",
    "Remove",
    "State",
    "Step",
    "encode",
    "parse",
]

VERSION = 1
"""The format version written into every header."""

Rel = Tuple[str, ...]

COMMITTING = "committing"
COMMITTED = "committed"


def _rel(value: Union[str, Rel]) -> Rel:
    if isinstance(value, tuple):
        return value
    return tuple(value.split("/"))


def _join(rel: Rel) -> str:
    return "/".join(rel)


@attrs.frozen
class Header:
    """The first record: version, transaction id, root (for people), durability."""

    txid: str
    root: str
    version: int = VERSION
    durable: bool = True


@attrs.frozen
class Place:
    """Rename ``src`` to ``dst``; an existing ``dst`` is kept at ``backup`` first.

    ``ino`` is the inode number of the item at ``src`` when it was planned:
    undo moves ``dst`` back only if it is that very item, so that undoing a
    step twice, or a step that never ran, changes nothing. ``staged`` is True
    when ``src`` lies in a staging area (new content, new directories).
    """

    src: Rel = attrs.field(converter=_rel)
    dst: Rel = attrs.field(converter=_rel)
    ino: int
    backup: Optional[Rel] = attrs.field(
        converter=attrs.converters.optional(_rel), default=None
    )
    staged: bool = True


@attrs.frozen
class Remove:
    """Move ``path`` to ``backup`` (deleted for good once the commit is durable)."""

    path: Rel = attrs.field(converter=_rel)
    backup: Rel = attrs.field(converter=_rel)


@attrs.frozen
class Chmod:
    """Set the mode bits of ``path`` (inode ``ino``); undo restores ``old_mode``."""

    path: Rel = attrs.field(converter=_rel)
    mode: int
    old_mode: int
    ino: int


@attrs.frozen
class Area:
    """A staging area (one per device) that the transaction created."""

    path: Rel = attrs.field(converter=_rel)


@attrs.frozen
class State:
    """A change of state: ``committing`` (changes may have started), ``committed``."""

    state: str


Step = Union[Place, Remove, Chmod]
Record = Union[Header, Place, Remove, Chmod, Area, State]

_KINDS: Dict[str, Type[Any]] = {
    "header": Header,
    "place": Place,
    "remove": Remove,
    "chmod": Chmod,
    "area": Area,
    "state": State,
}
_NAMES = {cls: name for name, cls in _KINDS.items()}
_PATH_FIELDS = frozenset({"path", "src", "dst", "backup"})


def encode(records: Sequence[Record]) -> bytes:
    """Serialise records as checksummed lines, ready for one append."""
    lines = []
    for record in records:
        fields: Dict[str, Any] = {"t": _NAMES[type(record)]}
        for name, value in attrs.asdict(record, recurse=False).items():
            fields[name] = _join(value) if name in _PATH_FIELDS and value else value
        text = json.dumps(fields, separators=(",", ":"), ensure_ascii=True)
        raw = text.encode("ascii")
        lines.append(b"%08x %s\n" % (zlib.crc32(raw), raw))
    return b"".join(lines)


@attrs.frozen
class Journal:
    """A parsed journal: its header and the records after it, in order.

    ``header`` is None when not even the first append survived whole.
    """

    header: Optional[Header]
    records: Tuple[Record, ...]
    torn: bool = False

    @property
    def steps(self) -> Tuple[Step, ...]:
        """The steps of the commit, in the order they apply."""
        return tuple(r for r in self.records if isinstance(r, (Place, Remove, Chmod)))

    @property
    def areas(self) -> Tuple[Rel, ...]:
        """The staging areas the transaction created."""
        return tuple(r.path for r in self.records if isinstance(r, Area))

    @property
    def state(self) -> Optional[str]:
        """The last state reached (None: still planning)."""
        states = [r.state for r in self.records if isinstance(r, State)]
        return states[-1] if states else None


def _check_rel(value: object, problems: List[str], where: str) -> None:
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: path must be a non-empty string")
        return
    parts = value.split("/")
    # Only what is absolute here: on POSIX "\\x" and "C:x" are plain names.
    if value.startswith(("/", os.sep)) or os.path.splitdrive(value)[0]:
        problems.append(f"{where}: absolute path {value!r} refused")
    elif any(p in ("", ".", "..") for p in parts):
        problems.append(f"{where}: path {value!r} leaves the root or is not normal")


def _build(fields: Dict[str, Any], problems: List[str], where: str) -> Optional[Record]:
    kind = fields.pop("t", None)
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        problems.append(f"{where}: unknown record type {kind!r}")
        return None
    found = len(problems)
    for name in _PATH_FIELDS & fields.keys():
        if name == "backup" and fields[name] is None:
            continue
        _check_rel(fields[name], problems, where)
    if len(problems) > found:
        return None  # a path that is not a string would break the converters
    try:
        record: Record = cls(**fields)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: bad {kind} record ({exc})")
        return None
    return record


def _runs_on(line: bytes) -> bool:
    """Whether ``line`` is a whole, valid record with more text after it.

    That is two records run together by a damaged newline. A torn append
    loses the end of what was written; it never glues text after a record.
    """
    crc, _, raw = line.partition(b" ")
    try:
        want = int(crc, 16) if len(crc) == 8 else -1
    except ValueError:
        return False
    end = raw.find(b"}")
    while 0 <= end < len(raw) - 1:
        if zlib.crc32(raw[: end + 1]) == want:
            return True
        end = raw.find(b"}", end + 1)
    return False


def parse(data: bytes, name: str) -> Journal:
    """Parse and validate a journal, collecting every problem before raising.

    Args:
        data: the file's bytes.
        name: its path, for messages.

    Raises:
        JournalError: anything but a torn last record is wrong.
    """
    lines = data.split(b"\n")
    # The text after the last newline is an unfinished append: a torn record.
    tail = lines.pop()
    torn = bool(tail)
    problems: List[str] = []
    records: List[Record] = []
    for number, line in enumerate(lines, start=1):
        where = f"record {number}"
        crc, _, raw = line.partition(b" ")
        try:
            good = len(crc) == 8 and int(crc, 16) == zlib.crc32(raw)
        except ValueError:
            good = False
        if not good:
            if number == len(lines) and not torn and not _runs_on(line):
                torn = True  # a whole line with a bad checksum at the end: torn too
                continue
            problems.append(f"{where}: checksum mismatch")
            continue
        try:
            fields = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            problems.append(f"{where}: not JSON")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        record = _build(fields, problems, where)
        if record is not None:
            records.append(record)
    if not problems and not records:
        # Nothing whole was ever appended: a crash during the first write.
        return Journal(None, (), torn)
    if not problems and not isinstance(records[0], Header):
        problems.append("record 1: missing header")
    if not problems:
        header = records[0]
        assert isinstance(header, Header)
        if header.version != VERSION:
            problems.append(
                f"record 1: format version {header.version} is not supported "
                f"(this fstx reads version {VERSION})"
            )
        if any(isinstance(r, Header) for r in records[1:]):
            problems.append("a second header")
    if problems:
        raise JournalError(name, problems)
    header = records[0]
    assert isinstance(header, Header)
    return Journal(header, tuple(records[1:]), torn)
