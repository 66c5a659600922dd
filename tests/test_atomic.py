"""Tests of the cache writers: atomic_write, atomic_open, atomic_dir and sweep."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

if sys.platform != "win32":
    import resource

import fstx
from fstx import _atomic, _os

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names")

Call = Tuple[str, str, Tuple[Any, ...]]


def temps(root: Path) -> List[str]:
    """Every ``.fstx-tmp-*`` entry under ``root``, relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if name.startswith(_atomic.TEMP_PREFIX):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def tree(root: Path) -> Dict[str, Optional[bytes]]:
    """``{relative path: content}`` of a tree; directories map to None."""
    out: Dict[str, Optional[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


@contextlib.contextmanager
def hooked(hook: Callable[[str, str, Tuple[Any, ...]], None]) -> Iterator[None]:
    previous = _os.set_hook(hook)
    try:
        yield
    finally:
        _os.set_hook(previous)


@contextlib.contextmanager
def recording() -> Iterator[List[Call]]:
    calls: List[Call] = []
    with hooked(lambda name, phase, args: calls.append((name, phase, args))):
        yield calls


def failing(
    at: str, err: int = errno.EIO, *, times: int = 1 << 30
) -> Callable[..., None]:
    """A hook that fails the first ``times`` calls of ``at``."""
    left = [times]

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name == at and phase == "before" and left[0] > 0:
            left[0] -= 1
            raise OSError(err, os.strerror(err))

    return hook


class FakeTime:
    """A clock and a sleep for RetryPolicy: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def called(calls: List[Call], *names: str) -> List[str]:
    return [name for name, phase, _ in calls if phase == "before" and name in names]


# --- atomic_write ------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["full", "none"])
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"\x00binary\xff" * 1000, b"\x00binary\xff" * 1000, id="bytes"),
        pytest.param("héllo ✓\n", "héllo ✓\n".encode(), id="str-utf8"),
        pytest.param(bytearray(b"ba"), b"ba", id="bytearray"),
        pytest.param(memoryview(b"mv"), b"mv", id="memoryview"),
        pytest.param(b"", b"", id="empty"),
    ],
)
def test_atomic_write_round_trip(
    tmp_path: Path, data: Any, expected: bytes, durability: Any
) -> None:
    target = tmp_path / "entry"
    assert fstx.atomic_write(target, data, durability=durability) is True
    assert target.read_bytes() == expected
    assert fstx.atomic_write(str(target), b"second", durability=durability) is True
    assert target.read_bytes() == b"second"
    assert temps(tmp_path) == []


def test_atomic_write_new_file_gets_default_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        fstx.atomic_write(tmp_path / "f", b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_atomic_write_refuses_other_data(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bytes or str"):
        fstx.atomic_write(tmp_path / "f", 42)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_creates_missing_parents(tmp_path: Path) -> None:
    target = tmp_path / "ab" / "cd" / "entry"
    with recording() as calls:
        assert fstx.atomic_write(target, b"x")
    assert target.read_bytes() == b"x"
    # each new directory's entry is flushed in its parent, and the leaf after the rename
    assert called(calls, "mkdir", "fsync_dir").count("fsync_dir") == 3


def test_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert fstx.atomic_write("entry", b"x")
    assert (tmp_path / "entry").read_bytes() == b"x"


def test_exist_keep_keeps_existing_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    assert fstx.atomic_write(target, b"first", exist="keep") is True
    before = target.stat()
    with recording() as calls:
        assert fstx.atomic_write(target, b"second", exist="keep") is False
    assert target.read_bytes() == b"first"
    assert target.stat().st_ino == before.st_ino
    assert called(calls, "open_file", "write", "rename", "rename_noreplace") == []
    assert temps(tmp_path) == []


def test_exist_replace_replaces_by_rename(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.write_bytes(b"old")
    with open(target, "rb") as reader:  # a reader keeps the old file whole
        assert fstx.atomic_write(target, b"new", exist="replace") is True
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new"


def test_exist_keep_on_a_directory(tmp_path: Path) -> None:
    (tmp_path / "entry").mkdir()
    assert fstx.atomic_write(tmp_path / "entry", b"x", exist="keep") is False
    assert (tmp_path / "entry").is_dir()


def test_replace_a_directory_with_a_file_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "entry").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        fstx.atomic_write(tmp_path / "entry", b"x")
    assert info.value.filename == str(tmp_path / "entry")
    assert "atomic_write" in str(info.value)
    assert (tmp_path / "entry").is_dir()
    assert temps(tmp_path) == []


def test_long_name(tmp_path: Path) -> None:
    name = "é" * 127 + "x"  # 255 bytes in UTF-8: the longest name ext4 and tmpfs allow
    assert len(os.fsencode(name)) == 255
    assert fstx.atomic_write(tmp_path / name, b"long")
    with fstx.atomic_open(tmp_path / name, "w") as f:
        f.write("text")
    with fstx.atomic_dir(tmp_path / ("d" * 255)) as tmp:
        (tmp / "f").write_bytes(b"")
    assert (tmp_path / name).read_text() == "text"
    assert (tmp_path / ("d" * 255) / "f").exists()
    assert temps(tmp_path) == []


def test_too_long_name_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        fstx.atomic_write(tmp_path / ("n" * 256), b"x")
    assert info.value.errno == errno.ENAMETOOLONG
    assert temps(tmp_path) == []


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(b"\xff\xfe-not-utf8", id="bytes"),
        pytest.param(os.fsdecode(b"\xff\xfe-not-utf8"), id="surrogateescape"),
        pytest.param("e\u0301", id="nfd"),
    ],
)
def test_non_utf8_and_odd_names(tmp_path: Path, name: Any) -> None:
    parent = os.fsencode(tmp_path) if isinstance(name, bytes) else str(tmp_path)
    target = os.path.join(parent, name)
    assert fstx.atomic_write(target, b"x")
    with fstx.atomic_open(target, "wb") as f:
        f.write(b"y")
    assert os.fsencode(name) in os.listdir(os.fsencode(tmp_path))
    with open(target, "rb") as f:
        assert f.read() == b"y"
    assert temps(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"exist": "overwrite"}, "exist must be", id="exist"),
        pytest.param({"durability": "some"}, "durability must be", id="durability"),
    ],
)
@pytest.mark.parametrize("operation", ["atomic_write", "atomic_open", "atomic_dir"])
def test_bad_options_are_plan_errors(
    tmp_path: Path, operation: str, kwargs: Dict[str, str], match: str
) -> None:
    target = tmp_path / "new" / "entry"
    with pytest.raises(fstx.PlanError, match=match) as info:
        if operation == "atomic_write":
            fstx.atomic_write(target, b"x", **kwargs)  # type: ignore[arg-type]
        elif operation == "atomic_open":
            fstx.atomic_open(target, "wb", **kwargs)  # type: ignore[call-overload]
        else:
            fstx.atomic_dir(target, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.operation == operation
    assert str(target) in str(info.value)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("path", ["", "some/dir/", ".", "some/.."])
def test_path_without_a_name(path: str) -> None:
    with pytest.raises(fstx.PlanError, match="must end in a file or directory name"):
        fstx.atomic_write(path, b"x")


# --- atomic_open -------------------------------------------------------------------


def test_atomic_open_binary(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    writer = fstx.atomic_open(target)
    with writer as f:
        f.write(b"part one, ")
        f.write(b"part two")
        assert not target.exists()
        assert len(temps(tmp_path)) == 1
    assert writer.published is True
    assert target.read_bytes() == b"part one, part two"
    assert temps(tmp_path) == []


def test_atomic_open_text_utf8_by_default(tmp_path: Path) -> None:
    target = tmp_path / "entry.txt"
    with fstx.atomic_open(target, "w") as f:
        f.write("naïve ✓\n")
    assert target.read_bytes() == "naïve ✓\n".encode()


def test_atomic_open_text_options(tmp_path: Path) -> None:
    target = tmp_path / "entry.txt"
    with fstx.atomic_open(target, "wt", encoding="latin-1", newline="\r\n") as f:
        f.write("é\n")
    assert target.read_bytes() == b"\xe9\r\n"
    with fstx.atomic_open(target, "w", encoding="ascii", errors="replace") as f:
        f.write("é")
    assert target.read_bytes() == b"?"


@pytest.mark.parametrize("mode", ["w+b", "w+"])
def test_atomic_open_read_back(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "entry"
    with fstx.atomic_open(target, mode) as f:
        f.write(b"abc" if "b" in mode else "abc")
        f.seek(0)
        assert f.read() in (b"abc", "abc")
    assert target.read_bytes() == b"abc"


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        pytest.param("r", "only writes new files", id="r"),
        pytest.param("rb", "only writes new files", id="rb"),
        pytest.param("r+", "only writes new files", id="r+"),
        pytest.param("a", "appending cannot be atomic", id="a"),
        pytest.param("ab", "appending cannot be atomic", id="ab"),
        pytest.param("x", "exist='keep'", id="x"),
        pytest.param("xb", "exist='keep'", id="xb"),
        pytest.param("wbt", "use 'w', 'wb'", id="wbt"),
        pytest.param("ww", "use 'w', 'wb'", id="ww"),
        pytest.param("wU", "use 'w', 'wb'", id="wU"),
    ],
)
def test_atomic_open_refuses_modes(tmp_path: Path, mode: str, match: str) -> None:
    with pytest.raises(fstx.PlanError, match=match) as info:
        fstx.atomic_open(tmp_path / "entry", mode)
    assert "atomic_open" in str(info.value)
    assert repr(mode) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_binary_refuses_encoding(tmp_path: Path) -> None:
    with pytest.raises(fstx.PlanError, match="binary mode takes no encoding"):
        fstx.atomic_open(tmp_path / "entry", "wb", encoding="utf-8")


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_open_exception_publishes_nothing(
    tmp_path: Path, error: type[BaseException]
) -> None:
    target = tmp_path / "entry"
    target.write_bytes(b"old")
    writer = fstx.atomic_open(target, "wb")
    with pytest.raises(error), writer as f:
        f.write(b"new" * 100_000)
        raise error
    assert writer.published is False
    assert target.read_bytes() == b"old"
    assert temps(tmp_path) == []


def test_atomic_open_exception_on_a_new_entry(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), fstx.atomic_open(tmp_path / "entry", "w") as f:
        f.write("partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_caller_closes_the_file(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    writer = fstx.atomic_open(target, "wb")
    with writer as f:
        f.write(b"closed early")
        f.close()
    assert writer.published
    assert target.read_bytes() == b"closed early"
    assert temps(tmp_path) == []


def test_atomic_open_enters_once(tmp_path: Path) -> None:
    writer = fstx.atomic_open(tmp_path / "entry", "wb")
    with writer as f:
        f.write(b"x")
    with pytest.raises(RuntimeError, match="only once"), writer:
        pass


def test_atomic_open_keep_loses_to_a_writer_that_published_first(
    tmp_path: Path,
) -> None:
    target = tmp_path / "entry"
    writer = fstx.atomic_open(target, "wb", exist="keep")
    with writer as f:
        f.write(b"ours")
        assert fstx.atomic_write(target, b"theirs", exist="keep")
    assert writer.published is False
    assert target.read_bytes() == b"theirs"
    assert temps(tmp_path) == []


def test_atomic_open_replace_wins_over_a_writer_that_published_first(
    tmp_path: Path,
) -> None:
    target = tmp_path / "entry"
    writer = fstx.atomic_open(target, "wb", exist="replace")
    with writer as f:
        f.write(b"ours")
        fstx.atomic_write(target, b"theirs")
    assert writer.published is True
    assert target.read_bytes() == b"ours"


def test_close_before_rename_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Windows order (close the temporary, then rename it) also works on POSIX.
    monkeypatch.setattr(_atomic, "_CLOSE_BEFORE_RENAME", True)
    target = tmp_path / "entry"
    with fstx.atomic_open(target, "wb") as f:
        f.write(b"x")
    assert fstx.atomic_write(target, b"y", exist="keep") is False
    assert fstx.atomic_write(tmp_path / "other", b"z", exist="keep") is True
    assert tree(tmp_path) == {"entry": b"x", "other": b"z"}


# --- faults ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "exist", "existing"),
    [
        pytest.param(
            at, "replace", existing, id=f"{at}-{'existing' if existing else 'new'}"
        )
        for at in ("open_file", "write", "fsync", "rename")
        for existing in (b"old", None)
    ]
    # with "keep" an existing entry means nothing is written at all
    + [pytest.param("rename_noreplace", "keep", None, id="rename_noreplace-new")],
)
def test_atomic_write_fault_leaves_target_unchanged(
    tmp_path: Path, at: str, exist: Any, existing: Optional[bytes]
) -> None:
    target = tmp_path / "entry"
    if existing is not None:
        target.write_bytes(existing)
    with hooked(failing(at, errno.ENOSPC)), pytest.raises(OSError) as info:
        fstx.atomic_write(target, b"new", exist=exist)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)
    assert "atomic_write" in str(info.value)
    assert tree(tmp_path) == ({} if existing is None else {"entry": existing})


def test_fault_after_the_rename(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with (
        hooked(failing("fsync_dir")),
        pytest.raises(OSError, match="flushing the directory"),
    ):
        fstx.atomic_write(target, b"new")
    # The rename happened; only its durability is in doubt, and that is what was raised.
    assert tree(tmp_path) == {"entry": b"new"}
    writer = fstx.atomic_open(target, "wb")
    with hooked(failing("fsync_dir")), pytest.raises(OSError), writer as f:
        f.write(b"newer")
    assert writer.published is True
    assert tree(tmp_path) == {"entry": b"newer"}
    directory = fstx.atomic_dir(tmp_path / "dir")
    calls = 0

    def fail_last_fsync_dir(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        nonlocal calls
        if name == "rename_noreplace" and phase == "after":
            calls += 1
        if name == "fsync_dir" and phase == "before" and calls:
            raise OSError(errno.EIO, "lost")

    with hooked(fail_last_fsync_dir), pytest.raises(OSError), directory as d:
        (d / "f").write_bytes(b"")
    assert directory.published is True
    assert tree(tmp_path) == {"entry": b"newer", "dir": None, "dir/f": b""}


@pytest.mark.parametrize("at", ["fsync", "rename"])
def test_atomic_open_fault_leaves_target_unchanged(tmp_path: Path, at: str) -> None:
    target = tmp_path / "entry"
    target.write_bytes(b"old")
    writer = fstx.atomic_open(target, "wb")
    with hooked(failing(at)), pytest.raises(OSError) as info, writer as f:
        f.write(b"new")
    assert info.value.errno == errno.EIO
    assert writer.published is False
    assert target.read_bytes() == b"old"
    assert temps(tmp_path) == []


def test_atomic_open_flush_fault_leaves_target_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.write_bytes(b"old")
    writer = fstx.atomic_open(target, "wb")
    # A real write error at the final flush: a file size limit (EFBIG) on this process.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with pytest.raises(OSError) as info, writer as f:
            f.write(b"new" * 1000)  # buffered: written out when the block ends
            resource.setrlimit(resource.RLIMIT_FSIZE, (1000, limits[1]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.errno == errno.EFBIG
    assert "writing its temporary file" in str(info.value)
    assert writer.published is False
    assert target.read_bytes() == b"old"


def test_failed_cleanup_is_logged_and_left_for_sweep(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "entry"

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in ("rename", "unlink"):
            raise PermissionError(errno.EACCES, "denied")

    with hooked(hook), pytest.raises(PermissionError):
        fstx.atomic_write(target, b"x")
    assert "fstx.sweep() removes it later" in caplog.text
    leftover = temps(tmp_path)
    assert len(leftover) == 1
    assert fstx.sweep(tmp_path, older_than=0) == [str(tmp_path / leftover[0])]
    assert list(tmp_path.iterdir()) == []


def test_transient_rename_error_is_retried(tmp_path: Path) -> None:
    fake = FakeTime()
    policy = fstx.RetryPolicy(sleep=fake.sleep, clock=fake.clock)
    target = tmp_path / "entry"
    target.write_bytes(b"old")
    with hooked(failing("rename", errno.EBUSY, times=2)):
        assert fstx.atomic_write(target, b"new", retry=policy)
    assert len(fake.sleeps) == 2
    assert target.read_bytes() == b"new"
    assert temps(tmp_path) == []


def test_transient_error_past_the_deadline_is_in_use(tmp_path: Path) -> None:
    fake = FakeTime()
    policy = fstx.RetryPolicy(deadline=3.0, sleep=fake.sleep, clock=fake.clock)
    target = tmp_path / "entry"
    target.write_bytes(b"old")
    with hooked(failing("rename", errno.EBUSY)), pytest.raises(fstx.InUseError) as info:
        with fstx.atomic_open(target, "wb", retry=policy) as f:
            f.write(b"new")
    assert info.value.filename == str(target)
    assert "in use" in str(info.value)
    assert 2.9 <= fake.now <= 3.1
    assert target.read_bytes() == b"old"
    assert temps(tmp_path) == []


def test_permanent_rename_error_is_not_retried(tmp_path: Path) -> None:
    fake = FakeTime()
    policy = fstx.RetryPolicy(sleep=fake.sleep, clock=fake.clock)
    with hooked(failing("rename", errno.EROFS)), pytest.raises(OSError) as info:
        fstx.atomic_write(tmp_path / "entry", b"x", retry=policy)
    assert info.value.errno == errno.EROFS
    assert fake.sleeps == []


# --- durability --------------------------------------------------------------------


def test_full_durability_order(tmp_path: Path) -> None:
    with recording() as calls:
        fstx.atomic_write(tmp_path / "entry", b"x")
    # the data is on disk before the rename, and the rename before the call returns
    order = called(calls, "write", "fsync", "rename", "fsync_dir")
    assert order == ["write", "fsync", "rename", "fsync_dir"]


@pytest.mark.parametrize("exist", ["replace", "keep"])
def test_no_durability_makes_no_fsync(tmp_path: Path, exist: Any) -> None:
    (tmp_path / "old-dir").mkdir()
    (tmp_path / "old-dir" / "f").write_bytes(b"")
    with recording() as calls:
        fstx.atomic_write(
            tmp_path / "a" / "b" / "entry", b"x", durability="none", exist=exist
        )
        with fstx.atomic_open(tmp_path / "t", "w", durability="none", exist=exist) as f:
            f.write("x")
        with fstx.atomic_dir(tmp_path / "old-dir", durability="none", exist=exist) as d:
            (d / "sub").mkdir()
            (d / "sub" / "f").write_bytes(b"new")
    assert called(calls, "write", "rename", "rename_noreplace", "exchange")
    assert called(calls, "fsync", "fsync_dir", "syncfs") == []


def test_atomic_dir_full_durability_flushes_every_file_and_directory(
    tmp_path: Path,
) -> None:
    with recording() as calls, fstx.atomic_dir(tmp_path / "entry") as d:
        (d / "a").write_bytes(b"1")
        (d / "sub").mkdir()
        (d / "sub" / "b").write_bytes(b"2")
        (d / "sub" / "deeper").mkdir()
        (d / "link").symlink_to("a")
    flushed = called(calls, "fsync", "fsync_dir")
    # two files; three directories of the tree; the parent after the rename
    assert flushed.count("fsync") == 2
    assert flushed.count("fsync_dir") == 4
    order = called(calls, "fsync", "fsync_dir", "rename_noreplace")
    assert order.index("rename_noreplace") == len(order) - 2
    assert order[-1] == "fsync_dir"


# --- atomic_dir --------------------------------------------------------------------


def test_atomic_dir_publishes_a_tree(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    writer = fstx.atomic_dir(target)
    with writer as d:
        assert isinstance(d, Path)
        assert d.parent == tmp_path
        assert d.name.startswith(".fstx-tmp-")
        assert len(d.name) == len(".fstx-tmp-") + 16
        (d / "file").write_bytes(b"1")
        (d / "sub").mkdir()
        (d / "sub" / "file").write_bytes(b"2")
        assert not target.exists()
    assert writer.published is True
    assert tree(tmp_path) == {
        "entry": None,
        "entry/file": b"1",
        "entry/sub": None,
        "entry/sub/file": b"2",
    }


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_dir_exception_publishes_nothing(
    tmp_path: Path, error: type[BaseException]
) -> None:
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "old").write_bytes(b"old")
    writer = fstx.atomic_dir(tmp_path / "entry", exist="replace")
    with pytest.raises(error), writer as d:
        (d / "sub").mkdir()
        (d / "sub" / "new").write_bytes(b"new")
        raise error
    assert writer.published is False
    assert tree(tmp_path) == {"entry": None, "entry/old": b"old"}


def test_atomic_dir_keep_when_another_writer_won(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    mine = fstx.atomic_dir(target, exist="keep")
    with mine as d:
        (d / "mine").write_bytes(b"")
        with fstx.atomic_dir(target, exist="keep") as theirs:
            (theirs / "theirs").write_bytes(b"")
    assert mine.published is False
    assert tree(tmp_path) == {"entry": None, "entry/theirs": b""}


def test_atomic_dir_keep_over_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "entry").mkdir()
    writer = fstx.atomic_dir(tmp_path / "entry", exist="keep")
    with writer as d:
        (d / "f").write_bytes(b"")
    assert writer.published is False
    assert tree(tmp_path) == {"entry": None}


@pytest.mark.parametrize("old", ["tree", "empty-dir", "file", "symlink", "absent"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-away"])
def test_atomic_dir_replace(tmp_path: Path, old: str, exchange: bool) -> None:
    target = tmp_path / "entry"
    if old == "tree":
        (target / "sub").mkdir(parents=True)
        (target / "sub" / "old").write_bytes(b"old")
    elif old == "empty-dir":
        target.mkdir()
    elif old == "file":
        target.write_bytes(b"old")
    elif old == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep").write_bytes(b"")
        target.symlink_to("elsewhere")
    hook = (lambda *_: None) if exchange else failing("exchange", errno.ENOSYS)
    writer = fstx.atomic_dir(target, exist="replace")
    with hooked(hook), writer as d:
        (d / "new").write_bytes(b"new")
    assert writer.published is True
    expected: Dict[str, Optional[bytes]] = {"entry": None, "entry/new": b"new"}
    if old == "symlink":
        expected.update({"elsewhere": None, "elsewhere/keep": b""})
    assert tree(tmp_path) == expected
    assert temps(tmp_path) == []


def test_atomic_dir_keep_without_renameat2(tmp_path: Path) -> None:
    # macOS and old kernels: rename_noreplace cannot move directories (EPERM from link).
    target = tmp_path / "entry"
    (target / "x").mkdir(parents=True)
    for expected in (False, True):
        writer = fstx.atomic_dir(tmp_path / ("entry" if not expected else "fresh"))
        with hooked(failing("rename_noreplace", errno.EPERM)), writer as d:
            (d / "mine").write_bytes(b"")
        assert writer.published is expected
    assert tree(tmp_path) == {
        "entry": None,
        "entry/x": None,
        "fresh": None,
        "fresh/mine": b"",
    }


@pytest.mark.parametrize("at", ["fsync", "fsync_dir", "exchange", "rename_noreplace"])
def test_atomic_dir_fault_leaves_target_unchanged(tmp_path: Path, at: str) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old").write_bytes(b"old")
    writer = fstx.atomic_dir(target, exist="replace")
    with hooked(failing(at)), pytest.raises(OSError) as info, writer as d:
        (d / "new").write_bytes(b"new")
    assert info.value.errno == errno.EIO
    assert "atomic_dir" in str(info.value)
    assert writer.published is False
    assert tree(tmp_path) == {"entry": None, "entry/old": b"old"}


def test_atomic_dir_rename_away_fault_puts_the_old_entry_back(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old").write_bytes(b"old")
    renames: List[str] = []

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase != "before":
            return
        if name == "exchange":
            raise OSError(errno.EINVAL, "not supported here")
        if name in ("rename", "rename_noreplace"):
            renames.append(name)
            if len(renames) == 3:  # noreplace (exists), rename away, then ours in
                raise OSError(errno.EIO, "lost")

    writer = fstx.atomic_dir(target, exist="replace")
    with hooked(hook), pytest.raises(OSError, match="lost"), writer as d:
        (d / "new").write_bytes(b"new")
    assert tree(tmp_path) == {"entry": None, "entry/old": b"old"}


def test_atomic_dir_old_entry_removal_failure_does_not_undo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old").write_bytes(b"old")
    writer = fstx.atomic_dir(target, exist="replace")
    with hooked(failing("unlink", errno.EACCES)), writer as d:
        (d / "new").write_bytes(b"new")
    assert writer.published is True
    assert (target / "new").read_bytes() == b"new"
    assert "could not remove old entry" in caplog.text
    (leftover,) = temps(tmp_path)
    assert fstx.sweep(tmp_path, older_than=0) == [str(tmp_path / leftover)]
    assert tree(tmp_path) == {"entry": None, "entry/new": b"new"}


def test_atomic_dir_enters_once(tmp_path: Path) -> None:
    writer = fstx.atomic_dir(tmp_path / "entry")
    with writer:
        pass
    with pytest.raises(RuntimeError, match="only once"), writer:
        pass


# --- sweep -------------------------------------------------------------------------


def make_leftovers(where: Path) -> List[str]:
    (where / ".fstx-tmp-0000000000000001").write_bytes(b"partial")
    (where / ".fstx-tmp-0000000000000002" / "sub").mkdir(parents=True)
    (where / ".fstx-tmp-0000000000000002" / "sub" / "f").write_bytes(b"partial")
    return [
        str(where / ".fstx-tmp-0000000000000001"),
        str(where / ".fstx-tmp-0000000000000002"),
    ]


def test_sweep_removes_dead_leftovers_only(tmp_path: Path) -> None:
    leftovers = make_leftovers(tmp_path)
    (tmp_path / "entry").write_bytes(b"keep me")
    (tmp_path / ".fstx-tmpish").write_bytes(b"not ours")
    os.mkfifo(
        tmp_path / ".fstx-tmp-fifo"
    )  # nothing a writer makes: left alone, never opened
    assert fstx.sweep(tmp_path, older_than=0) == leftovers
    assert sorted(os.listdir(tmp_path)) == [".fstx-tmp-fifo", ".fstx-tmpish", "entry"]


def test_sweep_spares_young_leftovers(tmp_path: Path) -> None:
    leftovers = make_leftovers(tmp_path)
    assert fstx.sweep(tmp_path) == []
    for path in leftovers:
        os.utime(path, (0, 0))
    assert fstx.sweep(str(tmp_path), older_than=3600) == leftovers


def test_sweep_never_removes_a_live_writers_temporary(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with fstx.atomic_open(target, "wb") as f, fstx.atomic_dir(tmp_path / "dir") as d:
        f.write(b"live")
        (d / "f").write_bytes(b"live")
        live = temps(tmp_path)
        assert len(live) == 2
        for name in live:
            os.utime(tmp_path / name, (0, 0))  # even when it looks old
        assert fstx.sweep(tmp_path, older_than=0) == []
        assert temps(tmp_path) == live
    assert target.read_bytes() == b"live"
    assert (tmp_path / "dir" / "f").read_bytes() == b"live"
    assert temps(tmp_path) == []


def test_sweep_recursive(tmp_path: Path) -> None:
    (tmp_path / "ab" / "cd").mkdir(parents=True)
    deep = make_leftovers(tmp_path / "ab" / "cd")
    top = make_leftovers(tmp_path)
    (tmp_path / "outside").mkdir()
    make_leftovers(tmp_path / "outside")
    (tmp_path / "ab" / "link").symlink_to(tmp_path / "outside")
    assert fstx.sweep(tmp_path / "ab", older_than=0) == []
    assert fstx.sweep(tmp_path / "ab", older_than=0, recursive=True) == deep
    assert fstx.sweep(tmp_path, older_than=0) == top
    assert len(temps(tmp_path / "outside")) == 2  # the symlink was not followed


def test_sweep_arguments(tmp_path: Path) -> None:
    with pytest.raises(fstx.PlanError, match="older_than"):
        fstx.sweep(tmp_path, older_than=-1)
    with pytest.raises(FileNotFoundError) as info:
        fstx.sweep(tmp_path / "missing")
    assert "sweep" in str(info.value)
    assert info.value.filename == str(tmp_path / "missing")


def test_sweep_while_a_writer_creates_its_temporary(tmp_path: Path) -> None:
    # A sweep that locks a brand-new temporary before its writer does removes it;
    # the writer notices and starts over with another name.
    swept: List[List[str]] = []

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if name in ("open_file", "open_dir") and phase == "after" and not swept:
            swept.append([])  # re-entrancy guard: sweep opens files too
            swept[0] = fstx.sweep(tmp_path, older_than=0)

    with hooked(hook):
        assert fstx.atomic_write(tmp_path / "entry", b"x")
    assert len(swept[0]) == 1
    swept.clear()
    with hooked(hook), fstx.atomic_dir(tmp_path / "dir") as d:
        (d / "f").write_bytes(b"y")
    assert len(swept[0]) == 1
    assert tree(tmp_path) == {"entry": b"x", "dir": None, "dir/f": b"y"}


def test_threads_replace_one_entry(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.write_bytes(b"0" * 4096)
    errors: List[BaseException] = []
    stop = threading.Event()

    def write(digit: int) -> None:
        try:
            for _ in range(50):
                fstx.atomic_write(target, str(digit).encode() * 4096, durability="none")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def read() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if len(data) != 4096 or len(set(data)) != 1:
                errors.append(AssertionError(f"torn read: {data[:20]!r}..."))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert errors == []
    assert temps(tmp_path) == []
