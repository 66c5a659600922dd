"""The workloads and their variants: fstx and the baselines it is measured against.

Each variant has an untimed ``setup`` (which makes a fresh target: earlier
outputs are never deleted between runs, see docs/benchmarks.md) and a timed
``run``. Variants that are whole processes (wheel installers, scaling) run
``benchmarks.drivers`` or the installer's own command in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import data as _data

PACKAGE = _data.PACKAGE
_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Variant:
    """One way of doing a workload."""

    key: str
    label: str
    run: Callable[[Any], Any]
    setup: Callable[["Bench"], Any]
    available: Optional[str] = None  # why not, when it cannot run here


@dataclass
class Target:
    """A goal of the issue: ``num / den`` (medians of per-round ratios) at most ``limit``."""

    text: str
    num: str
    den: str
    limit: float


@dataclass
class Workload:
    key: str
    title: str
    reference: str
    variants: List[Variant]
    targets: List[Target] = field(default_factory=list)
    note: str = ""


@dataclass
class Config:
    shape: _data.Shape = _data.DEFAULT
    rounds: int = 5
    cache_writes: int = 5000
    cache_writes_full: int = 1000  # 2 fsyncs each: 5,000 take minutes per variant here
    scale_sizes: Tuple[int, ...] = (1000, 10_000, 100_000)
    scale_rounds: int = 2
    recover_calls: int = 2000


class Bench:
    """The data (made once per run of the runner) and fresh targets under ``workdir``."""

    def __init__(self, workdir: Path, config: Config) -> None:
        self.workdir = workdir
        self.config = config
        self.src_old = workdir / "data" / "old"
        self.src_new = workdir / "data" / "new"
        self.runs = workdir / "runs"
        self._n = 0
        self.dataset: Optional[_data.Dataset] = None
        self.wheel = workdir / "data" / f"{PACKAGE}-1.0-py3-none-any.whl"

    def prepare(self) -> None:
        """Write the trees and the wheel (once; a second Bench reuses them)."""
        self.dataset = _data.make_dataset(self.config.shape)
        marker = self.workdir / "data" / "ready"
        self.runs.mkdir(parents=True, exist_ok=True)
        if marker.exists():
            return
        _data.write_tree(self.src_old, self.dataset.old)
        _data.write_tree(self.src_new, self.dataset.new)
        _data.build_wheel(self.wheel.parent, self.dataset.old)
        marker.write_text("ok\n")

    @property
    def ds(self) -> _data.Dataset:
        assert self.dataset is not None
        return self.dataset

    def fresh(self, name: str) -> Path:
        """A new, empty directory for one run (never one a previous run used)."""
        self._n += 1
        path = self.runs / f"{self._n:05d}-{os.getpid()}-{name}"
        path.mkdir(parents=True)
        return path


SYNC = True  # off when counting fsync calls under strace (sync would count)


def _sync() -> None:
    # Every timed run starts with no dirty data: a durable variant's syncfs must
    # not pay for what an earlier, non-durable run left in the page cache.
    if SYNC:
        os.sync()


# -- install into an empty root ----------------------------------------------


def _copy_files(src: Path, root: Path, rels: Sequence[str], durable: bool) -> None:
    made: Dict[str, None] = {}
    for rel in rels:
        parent = os.path.dirname(rel)
        if parent not in made:
            os.makedirs(root / parent, exist_ok=True)
            made[parent] = None
        dst = root / rel
        shutil.copy2(src / rel, dst)
        if durable:
            fd = os.open(dst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if durable:
        # Every directory, deepest first, and the root (their new entries).
        dirs = set()
        for parent in made:
            parts = parent.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        for d in [*sorted(dirs, key=lambda d: -d.count("/")), ""]:
            fd = os.open(root / d if d else root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def install_workload(b: Bench) -> Workload:
    import fstx

    rels = list(b.ds.old)

    def empty(b: Bench) -> Path:
        root = b.fresh("install")
        _sync()
        return root

    def plain(root: Path) -> None:
        _copy_files(b.src_old, root, rels, durable=False)

    def naive(root: Path) -> None:
        _copy_files(b.src_old, root, rels, durable=True)

    def per_file(durability: str) -> Callable[[Path], None]:
        def run(root: Path) -> None:
            with fstx.transaction(root, durability=durability) as tx:
                for rel in rels:
                    tx.copy(b.src_old / rel, rel)

        return run

    def tree(durability: str, link: bool = False) -> Callable[[Path], None]:
        def run(root: Path) -> None:
            with fstx.transaction(root, durability=durability) as tx:
                tx.copy(b.src_old / PACKAGE, PACKAGE, link=link)

        return run

    return Workload(
        "install",
        f"Install into an empty root ({len(rels)} files, {b.ds.old_dirs} directories, "
        f"{b.ds.old_bytes / 2**20:.1f} MiB)",
        "copy2",
        [
            Variant("copy2", "shutil.copy2 per file (unsafe floor)", plain, empty),
            Variant("naive", "copy2 + fsync every file and directory", naive, empty),
            Variant(
                "fstx-none",
                "fstx, a copy per file, durability='none'",
                per_file("none"),
                empty,
            ),
            Variant(
                "fstx-tree-none",
                "fstx, one tree copy, durability='none'",
                tree("none"),
                empty,
            ),
            Variant(
                "fstx-full",
                "fstx, a copy per file, durability='full'",
                per_file("full"),
                empty,
            ),
            Variant(
                "fstx-tree-full",
                "fstx, one tree copy, durability='full'",
                tree("full"),
                empty,
            ),
            Variant(
                "fstx-link-none",
                "fstx, one tree copy with link=True (a cache on the same file "
                "system), durability='none'",
                tree("none", link=True),
                empty,
            ),
        ],
        [
            Target("install `none` ≤ 1.10 × unsafe copy", "fstx-none", "copy2", 1.10),
            Target(
                "install `none` (tree copy) ≤ 1.10 × unsafe copy",
                "fstx-tree-none",
                "copy2",
                1.10,
            ),
            Target(
                "install `full` ≤ 0.5 × naive fsync-everything copy",
                "fstx-full",
                "naive",
                0.5,
            ),
            Target(
                "install `full` (tree copy) ≤ 0.5 × naive copy",
                "fstx-tree-full",
                "naive",
                0.5,
            ),
            Target("install `full` ≤ 1.6 × fstx `none`", "fstx-full", "fstx-none", 1.6),
            Target(
                "install `full` (tree copy) ≤ 1.6 × fstx `none`",
                "fstx-tree-full",
                "fstx-tree-none",
                1.6,
            ),
        ],
    )


# -- upgrade in place -----------------------------------------------------------


def upgrade_workload(b: Bench) -> Workload:
    import fstx

    new_rels = list(b.ds.new)
    removed = b.ds.removed

    def installed(b: Bench) -> Path:
        root = b.fresh("upgrade")
        shutil.copytree(b.src_old / PACKAGE, root / PACKAGE)
        _sync()
        return root

    def overwrite(root: Path) -> None:
        _copy_files(b.src_new, root, new_rels, durable=False)
        for rel in removed:
            os.unlink(root / rel)

    def pip_stash(root: Path) -> None:
        # What pip does on an upgrade (req_install.install_given_reqs): stash
        # the old distribution's files, install the new one, commit the stash.
        from pip._internal.req.req_uninstall import (
            StashedUninstallPathSet,
            compact,
            compress_for_rename,
        )

        paths = {os.path.normcase(str(root / rel)) for rel in b.ds.old}
        stash = StashedUninstallPathSet()
        for path in sorted(compact(compress_for_rename(paths))):
            stash.stash(path)
        _copy_files(b.src_new, root, new_rels, durable=False)
        stash.commit()

    def per_file(durability: str) -> Callable[[Path], None]:
        def run(root: Path) -> None:
            with fstx.transaction(root, durability=durability) as tx:
                for rel in new_rels:
                    tx.copy(b.src_new / rel, rel)
                for rel in removed:
                    tx.delete(rel)

        return run

    def tree(durability: str) -> Callable[[Path], None]:
        def run(root: Path) -> None:
            with fstx.transaction(root, durability=durability) as tx:
                tx.delete(PACKAGE)
                tx.copy(b.src_new / PACKAGE, PACKAGE)

        return run

    return Workload(
        "upgrade",
        f"Upgrade in place ({len(b.ds.changed)} changed, {len(removed)} removed, "
        f"{len(b.ds.added)} new; every file of the new version is written)",
        "overwrite",
        [
            Variant(
                "overwrite",
                "plain overwrite (copy2 over, unlink removed)",
                overwrite,
                installed,
            ),
            Variant(
                "pip",
                "pip's StashedUninstallPathSet: stash, copy, commit",
                pip_stash,
                installed,
            ),
            Variant(
                "fstx-none",
                "fstx, a copy per file + deletes, durability='none'",
                per_file("none"),
                installed,
            ),
            Variant(
                "fstx-tree-none",
                "fstx, delete tree + copy tree, durability='none'",
                tree("none"),
                installed,
            ),
            Variant(
                "fstx-full",
                "fstx, a copy per file + deletes, durability='full'",
                per_file("full"),
                installed,
            ),
        ],
        [
            Target(
                "upgrade `none` ≤ 1.0 × pip's stash-and-commit", "fstx-none", "pip", 1.0
            ),
            Target(
                "upgrade `none` (tree) ≤ 1.0 × pip's stash-and-commit",
                "fstx-tree-none",
                "pip",
                1.0,
            ),
        ],
    )


# -- wheel install, whole processes ---------------------------------------------


def tool_version(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or out.stderr.strip()


def _driver(*args: str) -> List[str]:
    return [sys.executable, "-m", "benchmarks.drivers", *args]


def _quiet(cmd: List[str], env: Optional[Dict[str, str]] = None) -> None:
    proc = subprocess.run(
        cmd,
        cwd=_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )


def uv_path() -> Optional[str]:
    return shutil.which("uv")


def wheel_workload(b: Bench) -> Workload:
    wheel = str(b.wheel)
    uv = uv_path()
    uv_env = {
        **os.environ,
        "UV_CACHE_DIR": str(b.workdir / "uv-cache"),
        "UV_NO_PROGRESS": "1",
    }

    def prefix(b: Bench) -> str:
        path = b.fresh("wheel")
        _sync()
        return str(path)

    def driver(kind: str) -> Callable[[str], None]:
        return lambda p: _quiet(_driver("wheel", kind, p, wheel))

    def in_process(kind: str) -> Callable[[str], None]:
        # The same install in this process: its imports were paid by the
        # warm-up round, so what is left is the install itself.
        from benchmarks import drivers

        return lambda p: drivers.wheel(kind, p, wheel)

    def pip(p: str) -> None:
        _quiet(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
             "--disable-pip-version-check", "--no-warn-script-location", "-q", "--prefix", p, wheel]
        )  # fmt: skip

    def uv_cmd(p: str, *extra: str) -> List[str]:
        assert uv is not None
        return [uv, "pip", "install", "--no-deps", "--offline", "-q", "--python", sys.executable,
                "--prefix", p, *extra, wheel]  # fmt: skip

    def uv_run(*extra: str) -> Callable[[str], None]:
        return lambda p: _quiet(uv_cmd(p, *extra), uv_env)

    def uv_warm(link: str) -> Callable[[Bench], str]:
        warmed: List[bool] = []

        def setup(b: Bench) -> str:
            if not warmed:  # fill uv's cache once, untimed
                _quiet(uv_cmd(str(b.fresh("uv-warm")), "--link-mode", link), uv_env)
                warmed.append(True)
            return prefix(b)

        return setup

    no_uv = None if uv is not None else "uv is not installed (pip install uv)"
    return Workload(
        "wheel",
        "Wheel install, end to end (whole processes; no bytecode compilation in any)",
        "installer",
        [
            Variant(
                "installer",
                "pypa/installer, SchemeDictionaryDestination",
                driver("installer"),
                prefix,
            ),
            Variant(
                "fstx-none",
                "fstx TransactionalDestination, durability='none'",
                driver("fstx-none"),
                prefix,
            ),
            Variant(
                "fstx-full",
                "fstx TransactionalDestination, durability='full'",
                driver("fstx-full"),
                prefix,
            ),
            Variant(
                "installer-in-process",
                "pypa/installer, SchemeDictionaryDestination, in this process "
                "(no interpreter start, no imports)",
                in_process("installer"),
                prefix,
            ),
            Variant(
                "fstx-none-in-process",
                "fstx TransactionalDestination, durability='none', in this process "
                "(no interpreter start, no imports)",
                in_process("fstx-none"),
                prefix,
            ),
            Variant(
                "pip", "pip install --no-deps --no-index --no-compile", pip, prefix
            ),
            Variant(
                "uv-cold",
                "uv pip install --offline --no-cache",
                uv_run("--no-cache"),
                prefix,
                no_uv,
            ),
            Variant(
                "uv-copy",
                "uv pip install --offline, warm cache, --link-mode=copy",
                uv_run("--link-mode", "copy"),
                uv_warm("copy"),
                no_uv,
            ),
            Variant(
                "uv-link",
                "uv pip install --offline, warm cache, --link-mode=hardlink",
                uv_run("--link-mode", "hardlink"),
                uv_warm("hardlink"),
                no_uv,
            ),
        ],
        [
            Target(
                "wheel install `none` ≤ 1.10 × pypa/installer",
                "fstx-none",
                "installer",
                1.10,
            ),
            Target(
                "wheel install `full` ≤ 1.10 × pypa/installer",
                "fstx-full",
                "installer",
                1.10,
            ),
            Target("wheel install `none` faster than pip", "fstx-none", "pip", 1.0),
            Target("wheel install `full` faster than pip", "fstx-full", "pip", 1.0),
        ],
        "The fstx variants run the same `installer.install()` call as the pypa/installer "
        "variant, with `TransactionalDestination` in place of `SchemeDictionaryDestination`.",
    )


# -- cache writes ----------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hand_written_atomic_write(path: str, data: bytes, durable: bool) -> None:
    """The usual temp-file-and-rename, at fstx's durability (file and directory fsync)."""
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        _fsync_dir(parent)


def cache_workload(b: Bench, durability: str) -> Workload:
    import fstx

    full = durability == "full"
    n = b.config.cache_writes_full if full else b.config.cache_writes
    payload = bytes(range(256)) * 16  # 4 KiB
    names = [f"{i % 64:02x}/entry-{i:05d}" for i in range(n)]

    def cache(b: Bench) -> List[str]:
        top = b.fresh("cache")
        for i in range(64):
            (top / f"{i:02x}").mkdir()
        _sync()
        return [str(top / name) for name in names]

    def fstx_write(paths: List[str]) -> None:
        for p in paths:
            fstx.atomic_write(p, payload, durability=durability)

    def hand(paths: List[str]) -> None:
        for p in paths:
            hand_written_atomic_write(p, payload, full)

    variants = [
        Variant(
            "hand",
            f"hand-written temp file + rename ({'fsync file and directory' if full else 'no fsync'})",
            hand,
            cache,
        ),
        Variant(
            "fstx", f"fstx.atomic_write, durability={durability!r}", fstx_write, cache
        ),
    ]
    if full:
        try:
            import atomicwrites

            why = None
        except ImportError:
            why = "the atomicwrites package is not installed (pip install atomicwrites)"

        def aw(paths: List[str]) -> None:
            for p in paths:
                with atomicwrites.atomic_write(p, mode="wb", overwrite=True) as f:
                    f.write(payload)

        variants.append(
            Variant(
                "atomicwrites",
                "atomicwrites.atomic_write (always fsyncs file and directory)",
                aw,
                cache,
                why,
            )
        )
    return Workload(
        f"cache-{durability}",
        f"{n} cache writes of 4 KiB into 64 directories, durability={durability!r}",
        "hand",
        variants,
        [
            Target(
                f"`atomic_write` `{durability}` ≤ 1.10 × hand-written",
                "fstx",
                "hand",
                1.10,
            )
        ],
    )


# -- recover() with nothing to do -------------------------------------------------


def recover_workload(b: Bench) -> Workload:
    import fstx

    k = b.config.recover_calls

    def clean_root(b: Bench) -> Path:
        root = b.fresh("recover")
        with fstx.transaction(root, durability="none") as tx:
            tx.write_bytes("x", b"x")
        return root

    def recover(root: Path) -> None:
        for _ in range(k):
            fstx.recover(root)

    def stat_listdir(root: Path) -> None:
        text = str(root)
        for _ in range(k):
            os.stat(text)
            os.listdir(text)

    return Workload(
        "recover",
        f"`recover()` on a clean root ({k} calls per run)",
        "stat+listdir",
        [
            Variant(
                "stat+listdir",
                "one os.stat plus one os.listdir",
                stat_listdir,
                clean_root,
            ),
            Variant("recover", "fstx.recover(root)", recover, clean_root),
        ],
        [
            Target(
                "`recover()` with nothing to do ≤ 3 × os.stat + os.listdir",
                "recover",
                "stat+listdir",
                3.0,
            )
        ],
    )


# -- scaling ----------------------------------------------------------------------


MEMORY_FS = "/dev/shm"
"""A tmpfs for the scaling runs that leave the disk out (when it is there)."""


def memory_fs() -> Optional[str]:
    """``MEMORY_FS`` if it is a writable directory, else None."""
    ok = os.path.isdir(MEMORY_FS) and os.access(MEMORY_FS, os.W_OK)
    return MEMORY_FS if ok else None


def scale_once(
    b: Bench, kind: str, n: int, traced: bool = False, memory: bool = False
) -> Dict[str, float]:
    """One scaling run in a fresh process: ``{"seconds", "kib_per_op", ...}``.

    With ``memory``, the root is on a tmpfs (removed after the run): what
    the engine costs per operation without the disk's own growth.
    """
    if memory:
        root = Path(tempfile.mkdtemp(prefix="fstx-scale-", dir=memory_fs()))
    else:
        root = b.fresh(f"scale-{kind}-{n}")
        _sync()
    args = ["scale", kind, str(root), str(n)] + (["--trace"] if traced else [])
    try:
        proc = subprocess.run(
            _driver(*args), cwd=_ROOT, capture_output=True, text=True, check=False
        )
    finally:
        if memory:
            shutil.rmtree(root, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scale {kind} {n} failed: {proc.stderr[-2000:]}")
    result: Dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def timed(func: Callable[[Any], Any], arg: Any) -> float:
    start = time.perf_counter()
    func(arg)
    return time.perf_counter() - start
