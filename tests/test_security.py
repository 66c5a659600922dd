"""Nothing escapes the root: plan-time rejection, symlinks inside the root, TOCTOU.

A sentinel tree beside the root (``root-outside``, whose name also shares the
root's path as a prefix) must never change, whatever the operation and
whatever a symlink inside the root points at. Symlinks that stay inside the
root (a venv's ``lib64 -> lib``) are followed in parents; symlinks that lead
out are refused at planning; a directory swapped for a symlink between
planning and commit makes the commit fail and roll back; a process that flips
a directory and a symlink in a tight ``renameat2(RENAME_EXCHANGE)`` loop never
gets a single write out of the root.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

import fstx
from fstx import _commit
from stracetools import split_args, string_arg
from treeutil import Snapshot, assert_clean, installed, make_tree, snapshot

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX symlinks and dir-fd semantics"
)

Plan = Callable[[fstx.Transaction, str], None]

OUTSIDE = "root-outside"
"""The sentinel's name: a sibling of ``root`` whose path starts with the root's."""

OUT = "outside the root"
LOOP = "symbolic links"
STG = "staging directory"
ITSELF = "root itself"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_DEFAULT = 0o666 & ~UMASK
DIR_DEFAULT = 0o777 & ~UMASK


@pytest.fixture
def outside(root: Path) -> Path:
    """The sentinel tree beside the root; tests check that it never changes."""
    path = root.parent / OUTSIDE
    make_tree(
        path,
        {
            "x": b"outside x",
            "d/f": b"outside d/f",
            "b/old": b"outside b/old",
            "b/keep": b"outside b/keep",
            "b/t/f": b"outside b/t/f",
        },
    )
    os.chmod(path / "x", 0o644)
    return path


def build_static(root: Path, outside: Path) -> None:
    """A root with symlinks in every shape: inward, outward, loops, to staging."""
    make_tree(
        root, {"src": b"src", "lib/x": b"lib x", "lib/sub/y": b"lib sub y", "pkg": None}
    )
    os.chmod(root / "src", 0o640)
    os.chmod(root / "lib" / "x", 0o644)
    links = {
        "lib64": "lib",
        "abslib": f"{root}/lib",
        "lib/sub/up": "../..",
        "out": f"../{OUTSIDE}",
        "absout": str(outside),
        "outfile": f"../{OUTSIDE}/x",
        "dangling": f"../{OUTSIDE}/nope",
        "lib/out2": f"../../{OUTSIDE}",
        "chain": "out",
        "loop": "loop",
        "loopa": "loopb",
        "loopb": "loopa",
        "absloop": f"{root}/absloop",
        "stg": ".fstx",
        "absstg": f"{root}/.fstx",
        "pkg/dirlink": str(outside / "d"),
        "pkg/filelink": f"../../{OUTSIDE}/x",
    }
    for name, target in links.items():
        os.symlink(target, root / name)


def commit_nothing_changed(
    root: Path, outside: Path, inside_before: Snapshot, outside_before: Snapshot
) -> None:
    assert snapshot(root) == inside_before
    assert snapshot(outside) == outside_before
    assert_clean(root)
    assert fstx.status(root).clean


# --- plan-time rejection ---------------------------------------------------------


def _copy_file(tx: fstx.Transaction, p: str) -> None:
    tx.copy("src", p)


def _copy_tree(tx: fstx.Transaction, p: str) -> None:
    tx.copy("lib/sub", p)


def _copy_outside_source(tx: fstx.Transaction, p: str) -> None:
    tx.copy(str(Path(tx.root).parent / OUTSIDE / "d"), p)


def _rename_src(tx: fstx.Transaction, p: str) -> None:
    tx.rename(p, "landed")


def _rename_dst(tx: fstx.Transaction, p: str) -> None:
    tx.rename("src", p)


def _delete(tx: fstx.Transaction, p: str) -> None:
    tx.delete(p)


def _delete_missing_ok(tx: fstx.Transaction, p: str) -> None:
    tx.delete(p, missing_ok=True)


def _write_bytes(tx: fstx.Transaction, p: str) -> None:
    tx.write_bytes(p, b"evil")


def _write_text(tx: fstx.Transaction, p: str) -> None:
    tx.write_text(p, "evil")


def _open(tx: fstx.Transaction, p: str) -> None:
    with tx.open(p) as f:
        f.write(b"evil")


def _mkdir(tx: fstx.Transaction, p: str) -> None:
    tx.mkdir(p)


def _chmod(tx: fstx.Transaction, p: str) -> None:
    tx.chmod(p, 0o777)


# (plan, name): ops that need an existing item get a name that exists in the
# sentinel ("x"), so an engine that followed the path would find it there;
# ops that create get a new name, which would appear in the sentinel.
ESCAPE_OPS = [
    pytest.param(_copy_file, "new", id="copy-dst"),
    pytest.param(_copy_tree, "new", id="copy-tree-dst"),
    pytest.param(_copy_outside_source, "new", id="copy-outside-src-dst"),
    pytest.param(_rename_src, "x", id="rename-src"),
    pytest.param(_rename_dst, "new", id="rename-dst"),
    pytest.param(_delete, "x", id="delete"),
    pytest.param(_delete_missing_ok, "x", id="delete-missing-ok"),
    pytest.param(_write_bytes, "new", id="write-bytes"),
    pytest.param(_write_text, "new", id="write-text"),
    pytest.param(_open, "new", id="open"),
    pytest.param(_mkdir, "new", id="mkdir"),
    pytest.param(_chmod, "x", id="chmod"),
]

ESCAPES = [
    pytest.param(f"../{OUTSIDE}/{{name}}", OUT, id="dotdot"),
    pytest.param(f"lib/../../{OUTSIDE}/{{name}}", OUT, id="dotdot-after-dir"),
    pytest.param(f"lib/sub/../../../{OUTSIDE}/{{name}}", OUT, id="dotdot-deep"),
    pytest.param("..", OUT, id="dotdot-alone"),
    pytest.param("{outside}/{name}", OUT, id="absolute-sibling-sharing-prefix"),
    pytest.param(f"{{root}}/../{OUTSIDE}/{{name}}", OUT, id="absolute-with-dotdot"),
    pytest.param("/{name}", OUT, id="absolute-filesystem-root"),
    pytest.param("out/{name}", OUT, id="relative-symlink-parent"),
    pytest.param("absout/{name}", OUT, id="absolute-symlink-parent"),
    pytest.param("lib/out2/{name}", OUT, id="nested-symlink-parent"),
    pytest.param("lib64/out2/{name}", OUT, id="inward-then-outward-symlink"),
    pytest.param("chain/{name}", OUT, id="symlink-chain"),
    pytest.param(f"lib/sub/up/../{OUTSIDE}/{{name}}", OUT, id="symlink-to-root-dotdot"),
    pytest.param("{root}/absout/{name}", OUT, id="absolute-path-through-symlink"),
    pytest.param("loop/{name}", LOOP, id="symlink-loop-self"),
    pytest.param("loopa/{name}", LOOP, id="symlink-loop-pair"),
    pytest.param("absloop/{name}", LOOP, id="symlink-loop-absolute"),
    pytest.param(".fstx", STG, id="staging-itself"),
    pytest.param(".fstx/{name}", STG, id="staging-child"),
    pytest.param(".fstx/lock", STG, id="staging-lock-file"),
    pytest.param("lib/../.fstx/{name}", STG, id="staging-by-dotdot"),
    pytest.param("{root}/.fstx/{name}", STG, id="staging-absolute"),
    pytest.param("stg/{name}", STG, id="staging-by-symlink"),
    pytest.param("absstg/{name}", STG, id="staging-by-absolute-symlink"),
    pytest.param(".", ITSELF, id="root-dot"),
    pytest.param("lib/..", ITSELF, id="root-by-dotdot"),
    pytest.param("{root}", ITSELF, id="root-absolute"),
]


@pytest.mark.parametrize(("template", "reason"), ESCAPES)
@pytest.mark.parametrize(("plan", "name"), ESCAPE_OPS)
def test_plan_refuses_paths_leading_out_of_the_root(
    root: Path, outside: Path, plan: Plan, name: str, template: str, reason: str
) -> None:
    build_static(root, outside)
    path = template.format(root=root, outside=outside, name=name)
    with fstx.transaction(root, durability="none") as tx:
        inside_before, outside_before = snapshot(root), snapshot(outside)
        with pytest.raises(fstx.PlanError) as info:
            plan(tx, path)
        assert reason in info.value.reason, info.value
        assert info.value.path == path
        assert repr(path) in str(info.value)
        assert tx.operations == ()
    # The refused call left the transaction usable: it committed nothing.
    commit_nothing_changed(root, outside, inside_before, outside_before)


@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        pytest.param(lambda tx: tx.chmod("out", 0o700), "symlink", id="chmod-link"),
        pytest.param(lambda tx: tx.chmod("outfile", 0o600), "symlink", id="chmod-file-link"),
        pytest.param(lambda tx: tx.mkdir("absout"), "in the way", id="mkdir-over-dir-link"),
        pytest.param(
            lambda tx: tx.copy("out", "copied", follow_symlinks=True), OUT,
            id="copy-follow-outward-link",
        ),
        pytest.param(
            lambda tx: tx.copy("loop", "copied", follow_symlinks=True), LOOP,
            id="copy-follow-loop",
        ),
        pytest.param(lambda tx: tx.rename("lib", "lib64/inside"), "into itself",
                     id="rename-dir-into-itself-through-link"),
    ],
)  # fmt: skip
def test_plan_refuses_acting_through_a_final_symlink(
    root: Path, outside: Path, plan: Callable[[fstx.Transaction], None], reason: str
) -> None:
    build_static(root, outside)
    with fstx.transaction(root, durability="none") as tx:
        inside_before, outside_before = snapshot(root), snapshot(outside)
        with pytest.raises(fstx.PlanError, match=reason):
            plan(tx)
    commit_nothing_changed(root, outside, inside_before, outside_before)


# --- symlinks that stay inside the root -----------------------------------------


class Same:
    """Expected entry: exactly what ``path`` was before (same inode and mtime)."""

    def __init__(self, path: str) -> None:
        self.path = path


Expected = Dict[str, Any]


def check_changes(before: Snapshot, after: Snapshot, changes: Expected) -> None:
    """``after`` is ``before`` with exactly ``changes`` (None: gone)."""
    for path, want in changes.items():
        if want is None:
            assert path not in after, path
        elif isinstance(want, Same):
            assert after.get(path) == before[want.path], path
        else:
            got = after.get(path)
            assert got is not None, path
            assert got[: len(want)] == want, path
    rest_after = {k: v for k, v in after.items() if k not in changes}
    rest_before = {k: v for k, v in before.items() if k not in changes}
    assert rest_after == rest_before


def _open_640(tx: fstx.Transaction, p: str) -> None:
    with tx.open(p, file_mode=0o640) as f:
        f.write(b"opened")


INWARD = [
    pytest.param(
        lambda tx: tx.write_bytes("lib64/new", b"n", mode=0o640),
        {"lib/new": ("file", 0o640, b"n")},
        id="write-through-relative-link",
    ),
    pytest.param(
        lambda tx: tx.write_text("abslib/sub/new", "t"),
        {"lib/sub/new": ("file", FILE_DEFAULT, b"t")},
        id="write-through-absolute-link",
    ),
    pytest.param(
        lambda tx: tx.copy("src", "abslib/new"),
        {"lib/new": ("file", 0o640, b"src")},
        id="copy-dst-through-absolute-link",
    ),
    pytest.param(
        lambda tx: tx.copy("lib64/sub/y", "copied"),
        {"copied": ("file", FILE_DEFAULT, b"lib sub y")},
        id="copy-src-through-link",
    ),
    pytest.param(
        lambda tx: tx.rename("lib64/x", "moved"),
        {"lib/x": None, "moved": Same("lib/x")},
        id="rename-src-through-link",
    ),
    pytest.param(
        lambda tx: tx.rename("src", "lib64/sub/new"),
        {"src": None, "lib/sub/new": Same("src")},
        id="rename-dst-through-link",
    ),
    pytest.param(
        lambda tx: tx.delete("lib64/x"),
        {"lib/x": None},
        id="delete-through-link",
    ),
    pytest.param(
        lambda tx: tx.delete("lib/sub/up/lib/sub"),
        {"lib/sub": None, "lib/sub/y": None, "lib/sub/up": None},
        id="delete-tree-through-link-to-root",
    ),
    pytest.param(
        lambda tx: tx.mkdir("lib64/newdir/deeper", mode=0o750),
        {"lib/newdir": ("dir", DIR_DEFAULT), "lib/newdir/deeper": ("dir", 0o750)},
        id="mkdir-through-link",
    ),
    pytest.param(
        lambda tx: tx.chmod("abslib/x", 0o600),
        {"lib/x": ("file", 0o600, b"lib x")},
        id="chmod-through-link",
    ),
    pytest.param(
        lambda tx: _open_640(tx, "lib/sub/up/lib64/new"),
        {"lib/new": ("file", 0o640, b"opened")},
        id="open-through-two-links",
    ),
    pytest.param(
        lambda tx: tx.write_bytes("lib/../lib64/./sub//new", b"n", mode=0o600),
        {"lib/sub/new": ("file", 0o600, b"n")},
        id="write-dotdot-then-link",
    ),
]


@pytest.mark.parametrize(("plan", "changes"), INWARD)
def test_symlink_inside_root_is_followed_to_its_target(
    root: Path,
    outside: Path,
    plan: Callable[[fstx.Transaction], None],
    changes: Expected,
) -> None:
    build_static(root, outside)
    before, outside_before = snapshot(root), snapshot(outside)
    with fstx.transaction(root, durability="none") as tx:
        plan(tx)
    check_changes(before, snapshot(root), changes)
    assert snapshot(outside) == outside_before
    assert_clean(root)


OUTWARD_LINKS = [
    pytest.param(lambda tx: tx.delete("out"), {"out": None}, id="delete-relative-dir-link"),
    pytest.param(lambda tx: tx.delete("absout"), {"absout": None}, id="delete-absolute-dir-link"),
    pytest.param(lambda tx: tx.delete("outfile"), {"outfile": None}, id="delete-file-link"),
    pytest.param(lambda tx: tx.delete("dangling"), {"dangling": None}, id="delete-dangling-link"),
    pytest.param(lambda tx: tx.delete("out/"), {"out": None}, id="delete-link-trailing-slash"),
    pytest.param(lambda tx: tx.delete("loop"), {"loop": None}, id="delete-loop-link"),
    pytest.param(lambda tx: tx.delete("lib/out2"), {"lib/out2": None}, id="delete-nested-link"),
    pytest.param(
        lambda tx: tx.delete("pkg"),
        {"pkg": None, "pkg/dirlink": None, "pkg/filelink": None},
        id="delete-tree-holding-outward-links",
    ),
    pytest.param(
        lambda tx: tx.rename("absout", "moved"),
        {"absout": None, "moved": Same("absout")},
        id="rename-outward-link",
    ),
    pytest.param(
        lambda tx: tx.copy("pkg", "pkg2"),
        {"pkg2": ("dir",), "pkg2/dirlink": Same("pkg/dirlink"),
         "pkg2/filelink": Same("pkg/filelink")},
        id="copy-tree-keeps-outward-links-as-links",
    ),
    pytest.param(
        lambda tx: tx.write_bytes("outfile", b"mine", mode=0o640),
        {"outfile": ("file", 0o640, b"mine")},
        id="write-replaces-the-link-not-its-target",
    ),
    pytest.param(
        lambda tx: _open_640(tx, "outfile"),
        {"outfile": ("file", 0o640, b"opened")},
        id="open-replaces-the-link-not-its-target",
    ),
    pytest.param(
        lambda tx: tx.copy("src", "absout"),
        {"absout": ("file", 0o640, b"src")},
        id="copy-replaces-a-dir-link",
    ),
    pytest.param(
        lambda tx: tx.rename("src", "dangling"),
        {"src": None, "dangling": Same("src")},
        id="rename-replaces-a-dangling-link",
    ),
    pytest.param(
        lambda tx: (tx.delete("out"), tx.mkdir("out/sub")),
        {"out": ("dir", DIR_DEFAULT), "out/sub": ("dir", DIR_DEFAULT)},
        id="delete-link-then-mkdir-in-its-place",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("plan", "changes"), OUTWARD_LINKS)
def test_outward_symlink_is_acted_on_never_its_target(
    root: Path,
    outside: Path,
    plan: Callable[[fstx.Transaction], None],
    changes: Expected,
) -> None:
    build_static(root, outside)
    before, outside_before = snapshot(root), snapshot(outside)
    with fstx.transaction(root, durability="full") as tx:
        plan(tx)
    check_changes(before, snapshot(root), changes)
    assert snapshot(outside) == outside_before
    assert_clean(root)


# --- commit-time TOCTOU: a parent swapped for a symlink before commit ------------


def build_nested(root: Path) -> None:
    make_tree(
        root,
        {
            "top": b"top",
            "a/sib": b"a/sib",
            "a/b/old": b"a/b/old",
            "a/b/keep": b"a/b/keep",
            "a/b/t/f": b"a/b/t/f",
            "a/b/t/g": b"a/b/t/g",
        },
    )


def _plan_open(tx: fstx.Transaction) -> None:
    with tx.open("a/b/old", "w") as f:
        f.write("opened")


UNDER_AB = [
    pytest.param(lambda tx: tx.write_bytes("a/b/new", b"n"), id="write-new"),
    pytest.param(lambda tx: tx.write_bytes("a/b/old", b"n"), id="write-replace"),
    pytest.param(_plan_open, id="open-replace"),
    pytest.param(lambda tx: tx.copy("a/b/t", "a/b/t2"), id="copy-tree"),
    pytest.param(lambda tx: tx.delete("a/b/old"), id="delete-file"),
    pytest.param(lambda tx: tx.delete("a/b/t"), id="delete-tree"),
    pytest.param(lambda tx: tx.chmod("a/b/old", 0o600), id="chmod"),
    pytest.param(lambda tx: tx.mkdir("a/b/c/d"), id="mkdir"),
    pytest.param(lambda tx: tx.rename("a/b/old", "top2"), id="rename-out-of"),
    pytest.param(lambda tx: tx.rename("top", "a/b/top"), id="rename-into"),
    pytest.param(lambda tx: tx.rename("a/b/old", "a/b/renamed"), id="rename-within"),
    pytest.param(
        lambda tx: (
            tx.write_bytes("top", b"T"),
            tx.delete("a/sib"),
            tx.delete("a/b/keep"),
            tx.write_bytes("a/b/new", b"n"),
        ),
        id="mixed-first-steps-succeed",
    ),
]


def swap_for_symlink(
    root: Path, which: str, target: Path, away: Path, *, relative: bool
) -> None:
    """Move directory ``root/which`` to ``away`` and put a symlink to ``target`` there."""
    os.rename(root / which, away)
    link = root / which
    text = os.path.relpath(target, link.parent) if relative else str(target)
    os.symlink(text, link)


@pytest.mark.parametrize("relative", [False, True], ids=["abs-link", "rel-link"])
@pytest.mark.parametrize(
    "away_inside", [True, False], ids=["moved-inside", "moved-outside"]
)
@pytest.mark.parametrize("which", ["a", "a/b"])
@pytest.mark.parametrize("plan", UNDER_AB)
def test_parent_swapped_for_symlink_before_commit_fails_and_rolls_back(
    root: Path,
    outside: Path,
    tmp_path: Path,
    plan: Callable[[fstx.Transaction], None],
    which: str,
    away_inside: bool,
    relative: bool,
) -> None:
    build_nested(root)
    outside_before = snapshot(outside)
    away = root / "moved-away" if away_inside else tmp_path / "moved-away"
    tx = fstx.transaction(root, durability="full")
    plan(tx)
    target = outside if which == "a" else outside / "b"
    swap_for_symlink(root, which, target, away, relative=relative)
    before = snapshot(root)
    away_before = snapshot(away)
    with pytest.raises(fstx.CommitError) as info:
        tx.commit()
    assert isinstance(info.value.__cause__, OSError)
    assert "rolled back" in str(info.value)
    assert tx.spent
    assert snapshot(root) == before
    assert snapshot(outside) == outside_before
    assert snapshot(away) == away_before
    assert_clean(root)
    assert fstx.status(root).clean
    assert fstx.recover(root) == fstx.RecoveryReport()
    assert snapshot(root) == before


def test_swapped_parent_restored_lets_the_same_plan_commit(
    root: Path, outside: Path
) -> None:
    build_nested(root)
    outside_before = snapshot(outside)
    away = root / "moved-away"
    tx = fstx.transaction(root, durability="none")
    tx.write_bytes("a/b/new", b"n")
    swap_for_symlink(root, "a", outside, away, relative=False)
    with pytest.raises(fstx.CommitError):
        tx.commit()
    os.unlink(root / "a")
    os.rename(away, root / "a")
    with fstx.transaction(root, durability="none") as tx2:
        tx2.write_bytes("a/b/new", b"n")
    assert (root / "a" / "b" / "new").read_bytes() == b"n"
    assert snapshot(outside) == outside_before
    assert_clean(root)


# --- a swap during the commit ----------------------------------------------------

MID_COMMIT_CALLS = ("rename", "rename_noreplace", "exchange", "link", "chmod")


@pytest.mark.parametrize(
    ("exchange", "k"),
    # Four calls when the replaced file is swapped out, five with a backup link.
    [pytest.param(True, k, id=f"exchange-{k}") for k in range(1, 5)]
    + [pytest.param(False, k, id=f"link-backup-{k}") for k in range(1, 6)],
)
def test_parent_swapped_during_commit_never_leads_out(
    root: Path, outside: Path, exchange: bool, k: int
) -> None:
    """A directory moved (inside the root) mid-commit: the open handles follow it.

    Whatever the moment, the sentinel is untouched and the outcome is whole:
    either every change is in the moved directory, or none is.
    """
    _commit._EXCHANGE = exchange and _commit.EXCHANGE_DEFAULT
    build_nested(root)
    outside_before = snapshot(outside)
    tx = fstx.transaction(root, durability="none")
    tx.write_bytes("a/b/new", b"new")
    tx.write_bytes("a/b/old", b"replaced")
    tx.chmod("a/b/keep", 0o600)
    tx.delete("a/b/t")
    count = 0

    def hook(name: str, phase: str, args: Tuple[Any, ...]) -> None:
        nonlocal count
        if phase == "after" and name in MID_COMMIT_CALLS:
            count += 1
            if count == k:
                swap_for_symlink(root, "a", outside, root / "moved", relative=True)

    with installed(hook):
        try:
            tx.commit()
        except fstx.CommitError:
            committed = False
        else:
            committed = True
    assert count >= k  # the swap happened
    moved = snapshot(root / "moved")
    if committed:
        assert (moved["b/new"][2], moved["b/old"][2]) == (b"new", b"replaced")
        assert moved["b/keep"][1] == 0o600
        assert "b/t" not in moved
    else:
        assert (moved["b/old"][2], moved["b/keep"][1]) == (b"a/b/old", 0o644 & ~UMASK)
        assert "b/new" not in moved
        assert "b/t/f" in moved
    assert os.readlink(root / "a") == f"../{OUTSIDE}"
    assert snapshot(outside) == outside_before
    assert_clean(root)


# --- a racing flipper: renameat2(RENAME_EXCHANGE) in a tight loop ------------------

FLIPPER = textwrap.dedent(
    """
    import os, sys
    from fstx._platform import _posix
    from fstx._platform._types import Dir

    root, stop = sys.argv[1], sys.argv[2]
    d = Dir(os.open(root, os.O_RDONLY | os.O_DIRECTORY), root)
    for _ in range(1000):
        _posix.exchange(d, "a", d, "s")
    flips = 0  # counted from here: while the transactions run
    print("ready", flush=True)
    while True:
        for _ in range(200):
            _posix.exchange(d, "a", d, "s")
        flips += 200
        if os.path.exists(stop):
            break
    # Leave the real directory at "a".
    if os.path.islink(os.path.join(root, "a")):
        _posix.exchange(d, "a", d, "s")
        flips += 1
    print(flips, flush=True)
    """
)


def exchange_supported(path: Path) -> bool:
    (path / "p").mkdir()
    (path / "q").mkdir()
    try:
        from fstx._platform import _posix
        from fstx._platform._types import Dir

        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _posix.exchange(Dir(fd, str(path)), "p", Dir(fd, str(path)), "q")
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            return False
        raise
    finally:
        os.rmdir(path / "p")
        os.rmdir(path / "q")
    return True


TRANSACTIONS = 200


def test_racing_exchange_of_parent_and_symlink_never_escapes(
    root: Path, outside: Path, tmp_path: Path
) -> None:
    if not sys.platform.startswith("linux") or not exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    make_tree(root, {"a/counter": b"-1", "a/keep": b"keep"})
    os.symlink(str(outside), root / "s")
    outside_before = snapshot(outside)
    stop = tmp_path / "stop"
    flipper = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(root), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    outcomes: Dict[str, int] = {}
    committed: List[int] = []
    try:
        assert flipper.stdout is not None
        assert flipper.stdout.readline() == "ready\n"
        for i in range(TRANSACTIONS):
            outcome = one_racing_transaction(root, i)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome == "committed":
                committed.append(i)
    finally:
        stop.touch()
        out, _ = flipper.communicate(timeout=60)
    assert flipper.returncode == 0
    flips = int(out.strip())
    assert flips > TRANSACTIONS, outcomes
    # Both sides of the race were exercised: some plans or commits met the
    # symlink (refused or rolled back), and some commits landed.
    assert outcomes.get("committed", 0) < TRANSACTIONS, outcomes
    # The flipper left the real directory at "a" and the symlink at "s".
    assert os.readlink(root / "s") == str(outside)
    assert sorted(os.listdir(root)) == [".fstx", "a", "s"]
    expected = {"keep", "counter"} | {f"new{i}" for i in committed}
    assert set(os.listdir(root / "a")) == expected, outcomes
    last = str(committed[-1]).encode() if committed else b"-1"
    assert (root / "a" / "counter").read_bytes() == last
    for i in committed:
        assert (root / "a" / f"new{i}").read_bytes() == f"payload {i}".encode()
    assert snapshot(outside) == outside_before, outcomes
    assert_clean(root)
    assert fstx.status(root).clean
    assert committed, outcomes


def one_racing_transaction(root: Path, i: int) -> str:
    """Plan and commit one small transaction under the flipping ``a``."""
    tx = fstx.transaction(root, durability="none", lock_timeout=30)
    try:
        tx.write_bytes(f"a/new{i}", f"payload {i}".encode())
        tx.write_bytes("a/counter", str(i).encode())
    except fstx.PlanError:
        tx.rollback()
        return "refused"
    except OSError:
        # The path changed type between lstat and readlink while planning:
        # raised as it is, nothing under the root changed.
        tx.rollback()
        return "plan-oserror"
    try:
        tx.commit()
    except fstx.CommitError:
        return "rolled-back"
    return "committed"


# --- recovery after a crash, with a parent swapped for a symlink -------------------

CRASHER = textwrap.dedent(
    """
    import os, sys
    import fstx
    from fstx import _os

    root, plan, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tx = fstx.transaction(root, durability="none")
    if plan == "replace-link":
        from fstx import _commit
        _commit._EXCHANGE = False  # the hard-link backup, as without an exchange
    if plan == "new":
        tx.write_bytes("a/b/new", b"new")
    else:
        tx.write_bytes("a/b/old", b"replaced")
    seen = 0

    def hook(name, phase, args):
        global seen
        if phase == "after" and name in ("rename", "rename_noreplace", "exchange"):
            seen += 1
            if seen == after:
                os._exit(137)  # a crash right after the step went in place

    _os.set_hook(hook)
    tx.commit()
    """
)


def crash_after_first_step(root: Path, plan: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", CRASHER, str(root), plan, "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 137, run.stderr
    assert fstx.status(root).pending


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param("replace", id="replaced-file"),
        pytest.param("replace-link", id="replaced-file-link-backup"),
        pytest.param("new", id="new-file"),
    ],
)
def test_recovery_through_a_swapped_parent_never_leads_out_and_ends_pre_state(
    root: Path, outside: Path, tmp_path: Path, plan: str
) -> None:
    build_nested(root)
    pre = snapshot(root)
    outside_before = snapshot(outside)
    crash_after_first_step(root, plan)
    away = tmp_path / "away"
    swap_for_symlink(root, "a", outside, away, relative=False)
    # Undo cannot reach through the symlink: it stops, and the journal stays.
    with pytest.raises(fstx.RollbackError):
        fstx.recover(root)
    assert fstx.status(root).pending
    assert snapshot(outside) == outside_before
    os.unlink(root / "a")
    os.rename(away, root / "a")
    fstx.recover(root)
    assert snapshot(root) == pre
    assert snapshot(outside) == outside_before
    assert_clean(root)
    assert fstx.status(root).clean


# --- strace: no write outside the root during a commit workload -------------------

WORKLOAD = textwrap.dedent(
    """
    import os, sys
    import fstx

    root, outside, away = sys.argv[1], sys.argv[2], sys.argv[3]
    # Dependencies probe the platform once, lazily, in a temporary directory
    # (filelock 4.1 tries hard links under /tmp): let that happen before the
    # marker, so that the trace after it holds fstx's calls alone.
    import tempfile
    with tempfile.TemporaryDirectory() as warm:
        fstx.transaction(warm).rollback()
    os.path.exists("/fstx-strace-marker-start")  # a marker in the trace
    with fstx.transaction(root) as tx:
        tx.copy(os.path.join(outside, "d"), "copied")
        tx.delete("out")
        tx.delete("pkg")
        tx.write_bytes("outfile", b"mine")
        tx.write_bytes("lib64/new", b"n")
        tx.rename("absout", "moved-link")
        tx.chmod("abslib/x", 0o600)
    tx = fstx.transaction(root)
    tx.write_bytes("a/b/new", b"n")
    tx.delete("a/b/old")
    tx.chmod("a/b/keep", 0o600)
    os.rename(os.path.join(root, "a"), away)
    os.symlink(outside, os.path.join(root, "a"))
    try:
        tx.commit()
    except fstx.CommitError:
        print("refused")
    else:
        print("committed through a swapped parent")
    fstx.recover(root)
    os.path.exists("/fstx-strace-marker-end")
    """
)

# Calls that change the namespace or a file, with the positions of their
# (dirfd, path) pairs in the argument list.
_MUTATING_AT = {
    "openat": [(0, 1)],
    "mkdirat": [(0, 1)],
    "unlinkat": [(0, 1)],
    "renameat": [(0, 1), (2, 3)],
    "renameat2": [(0, 1), (2, 3)],
    "linkat": [(0, 1), (2, 3)],
    "symlinkat": [(1, 2)],
    "fchmodat": [(0, 1)],
    "fchmodat2": [(0, 1)],
    "utimensat": [(0, 1)],
    "fchownat": [(0, 1)],
    "mknodat": [(0, 1)],
}
_MUTATING_PLAIN = {
    "open": [0],
    "creat": [0],
    "mkdir": [0],
    "rmdir": [0],
    "unlink": [0],
    "rename": [0, 1],
    "link": [0, 1],
    "symlink": [1],
    "chmod": [0],
    "lchown": [0],
    "chown": [0],
    "truncate": [0],
    "utime": [0],
    "utimes": [0],
}
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")


def _dirfd(arg: str, cwd: str) -> Optional[str]:
    if arg.startswith("AT_FDCWD"):
        return cwd
    m = re.match(r"-?\d+<(.*)>$", arg)
    return m.group(1) if m else None


def writes_in_trace(log: str, cwd: str) -> List[Tuple[str, str]]:
    """``(call, absolute path)`` of every namespace change or write-open after the marker."""
    found: List[Tuple[str, str]] = []
    started = False
    for line in log.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        call, argtext = m.group(1), m.group(2)
        if call.startswith("exec"):
            continue  # the script's own text names the markers too
        if "fstx-strace-marker-start" in argtext:
            started = True
            continue
        if "fstx-strace-marker-end" in argtext:
            break
        if not started:
            continue
        args = split_args(argtext)
        paths: List[str] = []
        if call in _MUTATING_AT:
            if call == "openat" and not any(f in argtext for f in _WRITE_FLAGS):
                continue
            for fd_at, name_at in _MUTATING_AT[call]:
                base = _dirfd(args[fd_at], cwd) if fd_at < len(args) else None
                name = string_arg(args[name_at]) if name_at < len(args) else None
                if base is None:
                    continue
                paths.append(base if name in (None, "") else os.path.join(base, name))
        elif call in _MUTATING_PLAIN:
            if call == "open" and not any(f in argtext for f in _WRITE_FLAGS):
                continue
            for at in _MUTATING_PLAIN[call]:
                name = string_arg(args[at]) if at < len(args) else None
                if name is not None:
                    paths.append(os.path.join(cwd, name))
        else:
            continue
        found.extend((call, os.path.normpath(p)) for p in paths)
    return found


def test_strace_sees_no_change_outside_the_root(
    root: Path, outside: Path, tmp_path: Path
) -> None:
    strace = shutil.which("strace")
    if strace is None or not sys.platform.startswith("linux"):
        pytest.skip("strace is not installed")
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(
            f"strace cannot trace here: {probe.stderr.decode(errors='replace')}"
        )
    build_static(root, outside)
    build_nested(root)
    outside_before = snapshot(outside)
    log = tmp_path / "strace.log"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    away = tmp_path / "away"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run(
        [strace, "-f", "-y", "-qq", "-s", "4096", "-e", "trace=%file,fchmod,fchown,ftruncate",
         "-o", str(log), sys.executable, "-B", "-c", WORKLOAD,
         str(root), str(outside), str(away)],
        cwd=cwd, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    writes = writes_in_trace(log.read_text(errors="replace"), str(cwd))
    real_root = os.path.realpath(root)
    assert len(writes) > 20, writes  # the parser saw the workload
    assert any(p == os.path.join(real_root, "copied") for _, p in writes), writes
    stray = [
        (call, p)
        for call, p in writes
        if p != real_root and not p.startswith(real_root + os.sep) and p != os.devnull
    ]
    # The test itself moved "a" away (one rename) and created the symlink;
    # nothing else may change outside the root.
    allowed = {("rename", str(away)), ("renameat", str(away)), ("renameat2", str(away))}
    assert [w for w in stray if w not in allowed] == []
    assert run.stdout == "refused\n"
    assert snapshot(outside) == outside_before
    assert_clean(root)


# --- the trace parser itself ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            '12 openat(3</r/a>, "f", O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0666) = 4</r/a/f>',
            [("openat", "/r/a/f")], id="openat-write",
        ),
        pytest.param(
            '12 openat(3</r/a>, "f", O_RDONLY|O_NOFOLLOW|O_CLOEXEC) = 4</r/a/f>',
            [], id="openat-read",
        ),
        pytest.param(
            '12 renameat2(3</r/.fstx/tx-1>, "s1", 4</o>, "x", RENAME_NOREPLACE) = 0',
            [("renameat2", "/r/.fstx/tx-1/s1"), ("renameat2", "/o/x")], id="renameat2",
        ),
        pytest.param(
            '12 unlinkat(AT_FDCWD, "../o/x", 0) = 0',
            [("unlinkat", "/cwd/o/x")], id="unlinkat-cwd",
        ),
        pytest.param(
            '12 rename("/r/a", "/o/a") = 0',
            [("rename", "/r/a"), ("rename", "/o/a")], id="plain-rename",
        ),
        pytest.param(
            '12 symlinkat("/anywhere", 5</r>, "l") = 0',
            [("symlinkat", "/r/l")], id="symlinkat-names-the-link",
        ),
    ],
)  # fmt: skip
def test_trace_parser(line: str, expected: List[Tuple[str, str]]) -> None:
    log = f'1 newfstatat(AT_FDCWD, "/fstx-strace-marker-start", 0x1, 0) = -1 ENOENT\n{line}\n'
    assert writes_in_trace(log, "/cwd/sub") == expected
