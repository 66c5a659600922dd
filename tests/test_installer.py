"""Tests of fstx.integrations.installer: installs, upgrades, uninstalls, faults, crashes."""

from __future__ import annotations

import base64
import contextlib
import csv
import errno
import functools
import hashlib
import importlib.util
import itertools
import marshal
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("installer")

import installer
from installer.sources import WheelFile

import fstx
import wheels
from fstx import _os
from fstx.integrations.installer import (
    TransactionalDestination,
    _is_bytecode_of,
    _PlannedView,
    _prefix_scheme,
    install_wheels,
    uninstall,
)
from treeutil import FailAt, assert_clean, installed, snapshot

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX layout, shebang scripts and fork"
)

PY = f"python{sys.version_info[0]}.{sys.version_info[1]}"
SITE = f"lib/{PY}/site-packages"


# -- helpers -----------------------------------------------------------------------


def scheme_of(prefix: Path) -> Dict[str, str]:
    return _prefix_scheme(str(prefix))


def site_of(prefix: Path) -> Path:
    return Path(scheme_of(prefix)["purelib"])


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def digest(data: bytes, algorithm: str = "sha256") -> str:
    raw = hashlib.new(algorithm, data).digest()
    return f"{algorithm}=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def check_record(prefix: Path, dist_info: Path) -> Set[str]:
    """Every file RECORD lists exists with its hash and size; returns them, prefix-relative."""
    site = dist_info.parent
    listed: Set[str] = set()
    with open(dist_info / "RECORD", newline="", encoding="utf-8") as f:
        for path, hash_, size in csv.reader(f):
            full = Path(os.path.normpath(site / path))
            rel = full.relative_to(prefix).as_posix()
            assert full.is_file(), f"RECORD lists {path!r}, which is missing"
            data = full.read_bytes()
            if full.name == "RECORD" and full.parent == dist_info:
                assert (hash_, size) == ("", "")
            else:
                algorithm = hash_.split("=", 1)[0]
                assert hash_ == digest(data, algorithm), f"hash of {path!r}"
                assert size == str(len(data)), f"size of {path!r}"
            listed.add(rel)
    return listed


def files_under(prefix: Path) -> Set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(prefix):
        if Path(dirpath) == prefix:
            dirnames[:] = [d for d in dirnames if d != ".fstx"]
        for name in filenames:
            out.add((Path(dirpath) / name).relative_to(prefix).as_posix())
    return out


def empty_dirs(prefix: Path) -> Set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(prefix):
        if Path(dirpath) == prefix:
            dirnames[:] = [d for d in dirnames if d != ".fstx"]
            continue
        if not dirnames and not filenames:
            out.add(Path(dirpath).relative_to(prefix).as_posix())
    return out


def dist_infos(prefix: Path) -> List[str]:
    site = site_of(prefix)
    return sorted(p.name for p in site.glob("*.dist-info")) if site.is_dir() else []


def run_script(prefix: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(site_of(prefix)))
    env.pop("PYTHONHOME", None)
    return subprocess.run(
        [str(prefix / "bin" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def install_with_destination(
    prefix: Path,
    wheel: Path,
    *,
    durability: str = "none",
    **kwargs: object,
) -> fstx.CommitReport:
    with fstx.transaction(prefix, durability=durability) as tx:
        dest = TransactionalDestination(
            tx,
            scheme_of(prefix),
            sys.executable,
            "posix",
            **kwargs,  # type: ignore[arg-type]
        )
        with WheelFile.open(wheel) as source:
            installer.install(source, dest, {"INSTALLER": b"fstx-test"})
        return tx.commit()


def upgrade_in_one_transaction(prefix: Path, old: str, wheel: Path) -> fstx.Transaction:
    """Plan (not commit) the uninstall of ``old`` and the install of ``wheel``."""
    tx = fstx.transaction(prefix, durability="none")
    try:
        uninstall(tx, site_of(prefix) / old)
        dest = TransactionalDestination(tx, scheme_of(prefix), sys.executable, "posix")
        with WheelFile.open(wheel) as source:
            installer.install(source, dest, {"INSTALLER": b"fstx-test"})
    except BaseException:
        tx.rollback()
        raise
    return tx


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="module")
def v1(wheel_dir: Path) -> Path:
    return wheels.demo_wheel(wheel_dir, "1.0")


@pytest.fixture(scope="module")
def v2(wheel_dir: Path) -> Path:
    return wheels.demo_wheel(wheel_dir, "2.0")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory for sweeps that create and delete many small trees.

    On this project's disks a create right after many deletes costs up to a
    millisecond (see the research notes); tmpfs, where there is one, keeps a
    sweep of a hundred trees to a second or two.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="fstx-installer-", dir=shm))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    path = tmp_path / "prefix"
    path.mkdir()
    return path


# -- the planned view ----------------------------------------------------------------

NAMES = ("a", "b")
PATHS = [
    "/".join(parts)
    for depth in (1, 2, 3)
    for parts in itertools.product(NAMES, repeat=depth)
]
Op = Tuple[str, str, str]
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["write", "delete", "mkdir", "rename", "copy"]),
        st.sampled_from(PATHS),
        st.sampled_from(PATHS),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(initial=st.sets(st.sampled_from(PATHS)), ops=ops_strategy)
def test_planned_view_agrees_with_the_committed_tree(
    initial: Set[str], ops: List[Op]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for path in sorted(initial):  # a file unless something is planted below it
            if any(other.startswith(path + "/") for other in initial):
                (root / path).mkdir(parents=True, exist_ok=True)
            elif not (root / path).parent.is_file():
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(b"x")
        with fstx.transaction(root, durability="none") as tx:
            for kind, path, other in ops:
                with contextlib.suppress(fstx.PlanError):
                    if kind == "write":
                        tx.write_bytes(path, b"y")
                    elif kind == "delete":
                        tx.delete(path, missing_ok=True)
                    elif kind == "mkdir":
                        tx.mkdir(path)
                    elif kind == "rename":
                        tx.rename(path, other)
                    else:
                        tx.copy(path, other)
            view = _PlannedView(tx)
            view.sync()
            exists = {path: view.exists(path) for path in PATHS}
            children = {path: view.children(path) for path in PATHS if exists[path]}
        for path in PATHS:
            assert exists[path] == os.path.lexists(root / path), path
            listed = children.get(path)
            if listed is not None and (root / path).is_dir():
                assert listed == sorted(os.listdir(root / path)), path


@pytest.mark.parametrize(
    ("stem", "name", "expected"),
    [
        pytest.param("mod.", "mod.cpython-311.pyc", True, id="tag"),
        pytest.param("mod.", "mod.cpython-311.opt-2.pyc", True, id="opt"),
        pytest.param("mod.", "mod.pypy39.pyc", True, id="pypy"),
        pytest.param("a.", "a.b.cpython-311.pyc", False, id="other-module"),
        pytest.param("mod.", "mod.pyc", False, id="no-tag"),
        pytest.param("mod.", "mod.cpython-311.opt-x.pyc", False, id="bad-opt"),
        pytest.param("mod.", "module.cpython-311.pyc", False, id="longer-name"),
    ],
)
def test_bytecode_names(stem: str, name: str, expected: bool) -> None:
    assert _is_bytecode_of(stem, name) is expected


# -- the wheel builder -------------------------------------------------------------


def test_built_wheels_are_deterministic_and_valid(tmp_path: Path) -> None:
    first = wheels.demo_wheel(tmp_path / "a", "1.0")
    second = wheels.demo_wheel(tmp_path / "b", "1.0")
    assert first.read_bytes() == second.read_bytes()
    with WheelFile.open(first) as source:
        source.validate_record()
        assert source.dist_info_dir == "demo-1.0.dist-info"
        assert source.data_dir == "demo-1.0.data"
    with zipfile.ZipFile(first) as zf:
        assert zf.namelist()[-1] == "demo-1.0.dist-info/RECORD"


# -- install through the destination -----------------------------------------------


def test_install_into_empty_prefix(prefix: Path, v1: Path) -> None:
    report = install_with_destination(prefix, v1)
    assert report.deferred == ()
    assert_clean(prefix)
    site = site_of(prefix)
    dist_info = site / "demo-1.0.dist-info"
    listed = check_record(prefix, dist_info)
    assert listed == files_under(prefix), "RECORD lists exactly the installed files"
    assert listed == {
        f"{SITE}/demo/__init__.py",
        f"{SITE}/demo/cli.py",
        f"{SITE}/demo/sub/__init__.py",
        f"{SITE}/demo/sub/helpers.py",
        f"{SITE}/demo/legacy/__init__.py",
        f"{SITE}/demo/legacy/old.py",
        f"{SITE}/demo-1.0.dist-info/METADATA",
        f"{SITE}/demo-1.0.dist-info/WHEEL",
        f"{SITE}/demo-1.0.dist-info/entry_points.txt",
        f"{SITE}/demo-1.0.dist-info/INSTALLER",
        f"{SITE}/demo-1.0.dist-info/RECORD",
        "bin/demo",
        "bin/demo-hello",
        "share/demo/readme.txt",
        f"include/{PY}{sys.abiflags}/demo.h",
    }
    assert (dist_info / "INSTALLER").read_bytes() == b"fstx-test"
    # Scripts outside site-packages are listed relative to it.
    record = (dist_info / "RECORD").read_text()
    assert "../../../bin/demo," in record

    default = 0o666 & ~umask()
    assert (prefix / "bin" / "demo").stat().st_mode & 0o777 == 0o755
    assert (prefix / "bin" / "demo-hello").stat().st_mode & 0o777 == 0o755
    assert (site / "demo" / "cli.py").stat().st_mode & 0o777 == default
    assert (dist_info / "RECORD").stat().st_mode & 0o777 == default

    hello = (prefix / "bin" / "demo-hello").read_bytes()
    assert hello.startswith(f"#!{sys.executable}\n".encode())
    assert run_script(prefix, "demo").stdout == "demo 1.0\n"
    assert run_script(prefix, "demo-hello").stdout == "hello from demo 1.0\n"


def test_record_is_planned_last(prefix: Path, v1: Path) -> None:
    with fstx.transaction(prefix, durability="none") as tx:
        dest = TransactionalDestination(tx, scheme_of(prefix), sys.executable, "posix")
        with WheelFile.open(v1) as source:
            installer.install(source, dest, {"INSTALLER": b"x"})
        last = tx.operations[-1]
        tx.rollback()
    assert last.kind == "write"
    assert last.path == f"{SITE}/demo-1.0.dist-info/RECORD"
    assert files_under(prefix) == set()
    assert_clean(prefix)


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(0, id="empty"),
        pytest.param((1 << 20) - 1, id="one-chunk"),
        pytest.param(1 << 20, id="exactly-a-chunk"),
        pytest.param((5 << 19) + 3, id="streamed"),
    ],
)
def test_members_of_every_size_are_written_whole(
    prefix: Path, tmp_path: Path, size: int
) -> None:
    # A member is read in chunks of 1 MiB: one chunk goes in as one write,
    # more are streamed through tx.open.
    data = bytes(range(251)) * (size // 251) + bytes(size % 251)
    wheel = wheels.build_wheel(
        tmp_path / "w", "sized", "1.0", {"sized/blob.bin": data, "sized/x.py": b""}
    )
    install_with_destination(prefix, wheel, bytecode_optimization_levels=(0,))
    site = site_of(prefix)
    assert (site / "sized/blob.bin").read_bytes() == data
    assert check_record(prefix, site / "sized-1.0.dist-info") == files_under(prefix)


def test_windows_launcher_kind(prefix: Path, v1: Path) -> None:
    with fstx.transaction(prefix, durability="none") as tx:
        dest = TransactionalDestination(
            tx, scheme_of(prefix), r"C:\Python\python.exe", "win-amd64"
        )
        with WheelFile.open(v1) as source:
            installer.install(source, dest, {})
    exe = prefix / "bin" / "demo.exe"
    assert exe.read_bytes()[:2] == b"MZ"
    assert exe.stat().st_mode & 0o777 == 0o755
    check_record(prefix, site_of(prefix) / "demo-1.0.dist-info")


def test_bytecode_is_compiled_in_memory(prefix: Path, v1: Path) -> None:
    install_with_destination(prefix, v1, bytecode_optimization_levels=(0, 1))
    site = site_of(prefix)
    listed = check_record(prefix, site / "demo-1.0.dist-info")
    assert listed == files_under(prefix), "the .pyc files are in RECORD"
    tag = sys.implementation.cache_tag
    for module in ("demo/cli.py", "demo/legacy/old.py", "demo/sub/__init__.py"):
        source = site / module
        for level in (0, 1):
            ours = Path(
                importlib.util.cache_from_source(str(source), optimization=level or "")
            )
            assert ours.name.split(".")[1] == tag
            reference = prefix.parent / f"ref-{level}.pyc"
            py_compile.compile(
                str(source),
                cfile=str(reference),
                dfile=str(source),
                optimize=level,
                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
                doraise=True,
            )
            data, expected = ours.read_bytes(), reference.read_bytes()
            assert data[:16] == expected[:16], "same magic, flags and source hash"
            assert marshal.loads(data[16:]) == marshal.loads(expected[16:])
            assert marshal.loads(data[16:]).co_filename == str(source)
    # Python accepts the bytecode as it is: it does not rewrite it on import.
    pyc = Path(importlib.util.cache_from_source(str(site / "demo" / "cli.py")))
    before = pyc.read_bytes()
    assert run_script(prefix, "demo").stdout == "demo 1.0\n"
    assert pyc.read_bytes() == before


def test_module_that_does_not_compile_is_installed_without_bytecode(
    prefix: Path, wheel_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wheel = wheels.build_wheel(
        wheel_dir / "broken", "broken", "1.0", {"broken/__init__.py": b"def (:\n"}
    )
    install_with_destination(prefix, wheel, bytecode_optimization_levels=(0,))
    listed = check_record(prefix, site_of(prefix) / "broken-1.0.dist-info")
    assert not any(p.endswith(".pyc") for p in listed)
    assert "not compiling" in caplog.text


def test_relative_scheme_paths_are_relative_to_the_root(prefix: Path, v1: Path) -> None:
    scheme = {
        "purelib": "site",
        "platlib": "site",
        "headers": "inc/demo",
        "scripts": "bin",
        "data": ".",
    }
    with fstx.transaction(prefix, durability="none") as tx:
        dest = TransactionalDestination(tx, scheme, sys.executable, "posix")
        with WheelFile.open(v1) as source:
            installer.install(source, dest, {})
    listed = check_record(prefix, prefix / "site" / "demo-1.0.dist-info")
    assert "bin/demo" in listed
    assert "inc/demo/demo.h" in listed
    assert (
        "../bin/demo,"
        in (prefix / "site" / "demo-1.0.dist-info" / "RECORD").read_text()
    )


def test_destdir_writes_under_the_root_as_if_it_were_slash(
    tmp_path: Path, v1: Path
) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    scheme = _prefix_scheme("/opt/demo")
    with fstx.transaction(stage, durability="none") as tx:
        dest = TransactionalDestination(
            tx, scheme, "/opt/demo/bin/python", "posix", destdir=str(stage)
        )
        with WheelFile.open(v1) as source:
            installer.install(source, dest, {})
    installed_site = stage / f"opt/demo/{SITE}"
    check_record(stage, installed_site / "demo-1.0.dist-info")
    assert (
        (stage / "opt/demo/bin/demo")
        .read_bytes()
        .startswith(b"#!/opt/demo/bin/python\n")
    )
    assert_clean(stage)


def test_scheme_outside_the_root_is_refused(prefix: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    scheme = dict(scheme_of(prefix), scripts=str(elsewhere))
    before = snapshot(prefix)
    with fstx.transaction(prefix, durability="none") as tx:
        with pytest.raises(fstx.PlanError) as info:
            TransactionalDestination(tx, scheme, sys.executable, "posix")
    assert info.value.path == str(elsewhere)
    assert str(elsewhere) in str(info.value)
    assert "outside" in str(info.value)
    assert snapshot(prefix) == before
    assert not elsewhere.exists()
    assert_clean(prefix)


def test_scheme_reaching_out_through_a_symlink_is_refused(
    prefix: Path, tmp_path: Path
) -> None:
    (tmp_path / "outside").mkdir()
    (prefix / "bin").symlink_to(tmp_path / "outside")
    with fstx.transaction(prefix, durability="none") as tx:
        with pytest.raises(fstx.PlanError, match="outside"):
            TransactionalDestination(tx, scheme_of(prefix), sys.executable, "posix")
    assert list((tmp_path / "outside").iterdir()) == []


def test_wheel_path_leaving_its_scheme_is_refused(
    prefix: Path, wheel_dir: Path
) -> None:
    wheel = wheels.build_wheel(
        wheel_dir / "evil",
        "evil",
        "1.0",
        {"evil/__init__.py": b"", "../../../escape.py": b""},
    )
    before = snapshot(prefix)
    with pytest.raises(fstx.PlanError, match="outside the 'purelib' directory"):
        install_with_destination(prefix, wheel)
    assert snapshot(prefix) == before
    assert_clean(prefix)


def test_existing_file_is_refused_unless_overwrite(prefix: Path, v1: Path) -> None:
    clash = site_of(prefix) / "demo" / "cli.py"
    clash.parent.mkdir(parents=True)
    clash.write_bytes(b"someone else's\n")
    before = snapshot(prefix)
    with pytest.raises(fstx.PlanError) as info:
        install_with_destination(prefix, v1)
    assert info.value.path == str(clash)
    assert "overwrite_existing" in str(info.value)
    assert snapshot(prefix) == before
    assert_clean(prefix)

    install_with_destination(prefix, v1, overwrite_existing=True)
    check_record(prefix, site_of(prefix) / "demo-1.0.dist-info")


def test_bad_arguments_are_refused(prefix: Path) -> None:
    with fstx.transaction(prefix, durability="none") as tx:
        with pytest.raises(fstx.PlanError, match="hash algorithm"):
            TransactionalDestination(
                tx, scheme_of(prefix), sys.executable, "posix", hash_algorithm="nope"
            )
        with pytest.raises(fstx.PlanError, match="optimization levels"):
            TransactionalDestination(
                tx,
                scheme_of(prefix),
                sys.executable,
                "posix",
                bytecode_optimization_levels=(3,),
            )


def test_other_hash_algorithm(prefix: Path, v1: Path) -> None:
    install_with_destination(prefix, v1, hash_algorithm="sha512")
    record = (site_of(prefix) / "demo-1.0.dist-info" / "RECORD").read_text()
    assert "sha512=" in record
    check_record(prefix, site_of(prefix) / "demo-1.0.dist-info")


# -- upgrade and uninstall ---------------------------------------------------------


def test_upgrade_in_one_transaction_leaves_exactly_v2(
    prefix: Path, tmp_path: Path, v1: Path, v2: Path
) -> None:
    install_with_destination(prefix, v1)
    (site_of(prefix) / "demo" / "__pycache__").mkdir()
    (
        site_of(prefix)
        / "demo"
        / "__pycache__"
        / f"cli.{sys.implementation.cache_tag}.pyc"
    ).write_bytes(b"stale")
    (site_of(prefix) / "demo" / "__pycache__" / "cli.cpython-36.opt-1.pyc").write_bytes(
        b"stale"
    )
    tx = upgrade_in_one_transaction(prefix, "demo-1.0.dist-info", v2)
    tx.commit()
    assert_clean(prefix)
    assert dist_infos(prefix) == ["demo-2.0.dist-info"]
    listed = check_record(prefix, site_of(prefix) / "demo-2.0.dist-info")
    assert listed == files_under(prefix), "no v1 leftovers"
    assert empty_dirs(prefix) == set(), "no directories emptied by v1 remain"
    assert not (site_of(prefix) / "demo" / "legacy").exists()
    assert run_script(prefix, "demo").stdout == "demo 2.0\n"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    install_with_destination(fresh, v2)
    assert snapshot(prefix, inodes=False) == snapshot(fresh, inodes=False)


def test_uninstall_removes_everything_it_installed(prefix: Path, v1: Path) -> None:
    install_with_destination(prefix, v1, bytecode_optimization_levels=(0,))
    # Bytecode Python wrote itself, at run time, for another interpreter.
    runtime = (
        site_of(prefix) / "demo" / "sub" / "__pycache__" / "helpers.cpython-39.pyc"
    )
    runtime.parent.mkdir(exist_ok=True)
    runtime.write_bytes(b"x")
    with fstx.transaction(prefix, durability="none") as tx:
        planned = uninstall(tx, site_of(prefix) / "demo-1.0.dist-info")
    assert f"{SITE}/demo-1.0.dist-info" in planned
    assert files_under(prefix) == set()
    # site-packages and its parents stay; everything else the install made goes.
    assert empty_dirs(prefix) == {SITE}
    assert sorted(
        p.relative_to(prefix).as_posix()
        for p in prefix.rglob("*")
        if ".fstx" not in p.parts
    ) == [
        "lib",
        f"lib/{PY}",
        SITE,
    ]
    assert_clean(prefix)


def test_site_packages_as_the_root(prefix: Path, v1: Path) -> None:
    # A --target style directory: the transaction's root is site-packages.
    scheme = {
        "purelib": ".",
        "platlib": ".",
        "headers": "include",
        "scripts": "bin",
        "data": "data",
    }
    with fstx.transaction(prefix, durability="none") as tx:
        dest = TransactionalDestination(tx, scheme, sys.executable, "posix")
        with WheelFile.open(v1) as source:
            installer.install(source, dest, {})
    assert check_record(prefix, prefix / "demo-1.0.dist-info") == files_under(prefix)
    with fstx.transaction(prefix, durability="none") as tx:
        uninstall(tx, "demo-1.0.dist-info")
    assert sorted(os.listdir(prefix)) == [".fstx"]
    assert_clean(prefix)


def test_uninstall_keeps_what_others_own(
    prefix: Path, wheel_dir: Path, v1: Path
) -> None:
    install_with_destination(prefix, v1)
    other = wheels.build_wheel(
        wheel_dir / "other",
        "other",
        "1.0",
        {
            "demo/sub/plugin.py": b"PLUGIN = 1\n",  # a file in a directory demo owns too
            ".data/data/share/demo/other.txt": b"other\n",
        },
    )
    install_with_destination(prefix, other)
    (prefix / "bin" / "unrelated").write_bytes(b"mine\n")
    with fstx.transaction(prefix, durability="none") as tx:
        uninstall(tx, site_of(prefix) / "demo-1.0.dist-info")
    assert dist_infos(prefix) == ["other-1.0.dist-info"]
    assert files_under(prefix) == check_record(
        prefix, site_of(prefix) / "other-1.0.dist-info"
    ) | {"bin/unrelated"}
    assert empty_dirs(prefix) == set()


def test_uninstall_sees_what_the_transaction_planned(prefix: Path, v1: Path) -> None:
    install_with_destination(prefix, v1)
    site = site_of(prefix)
    with fstx.transaction(prefix, durability="none") as tx:
        # Planned, not yet on disk: the directory it lands in must stay.
        tx.write_bytes(site / "demo" / "legacy" / "notes.txt", b"keep me\n")
        uninstall(tx, site / "demo-1.0.dist-info")
    assert files_under(prefix) == {f"{SITE}/demo/legacy/notes.txt"}


def test_uninstall_ignores_missing_files(prefix: Path, v1: Path) -> None:
    install_with_destination(prefix, v1)
    (site_of(prefix) / "demo" / "legacy" / "old.py").unlink()
    (prefix / "bin" / "demo").unlink()
    with fstx.transaction(prefix, durability="none") as tx:
        uninstall(tx, site_of(prefix) / "demo-1.0.dist-info")
    assert files_under(prefix) == set()


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("../../../../escape.txt", id="dotdot-past-root"),
        pytest.param("/etc/passwd", id="absolute-outside"),
        pytest.param("../../../.fstx/lock", id="staging"),
        pytest.param("link/escape.txt", id="through-symlink"),
    ],
)
def test_uninstall_refuses_a_record_escaping_the_root(
    prefix: Path, tmp_path: Path, v1: Path, entry: str
) -> None:
    install_with_destination(prefix, v1)
    site = site_of(prefix)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "escape.txt").write_bytes(b"precious")
    (tmp_path / "escape.txt").write_bytes(b"precious")
    (site / "link").symlink_to(tmp_path / "outside")
    record = site / "demo-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + f"{entry},,\n")
    before = snapshot(prefix)
    outside_before = snapshot(tmp_path / "outside")
    with fstx.transaction(prefix, durability="none") as tx:
        with pytest.raises(fstx.PlanError) as info:
            uninstall(tx, site / "demo-1.0.dist-info")
        assert tx.operations == ()
    assert repr(entry) in str(info.value)
    assert "not inside the root" in str(info.value)
    assert snapshot(prefix) == before
    assert snapshot(tmp_path / "outside") == outside_before
    assert (tmp_path / "escape.txt").read_bytes() == b"precious"
    assert_clean(prefix)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda site: site / "demo-1.0.dist-info", "RECORD", id="no-record"
        ),
        pytest.param(
            lambda site: site / "missing-1.0.dist-info", "no directory", id="missing"
        ),
        pytest.param(lambda site: site, "not a .dist-info", id="site-packages"),
        pytest.param(
            lambda site: Path("/usr/lib/x-1.0.dist-info"),
            "outside the root",
            id="outside",
        ),
    ],
)
def test_uninstall_refuses_what_it_cannot_read(
    prefix: Path, v1: Path, make: Callable[[Path], Path], message: str
) -> None:
    install_with_destination(prefix, v1)
    site = site_of(prefix)
    (site / "demo-1.0.dist-info" / "RECORD").unlink()
    before = snapshot(prefix)
    with fstx.transaction(prefix, durability="none") as tx:
        with pytest.raises(fstx.PlanError, match=message):
            uninstall(tx, make(site))
    assert snapshot(prefix) == before


def test_record_entries_that_are_directories_are_not_deleted_whole(
    prefix: Path, v1: Path
) -> None:
    install_with_destination(prefix, v1)
    site = site_of(prefix)
    (site / "demo" / "sub" / "data.txt").write_bytes(b"not listed\n")
    record = site / "demo-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + "demo,,\n")
    with fstx.transaction(prefix, durability="none") as tx:
        uninstall(tx, site / "demo-1.0.dist-info")
    assert files_under(prefix) == {f"{SITE}/demo/sub/data.txt"}


# -- failures roll everything back ---------------------------------------------------


def test_failure_while_reading_the_wheel_rolls_back(
    prefix: Path, v1: Path, v2: Path
) -> None:
    install_with_destination(prefix, v1)
    before = snapshot(prefix)

    class Exploding(WheelFile):
        def get_contents(self) -> Iterator[Tuple[Tuple[str, str, str], BinaryIO, bool]]:
            for index, element in enumerate(super().get_contents()):
                if index == 4:
                    raise OSError(errno.EIO, "read error halfway through the wheel")
                yield element

    with pytest.raises(OSError, match="halfway"):
        with fstx.transaction(prefix, durability="none") as tx:
            uninstall(tx, site_of(prefix) / "demo-1.0.dist-info")
            dest = TransactionalDestination(
                tx, scheme_of(prefix), sys.executable, "posix"
            )
            with zipfile.ZipFile(v2) as zf:
                installer.install(Exploding(zf), dest, {})
    assert snapshot(prefix) == before
    assert_clean(prefix)


def test_wheel_with_a_wrong_hash_changes_nothing(
    prefix: Path, wheel_dir: Path, v1: Path
) -> None:
    install_wheels(prefix, [v1], durability="none")
    good = wheels.demo_wheel(wheel_dir / "good", "3.0", name="good")
    bad = wheels.demo_wheel(wheel_dir / "bad", "2.0", bad_hash="demo/new.py")
    before = snapshot(prefix)
    with pytest.raises(fstx.PlanError) as info:
        # The first wheel is planned in full before the second one fails.
        install_wheels(prefix, [good, bad], upgrade=True, durability="none")
    assert "didn't match RECORD" in str(info.value)
    assert info.value.path == str(bad)
    assert snapshot(prefix) == before
    assert_clean(prefix)


def test_fault_at_any_commit_call_gives_before_or_after(
    scratch: Path, v1: Path, v2: Path
) -> None:
    template = scratch / "template"
    template.mkdir()
    install_with_destination(template, v1)
    after = scratch / "after"
    shutil.copytree(template, after, symlinks=True)
    counter = FailAt(10**9)
    tx = upgrade_in_one_transaction(after, "demo-1.0.dist-info", v2)
    with installed(counter):
        tx.commit()
    total = counter.count
    expected = snapshot(after, inodes=False)
    outcomes = set()
    for k in range(1, total + 1):
        prefix = scratch / f"k{k}"
        shutil.copytree(template, prefix, symlinks=True)
        before = snapshot(prefix)
        tx = upgrade_in_one_transaction(prefix, "demo-1.0.dist-info", v2)
        try:
            with installed(FailAt(k)):
                report = tx.commit()
        except fstx.CommitError:
            # Before the commit point: rolled back to the very same files.
            assert snapshot(prefix) == before, f"fault at mutating call {k} of {total}"
            outcomes.add("rolled back")
        else:
            # After it: clean-up trouble never undoes the commit.
            assert snapshot(prefix, inodes=False) == expected, f"fault at call {k}"
            fstx.recover(prefix)
            outcomes.add("deferred" if report.deferred else "committed")
        assert_clean(prefix)
        shutil.rmtree(prefix)
    assert "rolled back" in outcomes
    assert outcomes & {"deferred", "committed"}


# -- crashes -------------------------------------------------------------------------


def fork(child: Callable[[], object]) -> int:
    """Run ``child`` in a forked process; its exit code (137 when it "crashed")."""
    with warnings.catch_warnings():
        # 3.12+ warns about fork in a process with threads; the child only
        # touches the filesystem and leaves through os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            child()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def crash_at(k: int) -> Callable[[str, str, Tuple[object, ...]], None]:
    count = 0

    def hook(name: str, phase: str, args: Tuple[object, ...]) -> None:
        nonlocal count
        if phase == "before" and name in _os.MUTATING:
            count += 1
            if count == k:
                os._exit(137)

    return hook


def upgrade_crashing_at(prefix: Path, wheel: Path, k: int) -> None:
    """In a forked child: upgrade, dying at the k-th mutating call."""
    _os.set_hook(crash_at(k))
    install_wheels(prefix, [wheel], upgrade=True)


def recover_in_new_interpreter(prefix: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fstx; fstx.recover(sys.argv[1])",
            str(prefix),
        ],
        check=True,
        timeout=60,
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_upgrade_killed_at_any_moment_is_old_or_new(
    scratch: Path, v1: Path, v2: Path
) -> None:
    template = scratch / "template"
    install_wheels(template, [v1])
    old = snapshot(template, inodes=False)
    newer = scratch / "newer"
    shutil.copytree(template, newer, symlinks=True)
    counter = FailAt(10**9)
    with installed(counter):
        install_wheels(newer, [v2], upgrade=True)
    total = counter.count
    new = snapshot(newer, inodes=False)
    assert old != new

    def attempt(k: int) -> str:
        prefix = scratch / f"k{k}"
        shutil.copytree(template, prefix, symlinks=True)
        code = fork(functools.partial(upgrade_crashing_at, prefix, v2, k))
        assert code in (0, 137), f"upgrade crashed at {k} exited {code}"
        if code == 137:
            # Recovery in another process than the one that died.
            assert fork(functools.partial(fstx.recover, prefix)) == 0
        state = snapshot(prefix, inodes=False)
        assert state in (old, new), f"killed at mutating call {k} of {total}: mixed"
        (dist_info,) = site_of(prefix).glob("*.dist-info")
        assert check_record(prefix, dist_info) == files_under(prefix)
        assert_clean(prefix)
        shutil.rmtree(prefix)
        return "old" if state == old else "new"

    outcome = [attempt(k) for k in range(1, total + 2)]
    flip = outcome.index("new")
    assert flip > 0
    assert outcome == ["old"] * flip + ["new"] * (len(outcome) - flip)

    # Either side of the commit point, recovery by a freshly started interpreter.
    for k, state in ((flip, old), (flip + 1, new)):
        prefix = scratch / f"fresh{k}"
        shutil.copytree(template, prefix, symlinks=True)
        assert fork(functools.partial(upgrade_crashing_at, prefix, v2, k)) == 137
        assert fstx.status(prefix).pending
        recover_in_new_interpreter(prefix)
        assert snapshot(prefix, inodes=False) == state
        assert_clean(prefix)


# -- install_wheels ------------------------------------------------------------------


def test_install_wheels_creates_the_prefix_and_runs_the_script(
    tmp_path: Path, v1: Path
) -> None:
    prefix = tmp_path / "new" / "prefix"
    report = install_wheels(prefix, [v1])
    assert isinstance(report, fstx.CommitReport)
    assert report.operations > 0
    listed = check_record(prefix, site_of(prefix) / "demo-1.0.dist-info")
    assert listed == files_under(prefix)
    assert (
        site_of(prefix) / "demo-1.0.dist-info" / "INSTALLER"
    ).read_bytes() == b"fstx"
    assert f"include/{PY}{sys.abiflags}/demo/demo.h" in listed, (
        "headers per distribution"
    )
    assert run_script(prefix, "demo").stdout == "demo 1.0\n"
    assert_clean(prefix)


def test_install_wheels_refuses_an_installed_distribution(
    prefix: Path, v1: Path, v2: Path
) -> None:
    install_wheels(prefix, [v1], durability="none")
    before = snapshot(prefix)
    with pytest.raises(fstx.PlanError) as info:
        install_wheels(prefix, [v2], durability="none")
    message = str(info.value)
    assert "demo is already installed" in message
    assert "demo-1.0.dist-info" in message
    assert "upgrade" in message
    assert snapshot(prefix) == before
    assert_clean(prefix)


def test_install_wheels_upgrade(prefix: Path, v1: Path, v2: Path) -> None:
    install_wheels(prefix, [v1], durability="none")
    install_wheels(prefix, [v2], upgrade=True, durability="none")
    assert dist_infos(prefix) == ["demo-2.0.dist-info"]
    assert check_record(prefix, site_of(prefix) / "demo-2.0.dist-info") == files_under(
        prefix
    )
    assert run_script(prefix, "demo").stdout == "demo 2.0\n"
    # The same version again is a reinstall.
    install_wheels(prefix, [v2], upgrade=True, durability="none")
    assert check_record(prefix, site_of(prefix) / "demo-2.0.dist-info") == files_under(
        prefix
    )


def test_install_wheels_compares_normalized_names(
    prefix: Path, wheel_dir: Path
) -> None:
    first = wheels.demo_wheel(wheel_dir / "n1", "1.0", name="Demo.Pkg")
    second = wheels.demo_wheel(wheel_dir / "n2", "2.0", name="demo-pkg")
    install_wheels(prefix, [first], durability="none")
    assert dist_infos(prefix) == ["Demo.Pkg-1.0.dist-info"]
    with pytest.raises(fstx.PlanError, match="already installed"):
        install_wheels(prefix, [second], durability="none")
    install_wheels(prefix, [second], upgrade=True, durability="none")
    assert dist_infos(prefix) == ["demo_pkg-2.0.dist-info"]
    assert check_record(
        prefix, site_of(prefix) / "demo_pkg-2.0.dist-info"
    ) == files_under(prefix)


@pytest.mark.parametrize(
    ("wheels_of", "message"),
    [
        pytest.param(lambda d, v1: [v1, v1], "same distribution", id="twice"),
        pytest.param(
            lambda d, v1: [d / "nope-1.0-py3-none-any.whl"],
            "no wheel file",
            id="missing",
        ),
        pytest.param(
            lambda d, v1: [d / "junk-1.0-py3-none-any.whl"],
            "not a valid wheel",
            id="not-a-zip",
        ),
    ],
)
def test_install_wheels_refuses_bad_input(
    tmp_path: Path,
    wheel_dir: Path,
    v1: Path,
    wheels_of: Callable[[Path, Path], List[Path]],
    message: str,
) -> None:
    (wheel_dir / "junk-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    with pytest.raises(fstx.PlanError, match=message):
        install_wheels(prefix, wheels_of(wheel_dir, v1), durability="none")
    assert files_under(prefix) == set()
    assert_clean(prefix)


def test_install_wheels_into_a_venv_uses_its_python(tmp_path: Path, v1: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    install_wheels(venv, [v1], durability="none")
    script = venv / "bin" / "demo"
    assert script.read_text().splitlines()[0] == f"#!{venv / 'bin' / 'python'}"
    done = subprocess.run(
        [str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == "demo 1.0\n", done.stderr


# -- a real wheel from PyPI ----------------------------------------------------------


def download(project: str, into: Path) -> Optional[Path]:
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--timeout",
                "20",
                "--retries",
                "1",
                "-d",
                str(into),
                project,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    found = sorted(into.glob("*.whl"))
    return found[0] if done.returncode == 0 and found else None


def test_real_wheel_from_pypi(tmp_path: Path) -> None:
    wheel = download("pyflakes", tmp_path / "downloads")
    if wheel is None:
        pytest.skip("could not download pyflakes from PyPI (no network?)")
    prefix = tmp_path / "prefix"
    install_wheels(prefix, [wheel])
    (dist_info,) = site_of(prefix).glob("pyflakes-*.dist-info")
    assert check_record(prefix, dist_info) == files_under(prefix)
    version = dist_info.name[len("pyflakes-") : -len(".dist-info")]
    done = run_script(prefix, "pyflakes", "--version")
    assert done.returncode == 0, done.stderr
    assert version in done.stdout
    checked = run_script(prefix, "pyflakes", str(Path(__file__).parent / "wheels.py"))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    with fstx.transaction(prefix, durability="none") as tx:
        uninstall(tx, dist_info)
    assert files_under(prefix) == set()
    assert_clean(prefix)
