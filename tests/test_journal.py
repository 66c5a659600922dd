"""Tests of the journal format (fstx._journal) and of recovery from damaged journals."""

from __future__ import annotations

import json
import os
import stat
import sys
import zlib
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fstx
from fstx import _journal, _os
from fstx._journal import Area, Chmod, Header, Journal, Place, Record, Remove, State
from treeutil import assert_clean, installed, make_tree, snapshot

if TYPE_CHECKING:
    import pathlib

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names")

ODD = os.fsdecode(b"caf\xe9")  # not UTF-8: a surrogate escape
# On POSIX a leading backslash and a colon are parts of plain names, not a
# root or a drive.
NAMES = [
    "plain",
    ODD,
    "\u00e9t\u00e9",
    "e\u0301",
    "new\nline",
    "back\\slash",
    'q"uote',
    "\\lead",
    "C:",
    "12:00.log",
]


def header() -> Header:
    return Header("5f0c2a7be1d94c33", "/srv/venv \u00e9")


RECORDS: List[Record] = [
    header(),
    Area((".fstx", "tx-5f0c2a7be1d94c33")),
    Place((".fstx", "tx-5f0c", "s1"), ("bin", "tool"), 1234, None),
    Place(
        ("lib", ODD), ("lib", "new\nline"), 99, (".fstx", "tx-5f0c", "b2"), staged=False
    ),
    Place((".fstx", "tx-5f0c", "d3"), ("\u00e9t\u00e9", "e\u0301"), 2**40, None),
    Remove(("back\\slash", 'q"uote'), (".fstx", "tx-5f0c", "b4")),
    Chmod(("bin", "tool"), 0o755, 0o644, 1234),
    State(_journal.COMMITTING),
    State(_journal.COMMITTED),
]


def line(obj: Dict[str, Any]) -> bytes:
    """One journal line with a correct checksum, whatever its content."""
    raw = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(raw), raw)


def boundaries(data: bytes) -> List[int]:
    """Offsets where each record starts, and the end."""
    starts = [0]
    for i, byte in enumerate(data):
        if byte == 0x0A:
            starts.append(i + 1)
    return starts


def record_of(data: bytes, pos: int) -> int:
    """The 1-based number of the record holding byte ``pos``."""
    return data[:pos].count(b"\n") + 1


# -- encoding and parsing ------------------------------------------------------------


def test_round_trip_of_every_record_type() -> None:
    data = _journal.encode(RECORDS)
    assert data.isascii()
    assert data.count(b"\n") == len(RECORDS)
    for text in data.splitlines():
        crc, _, raw = text.partition(b" ")
        assert int(crc, 16) == zlib.crc32(raw)
    journal = _journal.parse(data, "j")
    assert journal == Journal(RECORDS[0], tuple(RECORDS[1:]), torn=False)  # type: ignore[arg-type]
    assert journal.steps == tuple(RECORDS[2:7])
    assert journal.areas == ((".fstx", "tx-5f0c2a7be1d94c33"),)
    assert journal.state == _journal.COMMITTED
    assert journal.header is not None
    assert journal.header.version == _journal.VERSION


@pytest.mark.parametrize(
    "record",
    [pytest.param(r, id=type(r).__name__ + str(i)) for i, r in enumerate(RECORDS[1:])],
)
def test_round_trip_of_each_record_alone(record: Record) -> None:
    data = _journal.encode([header()]) + _journal.encode([record])
    assert _journal.parse(data, "j").records == (record,)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_of_odd_names(name: str) -> None:
    place = Place((".fstx", "tx", "s1"), ("dir " + name, name), 7, ("b", name))
    data = _journal.encode([header(), place])
    assert _journal.parse(data, "j").records == (place,)
    assert b"\n" not in data[:-1].split(b"\n", 1)[1]  # one line per record


_component = st.text(
    st.characters(blacklist_characters="/\x00", blacklist_categories=()),
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))
_rel = st.lists(_component, min_size=1, max_size=4).map(tuple)
_record = st.one_of(
    st.builds(
        Place, _rel, _rel, st.integers(0, 2**63), st.none() | _rel, st.booleans()
    ),
    st.builds(Remove, _rel, _rel),
    st.builds(
        Chmod,
        _rel,
        st.integers(0, 0o7777),
        st.integers(0, 0o7777),
        st.integers(0, 2**63),
    ),
    st.builds(Area, _rel),
    st.builds(State, st.sampled_from([_journal.COMMITTING, _journal.COMMITTED])),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_record, max_size=8))
def test_round_trip_property(records: List[Record]) -> None:
    data = _journal.encode([header(), *records])
    journal = _journal.parse(data, "j")
    assert journal.records == tuple(records)
    assert journal.torn is False


def test_empty_journal_has_no_header() -> None:
    assert _journal.parse(b"", "j") == Journal(None, (), torn=False)


def test_every_prefix_parses_to_its_whole_records() -> None:
    data = _journal.encode(RECORDS)
    starts = boundaries(data)
    for cut in range(len(data) + 1):
        journal = _journal.parse(data[:cut], "j")
        whole = sum(1 for s in starts[1:] if s <= cut)
        assert journal.torn == (cut not in starts), cut
        if whole == 0:
            assert journal.header is None, cut
            assert journal.records == (), cut
        else:
            assert journal.header == RECORDS[0], cut
            assert journal.records == tuple(RECORDS[1:whole]), cut


def test_torn_last_record_is_ignored_at_every_byte() -> None:
    data = _journal.encode(RECORDS)
    last = boundaries(data)[-2]
    for cut in range(last + 1, len(data)):
        journal = _journal.parse(data[:cut], "j")
        assert journal.torn, cut
        assert journal.state == _journal.COMMITTING, cut
        assert journal.records == tuple(RECORDS[1:-1]), cut


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipped_byte_in_any_earlier_record_is_an_error(mask: int) -> None:
    data = _journal.encode(RECORDS)
    last = boundaries(data)[-2]
    for pos in range(last):
        damaged = bytearray(data)
        damaged[pos] ^= mask
        with pytest.raises(fstx.JournalError) as info:
            _journal.parse(bytes(damaged), "/r/.fstx/x.journal")
        number = record_of(data, pos)
        assert info.value.problems == (f"record {number}: checksum mismatch",), pos
        assert info.value.path == "/r/.fstx/x.journal"


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipped_byte_in_the_last_record_is_never_misread(mask: int) -> None:
    data = _journal.encode(RECORDS)
    last = boundaries(data)[-2]
    for pos in range(last, len(data)):
        damaged = bytearray(data)
        damaged[pos] ^= mask
        try:
            journal = _journal.parse(bytes(damaged), "j")
        except fstx.JournalError:
            continue  # damage may be reported
        assert journal.records == tuple(RECORDS[1:-1]), pos  # or ignored, never misread


def _same_checksum(data: bytes, pos: int, new: int) -> bool:
    """Whether replacing ``data[pos]`` by ``new`` leaves a line's checksum value as it was.

    ``1C9F02AA`` (or ``+c9f02aa`` for ``0c9f02aa``) is the same number: the
    record is intact, so that is not damage.
    """
    start = data.rfind(b"\n", 0, pos) + 1
    if pos - start >= 8:
        return False
    old = data[start : start + 8]
    changed = bytearray(old)
    changed[pos - start] = new
    try:
        return int(bytes(changed), 16) == int(old, 16)
    except ValueError:
        return False


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_changed_byte_in_an_earlier_record_is_an_error(data: st.DataObject) -> None:
    encoded = _journal.encode(RECORDS)
    last = boundaries(encoded)[-2]
    pos = data.draw(st.integers(0, last - 1), label="pos")
    new = data.draw(
        st.integers(0, 255).filter(lambda b: b != encoded[pos]), label="byte"
    )
    if _same_checksum(encoded, pos, new):
        return  # the same checksum value, spelled differently: not damage
    damaged = bytearray(encoded)
    damaged[pos] = new
    with pytest.raises(fstx.JournalError):
        _journal.parse(bytes(damaged), "j")


HEAD = {"t": "header", "txid": "ab", "root": "/r", "version": 1}
AREA = {"t": "area", "path": ".fstx/tx-ab"}


def place(**fields: Any) -> Dict[str, Any]:
    base = {
        "t": "place",
        "src": ".fstx/tx-ab/s1",
        "dst": "a",
        "ino": 1,
        "backup": None,
        "staged": True,
    }
    base.update(fields)
    return base


BAD_RECORDS = [
    pytest.param(place(dst="../etc/passwd"), "leaves the root", id="dst-dotdot"),
    pytest.param(place(src="a/../../b"), "leaves the root", id="src-inner-dotdot"),
    pytest.param(place(dst="/etc/passwd"), "absolute path", id="dst-absolute"),
    pytest.param(place(backup="/tmp/b"), "absolute path", id="backup-absolute"),
    pytest.param(place(dst="a//b"), "not normal", id="dst-empty-component"),
    pytest.param(place(dst="./a"), "not normal", id="dst-dot"),
    pytest.param(place(dst=""), "non-empty string", id="dst-empty"),
    pytest.param(place(dst=7), "non-empty string", id="dst-not-a-string"),
    pytest.param(
        {"t": "remove", "path": "..", "backup": ".fstx/b"},
        "leaves the root",
        id="remove-dotdot",
    ),
    pytest.param(
        {"t": "chmod", "path": "/x", "mode": 1, "old_mode": 2, "ino": 3},
        "absolute path",
        id="chmod-absolute",
    ),
    pytest.param(
        {"t": "area", "path": "../outside"}, "leaves the root", id="area-dotdot"
    ),
    pytest.param(
        {"t": "rename-all", "path": "a"},
        "unknown record type 'rename-all'",
        id="unknown-type",
    ),
    pytest.param({"path": "a"}, "unknown record type None", id="no-type"),
    pytest.param(place(extra=1), "bad place record", id="unknown-field"),
    pytest.param({"t": "remove", "path": "a"}, "bad remove record", id="missing-field"),
]


@pytest.mark.parametrize(("record", "problem"), BAD_RECORDS)
def test_bad_record_is_refused(record: Dict[str, Any], problem: str) -> None:
    data = (
        line(HEAD)
        + line(AREA)
        + line(record)
        + line({"t": "state", "state": "committing"})
    )
    with pytest.raises(fstx.JournalError) as info:
        _journal.parse(data, "j")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("record 3: ")
    assert problem in info.value.problems[0]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(
            line({**HEAD, "version": 2}) + line(AREA),
            "format version 2 is not supported",
            id="version-2",
        ),
        pytest.param(
            line({**HEAD, "version": 0}) + line(AREA),
            "format version 0 is not supported",
            id="version-0",
        ),
        pytest.param(line(AREA) + line(HEAD), "missing header", id="no-header-first"),
        pytest.param(
            line(HEAD) + line(HEAD) + line(AREA), "a second header", id="two-headers"
        ),
        pytest.param(
            line(HEAD) + b"%08x [1]\n" % zlib.crc32(b"[1]") + line(AREA),
            "not a JSON object",
            id="json-array",
        ),
        pytest.param(
            line(HEAD) + b"%08x {oops\n" % zlib.crc32(b"{oops") + line(AREA),
            "not JSON",
            id="not-json",
        ),
        pytest.param(
            line(HEAD) + b"%08x \xff\n" % zlib.crc32(b"\xff") + line(AREA),
            "not JSON",
            id="not-ascii",
        ),
        pytest.param(
            line(HEAD) + b"\n" + line(AREA), "checksum mismatch", id="empty-line"
        ),
    ],
)
def test_bad_journal_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(fstx.JournalError) as info:
        _journal.parse(data, "j")
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_every_problem_is_collected_before_raising() -> None:
    good = line(AREA)
    flipped = bytearray(good)
    flipped[12] ^= 1
    data = (
        line(HEAD)
        + bytes(flipped)
        + line({"t": "mystery"})
        + line(place(dst="/etc/passwd", src="../x"))
        + line({"t": "state", "state": "committing"})
    )
    with pytest.raises(fstx.JournalError) as info:
        _journal.parse(data, "/r/.fstx/j.journal")
    problems = info.value.problems
    assert problems[0] == "record 2: checksum mismatch"
    assert problems[1] == "record 3: unknown record type 'mystery'"
    assert sorted(problems[2:]) == [
        "record 4: absolute path '/etc/passwd' refused",
        "record 4: path '../x' leaves the root or is not normal",
    ]
    assert len(problems) == 4
    message = str(info.value)
    assert "'/r/.fstx/j.journal'" in message
    assert all(p in message for p in problems)


# -- recovery from real interrupted transactions ----------------------------------------


class Crash(BaseException):
    """Stands for the process dying: the engine does not catch it as an error."""


Trigger = Callable[[str, str, Tuple[Any, ...]], bool]
Entry = Tuple[Any, ...]


def crash_when(trigger: Trigger) -> _os.Hook:
    """Crash when ``trigger`` says so, then at every later change (nothing more runs)."""
    fired = [False]

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if fired[0]:
            if phase == "before" and name in _os.MUTATING:
                raise Crash
            return
        if trigger(name, phase, args):
            fired[0] = True
            raise Crash

    return hook


def wrote(state: bytes) -> Trigger:
    """Right after the journal append that ends with ``state``."""
    return lambda name, phase, args: (
        name == "write"
        and phase == "after"
        and b'"state":"%s"' % state in bytes(args[1])
    )


def renamed(n: int) -> Trigger:
    """Right after the n-th rename of the commit."""
    seen = [0]

    def trigger(name: str, phase: str, args: Tuple[Any, ...]) -> bool:
        if phase == "after" and name in ("rename", "rename_noreplace"):
            seen[0] += 1
        return seen[0] >= n

    return trigger


def setup_tree(root: pathlib.Path) -> None:
    make_tree(
        root,
        {
            "bin/tool": b"old tool",
            f"lib/{ODD}.py": b"odd",
            "lib/sub/b.py": b"b",
            "new\nline": b"nl",
            "12:00.log": b"log",
            "x": b"x",
        },
    )
    os.chmod(root / "bin/tool", 0o751)
    os.symlink("x", root / "link")


def plan(tx: fstx.Transaction) -> None:
    tx.write_bytes("bin/tool", b"new tool")
    tx.rename(f"lib/{ODD}.py", f"lib2/{ODD}-moved.py")
    tx.delete("lib/sub")
    tx.write_bytes("new\nline", b"replaced")
    tx.write_bytes("link", b"was a link")
    tx.chmod("x", 0o600)
    tx.mkdir("e\u0301/dir")
    tx.write_bytes("12:00.log", b"new log")
    tx.rename("12:00.log", "C:")
    tx.write_bytes("\\lead", b"lead")


LOCK = os.path.join(".fstx", "lock")


def everything(root: pathlib.Path) -> Dict[str, Tuple[Any, ...]]:
    """The whole root, staging included: type, mode, content, inode and mtime of each."""
    out: Dict[str, Tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            full = os.path.join(dirpath, name)
            st_ = os.lstat(full)
            key = os.path.normpath(os.path.relpath(full, root))
            ident = (
                stat.S_IFMT(st_.st_mode),
                stat.S_IMODE(st_.st_mode),
                st_.st_ino,
                # Taking the lock may truncate its (empty) file: older filelock
                # opens it with O_TRUNC. Its time is the lock's, not the tree's.
                None if key == LOCK else st_.st_mtime_ns,
            )
            if stat.S_ISREG(st_.st_mode):
                with open(full, "rb") as f:
                    out[key] = (*ident, f.read())
            elif stat.S_ISLNK(st_.st_mode):
                out[key] = (*ident, os.readlink(full))
            else:
                out[key] = ident
    return out


def journal_of(root: pathlib.Path) -> pathlib.Path:
    found = sorted((root / ".fstx").glob("*.journal"))
    assert len(found) == 1, found
    return found[0]


def crashed(
    root: pathlib.Path, trigger: Trigger, durability: str = "none"
) -> Dict[str, Entry]:
    """Set up, plan and crash a commit; returns the tree as it was before."""
    root.mkdir()
    setup_tree(root)
    before = snapshot(root)
    tx = fstx.transaction(root, durability=durability)
    plan(tx)
    with installed(crash_when(trigger)), pytest.raises((Crash, fstx.RollbackError)):
        tx.commit()
    return before


@pytest.fixture(scope="module")
def after_state(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Entry]:
    """The tree once the plan committed (without inodes)."""
    root = tmp_path_factory.mktemp("reference") / "root"
    root.mkdir()
    setup_tree(root)
    with fstx.transaction(root, durability="none") as tx:
        plan(tx)
    assert_clean(root)
    return snapshot(root, inodes=False)


def test_committing_batch_cut_at_every_byte_recovers_the_before_state(
    tmp_path: pathlib.Path,
) -> None:
    # The crash came while the journal's commit batch (every step, then
    # "committing") was being appended: nothing under the root changed yet.
    # Every byte of the last record, and around every record of the batch.
    probe = tmp_path / "probe"
    crashed(probe, wrote(b"committing"))
    starts = boundaries(journal_of(probe).read_bytes())
    last_size = starts[-1] - starts[-2]
    first_step = 2  # header, area, then the steps
    cuts: List[Tuple[int, int]] = [(-2, k) for k in range(1, last_size)]
    cuts += [(i, d) for i in range(first_step, len(starts) - 2) for d in (-1, 0, 1, 9)]
    for n, (record, offset) in enumerate(cuts):
        root = tmp_path / f"cut{n:04d}"
        before = crashed(root, wrote(b"committing"))
        path = journal_of(root)
        cut = boundaries(path.read_bytes())[record] + offset
        os.truncate(path, cut)
        assert fstx.status(root).pending
        report = fstx.recover(root)
        assert not report.rolled_forward, (record, offset)
        assert snapshot(root) == before, (record, offset)
        assert_clean(root)


def test_committed_record_cut_at_every_byte_is_before_or_after(
    tmp_path: pathlib.Path, after_state: Dict[str, Entry]
) -> None:
    # The crash came after every step and the "committed" append, before the
    # clean-up: cut inside that record, the commit point was not reached.
    probe = tmp_path / "probe"
    crashed(probe, wrote(b"committed"))
    starts = boundaries(journal_of(probe).read_bytes())
    last_size = starts[-1] - starts[-2]
    for k in range(last_size + 1):
        root = tmp_path / f"cut{k:04d}"
        before = crashed(root, wrote(b"committed"))
        assert snapshot(root, inodes=False) == after_state  # every step is in place
        path = journal_of(root)
        size = path.stat().st_size
        os.truncate(path, size - last_size + k)
        report = fstx.recover(root)
        if k == last_size:
            assert (report.rolled_back, report.rolled_forward) == (False, True)
            assert snapshot(root, inodes=False) == after_state
        else:
            assert (report.rolled_back, report.rolled_forward) == (True, False), k
            assert snapshot(root) == before, k
        assert_clean(root)


@pytest.mark.parametrize("durability", ["none", "full"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_crash_while_applying_recovers_the_before_state(
    tmp_path: pathlib.Path, n: int, durability: str
) -> None:
    root = tmp_path / "root"
    before = crashed(root, renamed(n), durability)
    assert snapshot(root) != before
    report = fstx.recover(root)
    assert (report.rolled_back, report.rolled_forward) == (True, False)
    assert snapshot(root) == before
    assert_clean(root)


@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param(wrote(b"committing"), id="nothing-applied"),
        pytest.param("mid-apply", id="half-applied"),
        pytest.param(wrote(b"committed"), id="all-applied"),
    ],
)
def test_flipped_byte_in_an_earlier_record_changes_nothing(
    tmp_path: pathlib.Path, trigger: Any
) -> None:
    root = tmp_path / "root"
    crashed(root, renamed(3) if trigger == "mid-apply" else trigger)
    path = journal_of(root)
    data = path.read_bytes()
    starts = boundaries(data)
    last = starts[-2]
    # Every byte of the record before the last (its newline is what a torn
    # append could be mistaken for), and a sample of each earlier record:
    # checksum, separator, first and middle JSON byte, newline. The parser
    # sees every byte of every record in the tests above.
    positions = set(range(starts[-3], last))
    for a, b in zip(starts, starts[1:-1]):
        positions |= {a, a + 8, a + 9, (a + b) // 2, b - 1}
    state = everything(root)
    key = os.path.relpath(path, root)
    for pos in sorted(positions):
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        path.write_bytes(bytes(damaged))
        # Writing changes the journal's own mtime: that is ours, not recovery's.
        state[key] = (*state[key][:3], path.stat().st_mtime_ns, bytes(damaged))
        with pytest.raises(fstx.JournalError) as info:
            fstx.recover(root)
        assert f"record {record_of(data, pos)}: checksum mismatch" in str(info.value), (
            pos
        )
        assert everything(root) == state, pos
        assert fstx.status(root).pending
    path.write_bytes(data)
    fstx.recover(root)
    assert_clean(root)
