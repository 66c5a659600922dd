"""Power cuts, modelled: every crash state the shadow durability model allows recovers right.

Family F3 of crash.md §10. :mod:`crashmodel` records each workload of the
catalogue (and a second device mounted inside the root) with
``durability="full"``, through both of the engine's durability protocols
(``syncfs`` on Linux, an fsync per file and directory elsewhere) and in six
scenarios (a commit, a root's first commit, two commits that fail and roll
back, and the recoveries that undo or finish a commit killed half-way). At
every crash point it generates the process-crash state, the maximum-loss
state, in-order prefixes of what was pending, "all but one" reorderings, torn
journal appends and half-done renames, materialises each distinct one and
recovers it: the tree must be exactly the before-tree or the after-tree, the
before-tree while the commit had not begun, the after-tree once it was
acknowledged, staging clean, and a second recovery a no-op. Crash points are
exhaustive for every workload (the catalogue is small enough).

The first half of this file checks the model itself on hand-written traces:
what a maximum-loss state keeps and loses is what crash.md §0 and §1 say a
pessimistic file system may do.

Counts go to the test output (``-rP`` shows them) and, with
``FSTX_CRASHMODEL_REPORT=dir``, one JSON file per recording;
``python tests/crashmodel.py dir`` adds them up.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from crashmodel import (
    APMS,
    KINDS,
    PROTOCOLS,
    SCENARIOS,
    SECOND_DEVICE,
    UNKNOWN_INO,
    Checker,
    Model,
    MountUnavailableError,
    Recorder,
    Recording,
    Stats,
    materialise,
    record,
    report,
)
from fstx import _journal, _os
from treeutil import installed, snapshot
from workloads import BY_NAME, WORKLOADS, Workload, scratch

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the recorder reads /proc/self/fd and directory descriptors",
)

ROOT = 0
FRESH_EVERY = 97
"""One state in this many is recovered by a new interpreter, not in process."""


def tree(model: Model, k: int, kind: str) -> Dict[str, Tuple[Any, ...]]:
    """The one state of ``kind`` at crash point ``k``, as paths."""
    return model.render(model.state(k, kind))


def trees(model: Model, k: int, kind: str) -> List[Dict[str, Tuple[Any, ...]]]:
    """Every state of ``kind`` at crash point ``k``, as paths."""
    return [model.render(s) for s in model.states(k, [kind])]


# -- the model on hand-written traces ------------------------------------------------


def test_fsync_of_a_file_does_not_make_its_name_durable() -> None:
    m = Model.empty()
    f = m.create(ROOT, "f")
    m.write(f, b"data")
    m.fsync(f)
    k = m.point()
    assert tree(m, k, "process") == {"f": ("file", 0o644, b"data")}
    assert tree(m, k, "max-loss") == {}
    m.fsync(ROOT)
    k = m.point()
    assert tree(m, k, "max-loss") == {"f": ("file", 0o644, b"data")}


def test_unsynced_data_is_lost_under_a_durable_name() -> None:
    m = Model.empty()
    f = m.create(ROOT, "f")
    m.fsync(ROOT)
    m.write(f, b"new")
    k = m.point()
    assert tree(m, k, "max-loss") == {"f": ("file", 0o644, b"")}
    # Write a temporary file, rename it over the old one, fsync the directory
    # but never the data: a zero-length file (xfs, btrfs, ext4 noauto_da_alloc).
    m.write(f, b"old")
    m.fsync(f)
    tmp = m.create(ROOT, "tmp")
    m.write(tmp, b"replacement")
    m.rename(ROOT, "tmp", ROOT, "f")
    m.fsync(ROOT)
    k = m.point()
    assert tree(m, k, "max-loss") == {"f": ("file", 0o644, b"")}
    m.fsync(tmp)
    k = m.point()
    assert tree(m, k, "max-loss") == {"f": ("file", 0o644, b"replacement")}


def test_a_rename_is_durable_once_both_directories_are() -> None:
    m = Model.empty()
    a, b = m.mkdir(ROOT, "a"), m.mkdir(ROOT, "b")
    m.create(a, "f", payload=b"x")
    m.syncfs()
    m.rename(a, "f", b, "g")
    k0 = m.point()
    m.fsync(b)
    k1 = m.point()
    m.fsync(a)
    k2 = m.point()
    for k in (k0, k1):
        assert "a/f" in tree(m, k, "max-loss")
        assert "b/g" not in tree(m, k, "max-loss")
    assert "a/f" not in tree(m, k2, "max-loss")
    assert tree(m, k2, "max-loss")["b/g"] == ("file", 0o644, b"x")


def test_unlink_and_mode_need_their_own_fsync() -> None:
    m = Model.empty()
    f = m.create(ROOT, "f", payload=b"x")
    g = m.create(ROOT, "g", payload=b"y")
    m.syncfs()
    m.unlink(ROOT, "f")
    m.chmod(g, 0o600)
    m.fsync(ROOT)
    k = m.point()
    assert tree(m, k, "max-loss") == {"g": ("file", 0o644, b"y")}
    m.fsync(g)
    k = m.point()
    assert tree(m, k, "max-loss") == {"g": ("file", 0o600, b"y")}
    assert f not in m.entries[ROOT].values()


def test_syncfs_makes_everything_durable() -> None:
    m = Model.empty()
    d = m.mkdir(ROOT, "d")
    f = m.create(d, "f")
    m.write(f, b"data")
    m.symlink(d, "l", "f")
    m.link(d, "f", ROOT, "hard")
    k = m.point()
    assert tree(m, k, "max-loss") == {}
    m.syncfs()
    k = m.point()
    assert tree(m, k, "max-loss") == tree(m, k, "process")
    assert len(tree(m, k, "max-loss")) == 4


def test_prefixes_and_reorderings_follow_the_persistence_model() -> None:
    def build(apm: str, same_dir: bool) -> Tuple[Model, int]:
        m = Model.empty(apm=apm)
        dirs = [ROOT] * 3 if same_dir else [m.mkdir(ROOT, n) for n in "abc"]
        m.syncfs()
        for d, name in zip(dirs, "xyz"):
            m.create(d, name)
        return m, m.point()

    def names(states: List[Dict[str, Tuple[Any, ...]]]) -> List[str]:
        return sorted("".join(p[-1] for p in s if p[-1] in "xyz") for s in states)

    # Three directories: nothing orders the creates.
    m, k = build("ordered", same_dir=False)
    assert names(trees(m, k, "prefix")) == ["x", "xy"]
    assert names(trees(m, k, "except-one")) == ["xy", "xz", "yz"]
    # One directory: its changes land in order, so a reordering is a prefix.
    m, k = build("ordered", same_dir=True)
    assert names(trees(m, k, "except-one")) == ["", "x", "xy"]
    # ALICE's default APM orders nothing without an fsync.
    m, k = build("strict", same_dir=True)
    assert names(trees(m, k, "except-one")) == ["xy", "xz", "yz"]
    assert set(APMS) == {"ordered", "strict"}


def test_a_group_never_lands_without_what_it_depends_on() -> None:
    for apm in APMS:
        m = Model.empty(apm=apm)
        a, b, c = (m.mkdir(ROOT, n) for n in "abc")
        m.create(a, "f", payload=b"x")
        m.syncfs()
        m.rename(a, "f", b, "f")
        m.rename(b, "f", c, "f")
        k = m.point()
        got = trees(m, k, "except-one")
        # Dropping the first rename drops the second, which moves what the
        # first put there: never "a/f" and "c/f" both.
        assert sorted(p for s in got for p in s if p.endswith("/f")) == ["a/f", "b/f"]


def test_a_moved_directory_orders_what_is_done_inside_it() -> None:
    # rename(area/d -> new), then rename(old/x -> new/x): x lands in d, whose
    # ".." the first rename changed, so it never lands without it.
    m = Model.empty()
    area, old = m.mkdir(ROOT, "area"), m.mkdir(ROOT, "old")
    m.mkdir(area, "d")
    m.create(old, "x", payload=b"user data")
    m.syncfs()
    m.rename(area, "d", ROOT, "new")
    d = m.lookup(ROOT, "new")
    assert d is not None
    m.rename(old, "x", d, "x")
    k = m.point()
    for state in trees(m, k, "except-one") + trees(m, k, "prefix"):
        assert "area/d/x" not in state, state


def test_torn_journal_appends() -> None:
    m = Model.empty()
    j = m.create(ROOT, "j.journal")
    first = _journal.encode([_journal.Header("t", "/r")])
    m.write(j, first, journal=True)
    m.fsync(j)
    m.fsync(ROOT)
    more = _journal.encode([_journal.State("two"), _journal.State("three")])
    m.write(j, first + more, journal=True)
    k = m.point()
    torn = [s["j.journal"][2] for s in trees(m, k, "torn-append")]
    assert first + bytes(len(more)) in torn  # zero-filled
    boundary = first + more[: more.index(b"\n") + 1]
    assert boundary in torn  # whole records that look valid, the rest missing
    assert all(t.startswith(first) and first != t != first + more for t in torn)
    whole = _journal.parse(first + more, "j").records
    for data in torn:  # the journal reads each as an unfinished append, never as damage
        got = _journal.parse(data, "j").records
        assert got == whole[: len(got)]


def test_a_rename_over_a_name_may_land_half_done() -> None:
    m = Model.empty()
    m.create(ROOT, "dst", payload=b"old")
    m.create(ROOT, "src", payload=b"new")
    m.syncfs()
    m.rename(ROOT, "src", ROOT, "dst")
    k = m.point()
    assert trees(m, k, "rename-half") == [{"src": ("file", 0o644, b"new")}]
    assert tree(m, k, "max-loss") == {
        "dst": ("file", 0o644, b"old"),
        "src": ("file", 0o644, b"new"),
    }


def test_every_kind_of_state_is_generated() -> None:
    m = Model.empty()
    j = m.create(ROOT, "j.journal")
    m.create(ROOT, "dst", payload=b"old")
    m.create(ROOT, "src", payload=b"new")
    m.syncfs()
    m.write(j, _journal.encode([_journal.State("x")] * 2), journal=True)
    m.rename(ROOT, "src", ROOT, "dst")
    k = m.point()
    counts = {kind: len(trees(m, k, kind)) for kind in KINDS}
    assert all(counts.values()), counts


def test_materialise_keeps_hard_links_and_renumbers_the_journal(tmp_path: Any) -> None:
    m = Model.empty()
    f = m.create(ROOT, "f", payload=b"shared")
    m.link(ROOT, "f", ROOT, "g")
    lost = m.create(ROOT, "lost")
    m.unlink(ROOT, "lost")
    staging = m.mkdir(ROOT, ".fstx")
    j = m.create(staging, "t.journal")
    records: List[_journal.Record] = [
        _journal.Header("t", "/r"),
        _journal.Place(("f",), ("g",), 4242, None),
        _journal.Chmod(("g",), 0o600, 0o644, 4343),
    ]
    m.write(j, _journal.encode(records), journal=True, inomap={4242: f, 4343: lost})
    m.syncfs()
    k = m.point()
    path = str(tmp_path / "t")
    materialise(m, m.state(k, "max-loss"), path)
    st = os.stat(os.path.join(path, "f"))
    assert st.st_nlink == 2
    assert os.stat(os.path.join(path, "g")).st_ino == st.st_ino
    with open(os.path.join(path, ".fstx", "t.journal"), "rb") as fh:
        parsed = _journal.parse(fh.read(), "t.journal")
    place, chmod = parsed.steps
    assert isinstance(place, _journal.Place)
    assert isinstance(chmod, _journal.Chmod)
    assert place.ino == st.st_ino
    assert chmod.ino == UNKNOWN_INO + 4343  # an item the state lost matches nothing


def test_states_that_are_not_trees_are_skipped() -> None:
    m = Model.empty(apm="strict")
    a, b = m.mkdir(ROOT, "a"), m.mkdir(ROOT, "b")
    m.mkdir(a, "d")
    m.syncfs()
    m.rename(a, "d", b, "d")
    state = m.state(m.point(), "process")
    d = m.lookup(b, "d")
    assert d is not None
    state.entries[a]["d"] = d  # one directory under two names
    assert m.key(state) is None


# -- the recorder against reality -----------------------------------------------------


def test_the_recorder_keeps_step_with_the_disk(tmp_path: Any) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "old").write_bytes(b"old")
    rec = Recorder(str(root))
    with installed(rec):
        top = _os.open_root(str(root))
        _os.mkdir(top, "d", 0o755)
        d = _os.open_dir(top, "d")
        fd = _os.open_file(d, "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        _os.write(fd, b"through the seam")
        with open(fd, "ab", closefd=False) as side:  # around it: adopted, reported
            side.write(b", and around it")
        _os.fsync(fd)
        _os.close(fd)
        _os.link(d, "f", top, "hard")
        _os.symlink("d/f", top, "sym")
        _os.chmod(top, "old", 0o600)
        _os.rename(d, "f", top, "old")
        _os.unlink(top, "hard")
        os.mkdir(root / "sneaky")  # around the seam, and not expected
        _os.fsync_dir(top)
        _os.close_dir(d)
        _os.rmdir(top, "sneaky")
        _os.syncfs(top)
        _os.close_dir(top)
    rec.finish()
    last = len(rec.model.points) - 1
    want = snapshot(root, inodes=False)
    assert rec.model.render(rec.model.state(last, "process")) == want
    assert rec.model.render(rec.model.state(last, "max-loss")) == want  # syncfs
    bypass = [(what.replace(str(root), "R"), expected) for what, expected in rec.bypass]
    assert bypass == [("written R/d/f", True), ("created dir R/sneaky", False)]
    assert [c.name for c in rec.log if c.mutating][:3] == [
        "mkdir",
        "open_file",
        "write",
    ]
    assert any(str(c).endswith(f"{root}/old") for c in rec.log if c.name == "rename")
    # Before the fsync of the directory, only the file's data was durable:
    # its name was not, so neither is the file.
    early = rec.model.render(rec.model.state(5, "max-loss"))
    assert "d/f" not in early
    assert early["old"] == ("file", 0o644, b"old")


def test_a_recording_pins_the_commit_point(tmp_path: Any) -> None:
    workload = BY_NAME["replace-one-file"]
    with scratch(tmp_path) as base:
        rec = record(workload, base)
    r = rec.recorder
    assert r.commit_write is not None
    assert r.committed_write is not None
    assert r.ack == r.committed_write + 1  # the fsync of the committed record
    assert [c.name for c in r.log if c.mutating and c.point == r.ack] == ["fsync"]
    verdicts = [r.verdict(k) for k in range(rec.points)]
    assert verdicts == sorted(verdicts, key=["before", "either", "after"].index)
    assert verdicts[0] == "before"
    assert verdicts[-1] == "after"
    assert [b for b in r.bypass if not b[1]] == []


def test_the_oracle_is_not_vacuous(tmp_path: Any) -> None:
    """Without its barriers the engine loses commits, and the checker says so."""
    workload = BY_NAME["replace-one-file"]
    with scratch(tmp_path) as base:
        rec = record(
            workload, os.path.join(base, "rec"), skip=lambda call: call.name == "syncfs"
        )
        os.mkdir(os.path.join(base, "work"))
        stats = Checker(rec, os.path.join(base, "work")).run(kinds=["max-loss"])
    assert stats.failures
    assert "must recover to after" in stats.failures[0]


# -- every workload, every crash point ---------------------------------------------------


CATALOGUE: List[Tuple[Workload, Optional[str]]] = [(w, None) for w in WORKLOADS]
CATALOGUE.append((SECOND_DEVICE, "mnt"))


def check_recording(
    make: Callable[[str], Recording],
    tmp_path: Any,
    record_property: Callable[[str, object], None],
    kinds: Tuple[str, ...] = KINDS,
) -> Stats:
    """Record, check every state, report the counts; the stats."""
    with scratch(tmp_path) as base:
        try:
            rec = make(os.path.join(base, "rec"))
        except MountUnavailableError as exc:
            pytest.skip(f"needs a tmpfs mounted inside the root: {exc}")
        os.mkdir(os.path.join(base, "work"))
        checker = Checker(rec, os.path.join(base, "work"), str(tmp_path), FRESH_EVERY)
        stats = checker.run(kinds=kinds)
    report(stats)
    print(stats.line())
    record_property("crashmodel", json.dumps(stats.as_dict()))
    unexpected = [what for what, expected in rec.recorder.bypass if not expected]
    assert unexpected == [], f"changes that bypassed the OS layer: {unexpected}"
    return stats


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("workload", "mount"), [pytest.param(w, m, id=w.name) for w, m in CATALOGUE]
)
def test_every_crash_state_recovers(
    *,
    workload: Workload,
    mount: Optional[str],
    protocol: str,
    scenario: str,
    tmp_path: Any,
    record_property: Callable[[str, object], None],
) -> None:
    def make(base: str) -> Recording:
        return record(workload, base, protocol=protocol, scenario=scenario, mount=mount)

    stats = check_recording(make, tmp_path, record_property)
    assert stats.failures == [], "\n\n".join(stats.failures)
    assert stats.checked > 0
    assert stats.generated.get("max-loss") == stats.points
    assert stats.generated.get("process") == stats.points


@pytest.mark.slow
@pytest.mark.parametrize("workload", [pytest.param(w, id=w.name) for w in WORKLOADS])
def test_strict_persistence_model(
    workload: Workload, tmp_path: Any, record_property: Callable[[str, object], None]
) -> None:
    """ALICE's default APM, with ``syncfs`` barriers: only reorderings are out of reach.

    Under the ``strict`` model metadata changes of one inode (two renames in
    one directory, a backup link and the rename over the file it keeps) may
    land out of order without an fsync between them. fstx relies on that
    order, as every journaling file system keeps it; "all but one" states are
    left out here (the ordered model checks them), every other kind must
    recover.
    """

    def make(base: str) -> Recording:
        return record(workload, base, apm="strict")

    kinds = tuple(k for k in KINDS if k != "except-one")
    stats = check_recording(make, tmp_path, record_property, kinds)
    assert stats.failures == [], "\n\n".join(stats.failures)
