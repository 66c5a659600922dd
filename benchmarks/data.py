"""Deterministic synthetic data: a tree shaped like a large wheel, its upgrade, a wheel.

The same ``Shape`` and seed give byte-identical trees on every machine: no
network, no randomness from the system. The default shape is close to a large
real wheel (about 2,000 files in about 500 directories, about 21 MB): many
small, compressible ``.py`` files, a few large binary extension modules.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

PACKAGE = "bigpkg"
MTIME = 1_600_000_000  # every file gets this mtime: the tree is reproducible
_WORDS = (
    "def class return self import from for in if else elif while try except "
    "with as lambda yield None True False pass raise assert global data value "
    "result index name path items key kwargs args config buffer stream"
).split()


@dataclass(frozen=True)
class Shape:
    """How big the synthetic tree is."""

    files: int = 2000
    dirs: int = 500
    total_bytes: int = 21 * 1024 * 1024
    big_files: int = 10  # extension modules: a quarter of the bytes
    seed: int = 6


DEFAULT = Shape()
TINY = Shape(files=40, dirs=10, total_bytes=400 * 1024, big_files=2)


def _dirs(rng: random.Random, shape: Shape) -> List[str]:
    dirs = [PACKAGE]
    depth = {PACKAGE: 1}
    for i in range(shape.dirs - 1):
        # Prefer shallow parents, as real packages do (at most 6 levels).
        parent = rng.choice([d for d in dirs[-60:] if depth[d] < 6] or [PACKAGE])
        name = f"{parent}/sub{i:03d}"
        dirs.append(name)
        depth[name] = depth[parent] + 1
    return dirs


def _sizes(rng: random.Random, shape: Shape) -> List[int]:
    small = [max(64, int(rng.lognormvariate(8.3, 1.1))) for _ in range(shape.files)]
    big_total = shape.total_bytes // 4
    big = [big_total // shape.big_files] * shape.big_files
    scale = (shape.total_bytes - big_total) / sum(small[shape.big_files :])
    small = [max(64, int(s * scale)) for s in small[shape.big_files :]]
    return big + small


def _text_pool(rng: random.Random, size: int) -> str:
    words = rng.choices(_WORDS, k=size // 5 + 1)
    lines = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
    return "\n".join(lines)


def plan_tree(shape: Shape) -> Dict[str, Tuple[int, bool]]:
    """``{relative path: (size, is_binary)}`` of the tree, sorted."""
    rng = random.Random(shape.seed)
    dirs = _dirs(rng, shape)
    files: Dict[str, Tuple[int, bool]] = {}
    # Every directory gets at least one file (a package's __init__.py).
    sizes = _sizes(rng, shape)
    for i, size in enumerate(sizes):
        binary = i < shape.big_files
        parent = dirs[i] if i < len(dirs) else rng.choice(dirs)
        if binary:
            name = f"_ext{i}.cpython-311-x86_64-linux-gnu.so"
        elif i < len(dirs):
            name = "__init__.py"
        else:
            name = f"mod{i:04d}.py"
        files[f"{parent}/{name}"] = (size, binary)
    return dict(sorted(files.items()))


def _content(
    rng: random.Random, pool: str, rel: str, size: int, binary: bool, tag: str
) -> bytes:
    if binary:
        return rng.randbytes(size)
    start = rng.randrange(0, max(1, len(pool) - size))
    head = f"# {rel} {tag}\n"
    return (head + pool[start : start + size - len(head)]).encode("ascii")


def write_tree(top: Path, files: Dict[str, bytes]) -> None:
    """Write ``files`` under ``top`` with fixed modes and mtimes."""
    for rel, data in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, 0o755 if rel.endswith(".so") else 0o644)
        os.utime(path, (MTIME, MTIME))


@dataclass
class Dataset:
    """The old tree, the new tree, and what changed between them."""

    old: Dict[str, bytes]
    new: Dict[str, bytes]
    changed: List[str]
    removed: List[str]
    added: List[str]

    @property
    def old_bytes(self) -> int:
        return sum(map(len, self.old.values()))

    @property
    def old_dirs(self) -> int:
        return len({os.path.dirname(p) for p in self.old} | {PACKAGE})


def make_dataset(shape: Shape) -> Dataset:
    """The old tree and an upgrade of it: 60 % changed, 10 % removed, 10 % new."""
    planned = plan_tree(shape)
    rng = random.Random(shape.seed + 1)
    pool = _text_pool(rng, 1 << 20)
    old = {
        rel: _content(rng, pool, rel, size, binary, "v1")
        for rel, (size, binary) in planned.items()
    }
    names = sorted(old)
    order = names[:]
    rng.shuffle(order)
    n = len(order)
    changed = sorted(order[: n * 6 // 10])
    removed = sorted(order[n * 6 // 10 : n * 7 // 10])
    removed = [r for r in removed if not r.endswith("__init__.py")]
    new = {rel: data for rel, data in old.items() if rel not in set(removed)}
    for rel in changed:
        size, binary = planned[rel]
        size = max(64, int(size * rng.uniform(0.8, 1.2)))
        new[rel] = _content(rng, pool, rel, size, binary, "v2")
    dirs = sorted({os.path.dirname(p) for p in old})
    added = []
    for i in range(n // 10):
        rel = f"{rng.choice(dirs)}/new{i:04d}.py"
        added.append(rel)
        new[rel] = _content(
            rng, pool, rel, max(64, int(rng.lognormvariate(8.3, 1.1))), False, "v2"
        )
    return Dataset(old, dict(sorted(new.items())), changed, removed, sorted(added))


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def build_wheel(directory: Path, files: Dict[str, bytes], version: str = "1.0") -> Path:
    """A deflated wheel of ``files`` (purelib), with one console script.

    Byte-identical for the same input: fixed timestamps, sorted entries.
    """
    dist_info = f"{PACKAGE}-{version}.dist-info"
    meta = {
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: fstx-benchmarks\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": (
            f"[console_scripts]\n{PACKAGE} = {PACKAGE}:main\n"
        ).encode(),
    }
    entries = {**files, **meta}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for rel, data in entries.items():
        writer.writerow((rel, _record_hash(data), len(data)))
    writer.writerow((f"{dist_info}/RECORD", "", ""))
    path = directory / f"{PACKAGE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in [
            *entries.items(),
            (f"{dist_info}/RECORD", record.getvalue().encode()),
        ]:
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if rel.endswith(".so") else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=6)
    return path
