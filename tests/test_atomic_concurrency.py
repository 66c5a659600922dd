"""Cache writers under contention: many processes, readers, sweeps, and SIGKILL.

Every payload carries its own SHA-256, so any reader can tell a whole entry
from a torn one without knowing who wrote it.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Set, Tuple

import pytest

import fstx
from fstx._atomic import TEMP_PREFIX

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerProcess
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier, Event

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock are POSIX"),
    pytest.mark.timeout(120),
]

# forkserver: each writer is a fresh process (no threads or locks inherited from
# pytest), forked from a server that has imported fstx and this module once.
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["fstx", __name__])

WRITERS = 8
WRITES = 150
KEYS = 16
DIGEST = 32

Result = Tuple[str, int, int, bool]  # key, writer, sequence number, published


def make_payload(
    key: str, writer: int, seq: int, rng: random.Random, size: int
) -> bytes:
    body = f"{key} {writer} {seq} ".encode() + rng.randbytes(rng.randrange(size))
    return body + hashlib.sha256(body).digest()


def check_payload(data: bytes, key: str) -> Tuple[int, int]:
    """The (writer, seq) of a whole payload for ``key``; AssertionError if torn."""
    body, digest = data[:-DIGEST], data[-DIGEST:]
    assert len(data) > DIGEST, f"{key}: short entry ({len(data)} bytes)"
    assert hashlib.sha256(body).digest() == digest, f"{key}: torn entry"
    name, writer, seq = body.split(b" ", 3)[:3]
    assert name.decode() == key, f"{key}: entry of {name!r}"
    return int(writer), int(seq)


def leftovers(root: Path) -> Set[str]:
    return {name for name in os.listdir(root) if name.startswith(TEMP_PREFIX)}


def spawn(target: Any, *args: Any) -> ForkServerProcess:
    process = CTX.Process(target=target, args=args, daemon=True)
    process.start()
    return process


# --- many writers ------------------------------------------------------------------


def write_many(
    root: str, writer: int, exist: Any, start: Barrier, results: Queue[List[Result]]
) -> None:
    rng = random.Random(writer)
    done: List[Result] = []
    start.wait()
    for seq in range(WRITES):
        key = f"k{rng.randrange(KEYS):02d}"
        data = make_payload(key, writer, seq, rng, 48_000)
        path = os.path.join(root, key)
        if seq % 2:
            published = fstx.atomic_write(path, data, exist=exist)
        else:
            handle = fstx.atomic_open(path, "wb", exist=exist)
            with handle as f:
                for at in range(0, len(data), 4096):
                    f.write(data[at : at + 4096])
            published = handle.published
        done.append((key, writer, seq, published))
    results.put(done)


def collect(
    results: Queue[List[Result]], writers: List[ForkServerProcess]
) -> List[Result]:
    """The next writer's results; fails at once if a writer died instead."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            crashed = [p.exitcode for p in writers if p.exitcode not in (None, 0)]
            assert not crashed, f"writers failed with exit codes {crashed}"
    raise AssertionError("writers did not finish in 90 s")


class Watcher(threading.Thread):
    """Reads every key (or sweeps the cache) over and over until stopped."""

    def __init__(self, root: Path, *, sweeping: bool) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.sweeping = sweeping
        self.stop = threading.Event()
        self.problems: List[str] = []
        self.reads = 0
        self.swept: List[str] = []

    def run(self) -> None:
        seen: Set[str] = set()
        while not self.stop.is_set():
            if self.sweeping:
                self.swept += fstx.sweep(self.root, older_than=0)
                continue
            for i in range(KEYS):
                key = f"k{i:02d}"
                try:
                    data = (self.root / key).read_bytes()
                except FileNotFoundError:
                    if key in seen:
                        self.problems.append(f"{key} vanished after it was published")
                    continue
                seen.add(key)
                self.reads += 1
                try:
                    check_payload(data, key)
                except AssertionError as exc:
                    self.problems.append(str(exc))


@pytest.mark.parametrize("exist", ["replace", "keep"])
def test_many_writers_leave_only_whole_entries(tmp_path: Path, exist: str) -> None:
    start = CTX.Barrier(WRITERS + 1)
    results: Queue[List[Result]] = CTX.Queue()
    writers = [
        spawn(write_many, str(tmp_path), n, exist, start, results)
        for n in range(WRITERS)
    ]
    reader = Watcher(tmp_path, sweeping=False)
    sweeper = Watcher(tmp_path, sweeping=True)
    start.wait(timeout=60)
    # Started only now: a busy thread would slow this process down as it starts the others.
    reader.start()
    sweeper.start()
    done: List[Result] = []
    for _ in writers:
        done += collect(results, writers)
    for process in writers:
        process.join(timeout=30)
        assert process.exitcode == 0
    for watcher in (reader, sweeper):
        watcher.stop.set()
        watcher.join()

    assert len(done) == WRITERS * WRITES
    assert reader.problems == []
    assert reader.reads > 0
    keys = {key for key, *_ in done}
    assert sorted(os.listdir(tmp_path)) == sorted(keys)  # no temporaries, no strays
    for key in keys:
        final = check_payload((tmp_path / key).read_bytes(), key)
        publishers = [(w, s) for k, w, s, published in done if k == key and published]
        if exist == "keep":
            assert publishers == [final], f"{key}: exactly one writer publishes"
        else:
            assert len(publishers) == sum(k == key for k, *_ in done)
            assert final in publishers
    # The sweeper may only ever have caught a temporary in the instant between its
    # creation and its writer's lock (the writer then starts over); a writer that
    # lost its temporary later would have failed above.
    assert len(sweeper.swept) <= WRITERS * WRITES


# --- writers killed at random moments ----------------------------------------------

FILE_KEYS = [f"f{i}" for i in range(6)]
DIR_KEYS = [f"d{i}" for i in range(3)]
MANIFEST = "MANIFEST"


def fill_dir(where: Path, key: str, writer: int, seq: int, rng: random.Random) -> None:
    names = [f"part{i}" for i in range(rng.randrange(1, 6))]
    (where / "sub").mkdir()
    for name in names:
        data = make_payload(f"{key}/{name}", writer, seq, rng, 200_000)
        with open(where / "sub" / name, "wb") as f:
            f.writelines(data[at : at + 65536] for at in range(0, len(data), 65536))
    (where / MANIFEST).write_text("\n".join(names))


def check_dir(where: Path, key: str) -> None:
    names = (where / MANIFEST).read_text().split("\n")
    assert sorted(os.listdir(where / "sub")) == sorted(names), f"{key}: partial tree"
    for name in names:
        check_payload((where / "sub" / name).read_bytes(), f"{key}/{name}")


def write_until_killed(root: str, writer: int, started: Event) -> None:
    rng = random.Random(writer)
    base = Path(root)
    started.set()
    seq = 0
    while True:
        seq += 1
        exist: Any = rng.choice(["replace", "keep"])
        durability: Any = rng.choice(["full", "none"])
        kind = rng.randrange(3)
        if kind == 0:
            key = rng.choice(DIR_KEYS)
            with fstx.atomic_dir(base / key, exist=exist, durability=durability) as tmp:
                fill_dir(tmp, key, writer, seq, rng)
            continue
        key = rng.choice(FILE_KEYS)
        data = make_payload(key, writer, seq, rng, 1_000_000)
        if kind == 1:
            fstx.atomic_write(base / key, data, exist=exist, durability=durability)
            continue
        with fstx.atomic_open(
            base / key, "wb", exist=exist, durability=durability
        ) as f:
            for at in range(0, len(data), 65536):
                f.write(data[at : at + 65536])


def test_killed_writers_leave_whole_entries_and_sweepable_temporaries(
    tmp_path: Path,
) -> None:
    rng = random.Random(2024)
    total_leftovers = 0
    for round_ in range(3):
        root = tmp_path / f"round{round_}"
        root.mkdir()
        old = set(FILE_KEYS[::2] + DIR_KEYS[:1])
        for key in old:
            if key in DIR_KEYS:
                with fstx.atomic_dir(root / key) as tmp:
                    fill_dir(tmp, key, -1, 0, rng)
            else:
                fstx.atomic_write(root / key, make_payload(key, -1, 0, rng, 1000))
        events = [CTX.Event() for _ in range(4)]
        writers = [
            spawn(write_until_killed, str(root), 100 * round_ + n, events[n])
            for n in range(4)
        ]
        for event in events:
            assert event.wait(timeout=60)
        for process in writers:
            time.sleep(rng.uniform(0.02, 0.3))
            process.kill()
        for process in writers:
            process.join(timeout=30)
            assert process.exitcode == -signal.SIGKILL

        temps = leftovers(root)
        entries = set(os.listdir(root)) - temps
        assert entries <= set(FILE_KEYS + DIR_KEYS), f"strays: {entries}"
        assert old <= entries, "an entry that existed went missing"
        for key in entries:
            if key in DIR_KEYS:
                check_dir(root / key, key)
            else:
                check_payload((root / key).read_bytes(), key)
        # A dead writer's temporary is unlocked: sweep removes every one of them.
        assert {os.path.basename(p) for p in fstx.sweep(root, older_than=0)} == temps
        assert leftovers(root) == set()
        total_leftovers += len(temps)
    # 12 kills, each most likely while a temporary was being filled.
    assert total_leftovers > 0


# --- a writer paused inside its block --------------------------------------------


def pause_inside(root: str, kind: str, inside: Event, go: Event) -> None:
    if kind == "file":
        with fstx.atomic_open(os.path.join(root, "entry"), "wb") as f:
            f.write(b"first half, ")
            f.flush()
            inside.set()
            assert go.wait(timeout=60)
            f.write(b"second half")
    else:
        with fstx.atomic_dir(os.path.join(root, "entry")) as tmp:
            (tmp / "first").write_bytes(b"1")
            inside.set()
            assert go.wait(timeout=60)
            (tmp / "second").write_bytes(b"2")


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("ending", ["finish", "kill"])
def test_sweep_spares_a_paused_writer_and_removes_a_dead_one(
    tmp_path: Path, kind: str, ending: str
) -> None:
    inside, go = CTX.Event(), CTX.Event()
    process = spawn(pause_inside, str(tmp_path), kind, inside, go)
    assert inside.wait(timeout=60)
    temps = leftovers(tmp_path)
    assert len(temps) == 1
    for name in temps:
        os.utime(
            tmp_path / name, (0, 0)
        )  # old enough: only the writer's lock protects it
    assert fstx.sweep(tmp_path, older_than=0) == []
    assert leftovers(tmp_path) == temps

    if ending == "finish":
        go.set()
        process.join(timeout=30)
        assert process.exitcode == 0
        expected: Dict[str, bytes] = (
            {"entry": b"first half, second half"}
            if kind == "file"
            else {"first": b"1", "second": b"2"}
        )
        if kind == "file":
            assert (tmp_path / "entry").read_bytes() == expected["entry"]
        else:
            assert {
                p.name: p.read_bytes() for p in (tmp_path / "entry").iterdir()
            } == expected
        assert fstx.sweep(tmp_path, older_than=0) == []
    else:
        process.kill()
        process.join(timeout=30)
        assert fstx.sweep(tmp_path, older_than=0) == [str(tmp_path / n) for n in temps]
        assert not (tmp_path / "entry").exists()
    assert leftovers(tmp_path) == set()
