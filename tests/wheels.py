"""Build small, deterministic, PyPI-shaped wheels for the tests.

A wheel here is what a build backend would publish: a zip with the package,
``name-version.dist-info/{METADATA,WHEEL,entry_points.txt,RECORD}`` (RECORD
last, with urlsafe-base64 sha256 hashes and sizes) and optional
``name-version.data/{scripts,data,headers}`` files. The same arguments give
byte-identical wheels: fixed timestamps, fixed modes, sorted entries.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Dict, List, Mapping, Optional, Tuple

if TYPE_CHECKING:
    import os

EPOCH = (1980, 1, 1, 0, 0, 0)


def escape(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427)."""
    return re.sub(r"[^\w\d.]+", "_", name, flags=re.UNICODE)


def record_hash(data: bytes) -> str:
    """``sha256=<urlsafe base64, unpadded>`` of ``data``, as RECORD writes it."""
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def dist_info_name(name: str, version: str) -> str:
    return f"{escape(name)}-{version}.dist-info"


def data_dir_name(name: str, version: str) -> str:
    return f"{escape(name)}-{version}.data"


def build_wheel(
    directory: str | os.PathLike[str],
    name: str,
    version: str,
    files: Mapping[str, bytes],
    *,
    entry_points: Optional[str] = None,
    executables: Collection[str] = (),
    purelib: bool = True,
    tag: str = "py3-none-any",
    bad_hash: Optional[str] = None,
) -> Path:
    """Write ``<name>-<version>-<tag>.whl`` into ``directory`` and return its path.

    Args:
        files: archive paths and contents; a path starting with ``.data/``
            goes into the wheel's ``name-version.data/`` directory.
        entry_points: the text of ``entry_points.txt``, if any.
        executables: paths of ``files`` stored with mode 0o755.
        bad_hash: a path of ``files`` whose RECORD hash is made wrong.
    """
    dist_info = dist_info_name(name, version)
    data_dir = data_dir_name(name, version)

    def archived(path: str) -> str:
        return data_dir + path[len(".data") :] if path.startswith(".data/") else path

    members: Dict[str, Tuple[bytes, int]] = {}
    for path, data in files.items():
        mode = 0o755 if path in executables else 0o644
        members[archived(path)] = (data, mode)
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    wheel = (
        "Wheel-Version: 1.0\n"
        "Generator: fstx-tests\n"
        f"Root-Is-Purelib: {'true' if purelib else 'false'}\n"
        f"Tag: {tag}\n"
    )
    members[f"{dist_info}/METADATA"] = (metadata.encode(), 0o644)
    members[f"{dist_info}/WHEEL"] = (wheel.encode(), 0o644)
    if entry_points is not None:
        members[f"{dist_info}/entry_points.txt"] = (entry_points.encode(), 0o644)

    rows: List[Tuple[str, str, str]] = []
    for path, (data, _mode) in sorted(members.items()):
        digest = record_hash(data)
        if bad_hash is not None and path == archived(bad_hash):
            digest = record_hash(data + b"tampered")
        rows.append((path, digest, str(len(data))))
    rows.append((f"{dist_info}/RECORD", "", ""))
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    record = text.getvalue().encode()

    target = Path(directory) / f"{escape(name)}-{version}-{tag}.whl"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Packages first, dist-info last and RECORD at the very end, as wheel does.
    order = sorted(members, key=lambda p: (p.startswith(dist_info), p))
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in order:
            data, mode = members[path]
            info = zipfile.ZipInfo(path, date_time=EPOCH)
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=EPOCH)
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, record)
    return target


def demo_files(name: str, version: str) -> Dict[str, bytes]:
    """The files of the demo distribution ``name`` (a package of the same name).

    Version ``1.0`` has a ``legacy`` subpackage that later versions dropped;
    later versions have a ``new`` module instead, so an upgrade must remove
    files and a whole directory.
    """
    pkg = escape(name)
    files = {
        f"{pkg}/__init__.py": f'__version__ = "{version}"\n'.encode(),
        f"{pkg}/cli.py": (
            f"from {pkg} import __version__\n\n\n"
            "def main() -> int:\n"
            f'    print(f"{name} {{__version__}}")\n'
            "    return 0\n"
        ).encode(),
        f"{pkg}/sub/__init__.py": b"",
        f"{pkg}/sub/helpers.py": f"VERSION = {version!r}\n".encode(),
        f".data/scripts/{name}-hello": (
            f'#!python\nprint("hello from {name} {version}")\n'
        ).encode(),
        f".data/data/share/{name}/readme.txt": f"{name} {version}\n".encode(),
        f".data/headers/{pkg}.h": f"#define DEMO_VERSION {version!r}\n".encode(),
    }
    if version == "1.0":
        files[f"{pkg}/legacy/__init__.py"] = b""
        files[f"{pkg}/legacy/old.py"] = b"OLD = True\n"
    else:
        files[f"{pkg}/new.py"] = b"NEW = True\n"
    return files


def demo_wheel(
    directory: str | os.PathLike[str],
    version: str,
    *,
    name: str = "demo",
    bad_hash: Optional[str] = None,
    extra: Optional[Mapping[str, bytes]] = None,
) -> Path:
    """The demo wheel: a package, a console script ``name``, a ``.data`` script,
    data and a header."""
    files = demo_files(name, version)
    files.update(extra or {})
    return build_wheel(
        directory,
        name,
        version,
        files,
        entry_points=f"[console_scripts]\n{name} = {escape(name)}.cli:main\n",
        executables={f".data/scripts/{name}-hello"},
        bad_hash=bad_hash,
    )
