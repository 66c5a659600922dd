"""Readers are not starved: a file replaced by transactions never goes missing.

SPEC §1: on POSIX a replaced file is replaced by an atomic rename, so a reader
opening that path sees the old file or the new one, never "no such file".
A reader (a thread, or a separate process) opens and reads the file in a
tight loop while the main thread replaces it 100 times. Every payload checks
itself (generation, length and content derived from the generation), so a
reader that saw a torn, empty or mixed file would know; and since each
replacement is atomic, the generations a reader sees never go backwards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Callable, List

import pytest

import fstx
from treeutil import assert_clean, snapshot

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="SPEC promises readers' atomicity on POSIX"
)

GENERATIONS = 100
TARGET = "data/file"
WAIT = 60.0  # seconds a reader may take to make progress (a hang, not a timing)


class TornError(Exception):
    """A reader saw content that is not one whole payload."""


@functools.cache
def payload(gen: int) -> bytes:
    """Generation ``gen``'s content: a header, a body derived from gen, a digest."""
    size = 1024 + (gen * 7919) % 16384
    seed = hashlib.sha256(str(gen).encode()).digest()
    body = (seed * (size // len(seed) + 1))[:size]
    head = f"{gen:08d}:{size:08d}:".encode()
    return head + body + hashlib.sha256(head + body).hexdigest().encode()


def check(data: bytes) -> int:
    """The generation of a whole payload; :class:`TornError` for anything else."""
    try:
        gen = int(data[:8])
    except ValueError:
        raise TornError(f"bad header {data[:18]!r} ({len(data)} bytes)") from None
    if data != payload(gen):
        raise TornError(f"generation {gen}: {len(data)} bytes that are not its payload")
    return gen


class ReaderThread(threading.Thread):
    """Opens and reads ``path`` until stopped, checking every read."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.errors: List[str] = []
        self.gens: List[int] = []
        self.reads = 0
        self.stop = threading.Event()
        self.progress = threading.Condition()

    def run(self) -> None:
        last = -1
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
                gen = check(data)
            except (OSError, TornError) as exc:
                self.errors.append(repr(exc))
                continue
            if gen < last:
                self.errors.append(f"generation went back from {last} to {gen}")
            if gen != last:
                self.gens.append(gen)
            last = gen
            with self.progress:
                self.reads += 1
                self.progress.notify_all()

    def wait_reads_past(self, count: int) -> None:
        """Block until the reader finished a read started after ``count`` reads."""
        with self.progress:
            ok = self.progress.wait_for(lambda: self.reads > count + 1, timeout=WAIT)
        assert ok, f"the reader stalled at {self.reads} reads"


READER_PROCESS = textwrap.dedent(
    """
    import json, mmap, os, struct, sys
    sys.path.insert(0, sys.argv[3])
    from test_readers import TornError, check

    path, shared = sys.argv[1], sys.argv[2]
    fd = os.open(shared, os.O_RDWR)
    m = mmap.mmap(fd, 16)
    reads, last, errors, gens = 0, -1, [], []
    while m[8] == 0:
        try:
            with open(path, "rb") as f:
                data = f.read()
            gen = check(data)
        except (OSError, TornError) as exc:
            errors.append(repr(exc))
            continue
        if gen < last:
            errors.append(f"generation went back from {last} to {gen}")
        if gen != last:
            gens.append(gen)
        last = gen
        reads += 1
        struct.pack_into("q", m, 0, reads)
    print(json.dumps({"reads": reads, "errors": errors[:20], "gens": gens}))
    """
)


class ReaderProcess:
    """The same reader in its own process; a shared page carries its progress."""

    def __init__(self, path: Path, tmp: Path) -> None:
        shared = tmp / "reader-progress"
        shared.write_bytes(bytes(16))
        fd = os.open(shared, os.O_RDWR)
        try:
            self.page = mmap.mmap(fd, 16)
        finally:
            os.close(fd)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER_PROCESS, str(path), str(shared),
             os.path.dirname(__file__)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.errors: List[str] = []
        self.gens: List[int] = []

    @property
    def reads(self) -> int:
        return int(struct.unpack_from("q", self.page, 0)[0])

    def wait_reads_past(self, count: int) -> None:
        # The page is the only channel; poll it (a hang fails, nothing is timed).
        waited = threading.Event()
        for _ in range(int(WAIT / 0.001)):
            if self.reads > count + 1 or self.proc.poll() is not None:
                break
            waited.wait(0.001)
        assert self.reads > count + 1, f"the reader stalled at {self.reads} reads"

    def finish(self) -> int:
        self.page[8] = 1
        out, _ = self.proc.communicate(timeout=WAIT)
        self.page.close()
        assert self.proc.returncode == 0
        result = json.loads(out)
        self.errors = result["errors"]
        self.gens = result["gens"]
        return int(result["reads"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


Replace = Callable[[fstx.Transaction, int, Path], None]


def by_write_bytes(tx: fstx.Transaction, gen: int, build: Path) -> None:
    tx.write_bytes(TARGET, payload(gen))


def by_copy(tx: fstx.Transaction, gen: int, build: Path) -> None:
    src = build / f"gen{gen}"
    src.write_bytes(payload(gen))
    tx.copy(src, TARGET)


def by_open(tx: fstx.Transaction, gen: int, build: Path) -> None:
    with tx.open(TARGET) as f:
        data = payload(gen)
        half = len(data) // 2
        f.write(data[:half])  # two writes: a reader must still never see half
        f.write(data[half:])


def by_rename(tx: fstx.Transaction, gen: int, build: Path) -> None:
    tx.rename(f"incoming/gen{gen}", TARGET)


def setup_root(root: Path, replace: Replace) -> None:
    (root / "data").mkdir()
    (root / TARGET).write_bytes(payload(0))
    if replace is by_rename:
        (root / "incoming").mkdir()
        for gen in range(1, GENERATIONS + 1):
            (root / "incoming" / f"gen{gen}").write_bytes(payload(gen))


def replace_all(
    root: Path, build: Path, replace: Replace, *, durability: str,
    wait_reads_past: Callable[[int], None], reads: Callable[[], int],
) -> None:  # fmt: skip
    """Replace the target GENERATIONS times, letting the reader read in between."""
    for gen in range(1, GENERATIONS + 1):
        with fstx.transaction(root, durability=durability) as tx:
            replace(tx, gen, build)
        # At least one read began after this commit: reads and replacements
        # interleave all the way through, not only at the start. Counted from
        # after the commit, so the read in flight then does not count (it
        # could have opened the old file).
        wait_reads_past(reads())


def check_final(
    root: Path, replace: Replace, gens: List[int], errors: List[str]
) -> None:
    assert errors == []
    assert gens[-1] == GENERATIONS
    assert len(gens) > 1  # the reader saw replacements happen
    assert gens == sorted(gens)
    expected = {"data": ("dir",), TARGET: ("file", payload(GENERATIONS))}
    if replace is by_rename:
        expected["incoming"] = ("dir",)
    tree = snapshot(root)
    assert sorted(tree) == sorted(expected)
    assert tree[TARGET][2] == payload(GENERATIONS)
    assert_clean(root)


@pytest.mark.parametrize(
    ("replace", "durability"),
    [
        pytest.param(by_write_bytes, "none", id="write_bytes-none"),
        pytest.param(by_write_bytes, "full", id="write_bytes-full"),
        pytest.param(by_copy, "none", id="copy-none"),
        pytest.param(by_copy, "full", id="copy-full"),
        pytest.param(by_open, "none", id="open-none"),
        pytest.param(by_rename, "none", id="rename-none"),
    ],
)
def test_reader_thread_never_misses_the_file(
    root: Path, tmp_path: Path, replace: Replace, durability: str
) -> None:
    setup_root(root, replace)
    build = tmp_path / "build"
    build.mkdir()
    reader = ReaderThread(root / TARGET)
    reader.start()
    try:
        reader.wait_reads_past(0)
        replace_all(
            root,
            build,
            replace,
            durability=durability,
            wait_reads_past=reader.wait_reads_past,
            reads=lambda: reader.reads,
        )
    finally:
        reader.stop.set()
        reader.join(WAIT)
    assert not reader.is_alive()
    check_final(root, replace, reader.gens, reader.errors)


@pytest.mark.parametrize(
    ("replace", "durability"),
    [
        pytest.param(by_write_bytes, "none", id="write_bytes-none"),
        pytest.param(by_write_bytes, "full", id="write_bytes-full"),
        pytest.param(by_copy, "none", id="copy-none"),
    ],
)
def test_reader_process_never_misses_the_file(
    root: Path, tmp_path: Path, replace: Replace, durability: str
) -> None:
    setup_root(root, replace)
    build = tmp_path / "build"
    build.mkdir()
    reader = ReaderProcess(root / TARGET, tmp_path)
    try:
        reader.wait_reads_past(0)
        replace_all(
            root,
            build,
            replace,
            durability=durability,
            wait_reads_past=reader.wait_reads_past,
            reads=lambda: reader.reads,
        )
        reads = reader.finish()
    finally:
        reader.kill()
    assert reads > GENERATIONS
    check_final(root, replace, reader.gens, reader.errors)


# --- the checker itself -------------------------------------------------------------


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda d: d[: len(d) // 2], id="truncated"),
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: d + b"x", id="extended"),
        pytest.param(lambda d: d[:100] + payload(8)[100:], id="two-generations-mixed"),
        pytest.param(lambda d: d[:-1] + b"0", id="digest-changed"),
    ],
)
def test_checker_refuses_anything_but_a_whole_payload(
    mangle: Callable[[bytes], bytes],
) -> None:
    assert check(payload(7)) == 7
    with pytest.raises(TornError):
        check(mangle(payload(7)))
