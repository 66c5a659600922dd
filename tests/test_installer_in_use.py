"""Wheel upgrades with files in use (issue 4), on winfs with real holder processes.

The uv case (SPEC §2, §7): a package's console-script launcher ``demo.exe``
is running while the package is upgraded. Under Windows rules the running
image can be renamed away but not deleted or replaced, so the upgrade
commits in one transaction with the old launcher deferred to the trash,
which the next :func:`fstx.recover` empties once the program has exited. A
held ordinary file (an open module) cannot even be renamed: the upgrade then
fails as a whole and the tree is exactly the old version again.

The prefix has the POSIX ``--prefix`` layout (``bin``, ``lib/pythonX.Y/
site-packages``) with Windows launchers (``script_kind="win-amd64"``), so the
console script is ``bin/demo.exe``: a name winfs treats as a program image.
"""

from __future__ import annotations

import base64
import csv
import errno
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, Set

import pytest

pytest.importorskip("installer")

import installer
from installer.sources import WheelFile

import fstx
import wheels
from fstx.integrations.installer import (
    TransactionalDestination,
    _prefix_scheme,
    uninstall,
)
from treeutil import assert_clean, snapshot
from winfs import WinFS, hold

pytest_plugins = ["conftest_winfs"]


pytestmark = [
    pytest.mark.fuse,
    pytest.mark.usefixtures("windows_protocol"),
    pytest.mark.skipif(sys.platform == "win32", reason="winfs is a FUSE filesystem"),
]

POLICY = fstx.RetryPolicy(deadline=1.0, defer_after=0.3)
"""Short budgets: a file in use is given up on in about a second."""

INTERPRETER = r"C:\Python311\python.exe"
"""The Python the Windows launchers name (never run here)."""

V1_DIST_INFO = "demo-1.0.dist-info"
V2_DIST_INFO = "demo-2.0.dist-info"


# -- helpers -----------------------------------------------------------------------


def scheme_of(prefix: Path) -> Dict[str, str]:
    return _prefix_scheme(str(prefix))


def site_of(prefix: Path) -> Path:
    return Path(scheme_of(prefix)["purelib"])


def launcher(prefix: Path) -> Path:
    return Path(scheme_of(prefix)["scripts"]) / "demo.exe"


def plan_install(tx: fstx.Transaction, prefix: Path, wheel: Path) -> None:
    """Plan the install of ``wheel`` into ``prefix`` with Windows launchers."""
    dest = TransactionalDestination(tx, scheme_of(prefix), INTERPRETER, "win-amd64")
    with WheelFile.open(wheel) as source:
        installer.install(source, dest, {"INSTALLER": b"fstx-test"})


def comparable(root: Path) -> Dict[str, Any]:
    """The snapshot of ``root`` less what embeds the time of the install.

    A Windows launcher is a stub with a zip appended, and zip entries carry
    their time (two seconds' resolution): two installs a second apart write
    different launchers, and RECORD lists their hashes. Those two files are
    checked against each other by ``check_record`` instead.
    """
    snap = snapshot(root, inodes=False)
    for rel in list(snap):
        if rel == "bin/demo.exe" or rel.endswith(".dist-info/RECORD"):
            kind, mode = snap[rel][:2]
            snap[rel] = (kind, mode)
    return snap


def fresh_install(prefix: Path, wheel: Path) -> None:
    prefix.mkdir()
    with fstx.transaction(prefix, durability="none") as tx:
        plan_install(tx, prefix, wheel)


def plan_upgrade(prefix: Path, wheel: Path) -> fstx.Transaction:
    """Plan (not commit) the uninstall of v1 and the install of ``wheel``, as one."""
    tx = fstx.transaction(prefix, durability="none", retry=POLICY)
    try:
        uninstall(tx, site_of(prefix) / V1_DIST_INFO)
        plan_install(tx, prefix, wheel)
    except BaseException:
        tx.rollback()
        raise
    return tx


def digest(data: bytes, algorithm: str) -> str:
    raw = hashlib.new(algorithm, data).digest()
    return f"{algorithm}=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def check_record(prefix: Path, dist_info: Path) -> Set[str]:
    """Every file RECORD lists exists with its hash and size; returns them, prefix-relative."""
    listed: Set[str] = set()
    with open(dist_info / "RECORD", newline="", encoding="utf-8") as f:
        for path, hash_, size in csv.reader(f):
            full = Path(os.path.normpath(dist_info.parent / path))
            assert full.is_file(), f"RECORD lists {path!r}, which is missing"
            data = full.read_bytes()
            if full == dist_info / "RECORD":
                assert (hash_, size) == ("", "")
            else:
                algorithm = hash_.split("=", 1)[0]
                assert hash_ == digest(data, algorithm), f"hash of {path!r}"
                assert size == str(len(data)), f"size of {path!r}"
            listed.add(full.relative_to(prefix).as_posix())
    return listed


def files_under(prefix: Path) -> Set[str]:
    """Every file under ``prefix``, staging excluded, prefix-relative."""
    return {
        path
        for path, entry in snapshot(prefix, inodes=False).items()
        if entry[0] == "file"
    }


def trash_files(prefix: Path) -> Set[Path]:
    """Every file inside the trash's entries (notes excluded)."""
    trash = prefix / ".fstx" / "trash"
    if not trash.is_dir():
        return set()
    return {p for p in trash.rglob("*") if p.is_file() and p.suffix != ".origin"}


def comm(pid: int) -> str:
    """The process name the kernel gives ``pid`` (what InUseError reports)."""
    return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return wheels.demo_wheel(tmp_path / "wheels", "1.0")


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    return wheels.demo_wheel(tmp_path / "wheels", "2.0")


@pytest.fixture
def prefix(winfs: WinFS, v1: Path) -> Path:
    """v1 freshly installed into a prefix on the winfs mount."""
    path = winfs.mountpoint / "prefix"
    fresh_install(path, v1)
    assert launcher(path).read_bytes()[:2] == b"MZ"
    assert_clean(path)
    return path


# -- the uv case: the old launcher is running ----------------------------------------


def test_upgrade_with_running_launcher_defers_it_then_recover_purges(
    winfs: WinFS, prefix: Path, v2: Path
) -> None:
    exe = launcher(prefix)
    assert exe.relative_to(prefix).as_posix() == "bin/demo.exe"
    old_ino, old_bytes = exe.stat().st_ino, exe.read_bytes()
    # The reference: v2 installed fresh, on the same mount, the same way.
    reference = winfs.mountpoint / "reference"
    fresh_install(reference, v2)
    expected = comparable(reference)

    with hold(exe) as running:
        tx = plan_upgrade(prefix, v2)
        report = tx.commit()

        assert report.deferred == (str(exe),)
        # Exactly a fresh v2 install: every file RECORD lists, with its hash,
        # and nothing else (no v1 leftovers, no emptied directories).
        dist_info = site_of(prefix) / V2_DIST_INFO
        assert check_record(prefix, dist_info) == files_under(prefix)
        assert comparable(prefix) == expected
        assert not (site_of(prefix) / V1_DIST_INFO).exists()
        assert not (site_of(prefix) / "demo" / "legacy").exists()
        # A new file (both versions' launchers have the same bytes: the entry
        # point did not change).
        assert exe.stat().st_ino != old_ino

        status = fstx.status(prefix)
        assert status.deferred == (str(exe),)
        assert not status.pending
        # The running image was moved, never touched: the same file, in the trash.
        in_trash = trash_files(prefix)
        assert in_trash
        assert {p.stat().st_ino for p in in_trash} == {old_ino}
        assert {p.read_bytes() for p in in_trash} == {old_bytes}
        assert running.alive

    recovered = fstx.recover(prefix)
    assert recovered.purged >= 1
    assert recovered.deferred == ()
    assert not recovered.rolled_back
    assert fstx.status(prefix).clean
    assert fstx.status(prefix).deferred == ()
    assert_clean(prefix)
    assert comparable(prefix) == expected


# -- a held module cannot be moved: the upgrade fails whole ----------------------------


def test_upgrade_with_held_module_fails_and_leaves_v1(prefix: Path, v2: Path) -> None:
    held = site_of(prefix) / "demo" / "__init__.py"
    before = snapshot(prefix)  # inodes and mtimes too: the very same files
    with hold(held) as holder:
        tx = plan_upgrade(prefix, v2)
        with pytest.raises(fstx.CommitError) as info:
            tx.commit()
        cause = info.value.__cause__
        assert isinstance(cause, fstx.InUseError)
        assert isinstance(cause, OSError)
        assert cause.errno == errno.EBUSY
        assert cause.filename == str(held)
        assert (holder.pid, comm(holder.pid)) in cause.holders
        assert f"pid {holder.pid}" in str(cause)
        assert "rolled back" in str(info.value)
        assert snapshot(prefix) == before
        assert fstx.status(prefix).deferred == ()
    fstx.recover(prefix)
    assert snapshot(prefix) == before
    assert check_record(prefix, site_of(prefix) / V1_DIST_INFO) == files_under(prefix)
    assert fstx.status(prefix).clean
    assert_clean(prefix)
