"""Transactional wheel installs and uninstalls with pypa/installer.

:class:`TransactionalDestination` is an installer ``WheelDestination`` that
plans every file it writes through an :class:`fstx.Transaction`;
:func:`uninstall` plans the removal of an installed distribution in the same
transaction. An upgrade (uninstall the old version, install the new one) then
commits as one all-or-nothing step: never a ``.dist-info`` without its files,
never files without their ``.dist-info``. :func:`install_wheels` puts both
together into a small transactional wheel installer for a prefix::

    with fstx.transaction(venv) as tx:
        uninstall(tx, site_packages / "pkg-1.0.dist-info")
        dest = TransactionalDestination(tx, scheme_dict, sys.executable, "posix")
        with WheelFile.open(wheel) as source:
            installer.install(source, dest, {"INSTALLER": b"my-tool"})

Whether a file is already there (as planned) is asked of
:meth:`fstx.Transaction.exists`. An uninstall also needs the planned content of
a directory, which the transaction does not offer: :class:`_PlannedView`
replays its public :attr:`~fstx.Transaction.operations` over the real tree.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import hashlib
import importlib.util
import io
import itertools
import logging
import marshal
import os
import posixpath
import re
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    BinaryIO,
    Collection,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import fstx
from fstx import CommitReport, Operation, PlanError, Transaction

try:
    import installer
    from installer.destinations import WheelDestination
    from installer.exceptions import InstallerError
    from installer.records import Hash, RecordEntry
    from installer.scripts import Script
    from installer.sources import WheelFile
    from installer.utils import fix_shebang, get_launcher_kind
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "fstx.integrations.installer needs the 'installer' package: "
        "pip install fstx[installer]"
    ) from exc

if TYPE_CHECKING:
    from installer.scripts import LauncherKind, ScriptSection

__all__ = ["TransactionalDestination", "install_wheels", "uninstall"]

_log = logging.getLogger("fstx")

StrPath = Union[str, "os.PathLike[str]"]

_SCHEMES = ("purelib", "platlib", "headers", "scripts", "data")
_LIB_SCHEMES = ("purelib", "platlib")
_EXECUTABLE = 0o755
_CHUNK = 1 << 20
_STAGING = ".fstx"  # SPEC §3: staging lives in <root>/.fstx/
# Where names that differ only in case are the same file (Windows), compare
# planned paths case-insensitively, as the filesystem will.
_FOLD_CASE = os.path.normcase("A") == "a"
# PEP 552: a hash-based .pyc checked against its source at import. Its
# validity does not depend on the mtime the staged source gets.
_PYC_CHECKED_HASH = 0b11


def _key(rel: str) -> str:
    return rel.lower() if _FOLD_CASE else rel


def _parents(rel: str) -> List[str]:
    """``a``, ``a/b`` for ``a/b/c``: every proper ancestor of a relative path."""
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _is_below(path: str, top: str) -> bool:
    return path.startswith(top + "/")


def _relative_to(path: str, base: str) -> Optional[str]:
    """Normalised absolute ``path`` relative to ``base``, ``/``-separated; or None."""
    norm = os.path.normcase
    p = norm(path)
    b = norm(base)
    if p == b:
        return ""
    prefix = b if b.endswith(os.sep) else b + os.sep
    if not p.startswith(prefix):
        return None
    return path[len(prefix) :].replace(os.sep, "/")


def _canonical_name(name: str) -> str:
    """A distribution name normalised as PEP 503 says, for comparing names."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _PlannedView:
    """Whether a path exists once a transaction's planned operations apply.

    The engine keeps its planned tree private; this view replays the public
    ``tx.operations`` (root-relative paths, symlinks resolved) over the real
    tree. It is exact for what writes, deletes, mkdirs and renames produce,
    looks up the inside of a copied tree at the copy's source, and is
    conservative where it cannot see: a directory that a copy or rename put in
    place is never reported as empty.
    """

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.real_root = os.path.realpath(tx.root)
        self._ops: List[Operation] = []
        self._at: Dict[str, List[int]] = {}  # path -> operations on it
        self._below: Dict[str, List[int]] = {}  # dir -> operations inside it
        self._moved: Dict[str, List[int]] = {}  # path -> renames away from it
        self._real_dirs: Dict[str, str] = {}

    def sync(self) -> None:
        """Take in the operations planned since the last call."""
        ops = self.tx.operations
        for index in range(len(self._ops), len(ops)):
            op = ops[index]
            self._ops.append(op)
            key = _key(op.path)
            self._at.setdefault(key, []).append(index)
            for top in _parents(key):
                self._below.setdefault(top, []).append(index)
            if op.kind == "rename" and op.source is not None:
                self._moved.setdefault(_key(op.source), []).append(index)

    def rel(self, path: str) -> Optional[str]:
        """The root-relative spelling the engine records for absolute ``path``.

        Symlinks in the parents are resolved (as the engine resolves them);
        None when that leads outside the root.
        """
        parent, name = os.path.split(os.path.normpath(path))
        real = self._real_dirs.get(parent)
        if real is None:
            # Planning changes nothing on disk, so a resolved parent stays valid.
            real = self._real_dirs[parent] = os.path.realpath(parent)
        return _relative_to(os.path.join(real, name), self.real_root)

    def real(self, rel: str) -> str:
        """The absolute path of root-relative ``rel``."""
        return os.path.join(self.real_root, *rel.split("/"))

    def exists(self, rel: str, before: Optional[int] = None) -> bool:
        """Whether ``rel`` exists once the operations before ``before`` apply."""
        key = _key(rel)
        limit = len(self._ops) if before is None else before
        found: Set[int] = set(self._below.get(key, ()))
        for top in (*_parents(key), key):
            found.update(self._at.get(top, ()))
            found.update(self._moved.get(top, ()))
        for index in sorted((i for i in found if i < limit), reverse=True):
            verdict = self._verdict(index, rel, key)
            if verdict is not None:
                return verdict
        return os.path.lexists(self.real(rel))

    def _verdict(self, index: int, rel: str, key: str) -> Optional[bool]:
        """What operation ``index`` says about ``rel``; None: look further back."""
        op = self._ops[index]
        path = _key(op.path)
        if op.kind == "chmod":
            return None
        if op.kind == "delete":
            return False if key == path or _is_below(key, path) else None
        if key == path or _is_below(path, key):
            return True  # placed there, or a parent of something placed
        if _is_below(key, path):
            rest = rel.split("/")[len(path.split("/")) :]
            if op.kind == "write":
                return False  # a file has no children
            if op.kind == "rename" and op.source is not None:
                return self.exists("/".join([op.source, *rest]), index)
            if op.kind == "copy" and op.source is not None:
                return self._copied(op.source, rest, index)
            return None  # mkdir: an existing directory keeps its content
        if op.kind == "rename" and op.source is not None:
            source = _key(op.source)
            if key == source or _is_below(key, source):
                return False  # moved away
        return None

    def _copied(self, source: str, rest: List[str], index: int) -> bool:
        if os.path.isabs(source):
            inner = self.rel(source)
            if inner is None:  # copied from outside the root: look there
                return os.path.lexists(os.path.join(source, *rest))
            source = inner
        else:
            source = posixpath.normpath(source.replace(os.sep, "/"))
        return self.exists("/".join([source, *rest]), index)

    def children(self, rel: str) -> Optional[List[str]]:
        """Names in the planned directory ``rel``; None where this view cannot know."""
        key = _key(rel)
        for top in (*_parents(key), key):
            if any(
                self._ops[i].kind in ("copy", "rename") for i in self._at.get(top, ())
            ):
                return None
        names: Set[str] = set()
        real = self.real(rel)
        if os.path.isdir(real) and not os.path.islink(real):
            names.update(os.listdir(real))
        depth = len(rel.split("/"))
        for index in self._below.get(key, ()):
            names.add(self._ops[index].path.split("/")[depth])
        return sorted(name for name in names if self.exists(f"{rel}/{name}"))


class TransactionalDestination(WheelDestination):
    """An installer destination that plans every file through a transaction.

    It takes the arguments of installer's ``SchemeDictionaryDestination``
    after ``tx`` and writes what that destination writes, but as planned
    operations of ``tx``: nothing under the root changes until the
    transaction commits, and a failure anywhere rolls everything back.

    Args:
        tx: the open transaction every file goes through.
        scheme_dict: ``{scheme: directory}`` for ``purelib``, ``platlib``,
            ``headers``, ``scripts`` and ``data``. Relative directories are
            relative to ``tx.root``, like every fstx path; each one (after
            ``destdir``) must lie inside the root.
        interpreter: the Python that scripts run with (their shebang).
        script_kind: ``"posix"``, ``"win-amd64"``, ``"win-arm64"``,
            ``"win-arm"`` or ``"win-ia32"``: the kind of console-script launcher.
        hash_algorithm: the hash written into ``RECORD``.
        bytecode_optimization_levels: compile ``.py`` files of purelib and
            platlib to ``.pyc`` at these levels (0, 1, 2; -1 is this
            interpreter's). The bytecode is compiled in memory by the running
            Python, written as checked hash-based ``.pyc`` (PEP 552) and
            listed in ``RECORD``.
        destdir: write everything under this directory, as if it were the
            filesystem root at run time (shebangs and ``RECORD`` keep the
            ``scheme_dict`` paths). Relative to ``tx.root`` when relative.
        overwrite_existing: replace a file that already exists (as planned);
            without it such a file raises :class:`fstx.PlanError`.

    Raises:
        PlanError: a scheme directory lies outside the root, the hash
            algorithm is unknown, or an optimization level is invalid.
    """

    def __init__(
        self,
        tx: Transaction,
        scheme_dict: Mapping[str, StrPath],
        interpreter: str,
        script_kind: LauncherKind,
        hash_algorithm: str = "sha256",
        bytecode_optimization_levels: Collection[int] = (),
        destdir: Optional[StrPath] = None,
        overwrite_existing: bool = False,
    ) -> None:
        self.tx = tx
        self.scheme_dict = {name: os.fspath(path) for name, path in scheme_dict.items()}
        self.interpreter = interpreter
        self.script_kind: LauncherKind = script_kind
        self.hash_algorithm = hash_algorithm
        self.bytecode_optimization_levels = tuple(bytecode_optimization_levels)
        self.destdir = None if destdir is None else os.fspath(destdir)
        self.overwrite_existing = overwrite_existing
        if hash_algorithm not in hashlib.algorithms_available:
            raise PlanError(
                "install with",
                hash_algorithm,
                "it is not a hash algorithm this Python provides "
                "(see hashlib.algorithms_available)",
            )
        for level in self.bytecode_optimization_levels:
            if level not in (-1, 0, 1, 2):
                raise PlanError(
                    "compile", level, "optimization levels are -1, 0, 1 and 2"
                )
        self._view = _PlannedView(tx)
        self._dirs = {
            scheme: self._target_dir(scheme)
            for scheme in _SCHEMES
            if scheme in self.scheme_dict
        }
        self._sources: Dict[Tuple[str, str], bytes] = {}

    # -- paths -----------------------------------------------------------------

    def _runtime_dir(self, scheme: str) -> str:
        """Where ``scheme`` lives at run time (without ``destdir``)."""
        return os.path.normpath(os.path.join(self.tx.root, self.scheme_dict[scheme]))

    def _target_dir(self, scheme: str) -> str:
        """Where files of ``scheme`` are written now (with ``destdir``)."""
        target = self._runtime_dir(scheme)
        if self.destdir is not None:
            tail = os.path.splitdrive(target)[1].lstrip("\\/")
            target = os.path.normpath(os.path.join(self.tx.root, self.destdir, tail))
        outside = _relative_to(target, self.tx.root) is None and (
            _relative_to(target, self._view.real_root) is None
        )
        if outside or self._view.rel(os.path.realpath(target)) is None:
            raise PlanError(
                "install into",
                self.scheme_dict[scheme],
                f"the {scheme!r} directory {target!r} is outside the "
                f"transaction's root {self.tx.root!r}",
            )
        return target

    def _locate(self, scheme: str, path: str) -> str:
        base = self._dirs.get(scheme)
        if base is None:
            raise PlanError(
                "install", path, f"the scheme dictionary has no {scheme!r} directory"
            )
        target = os.path.normpath(os.path.join(base, path))
        if not _relative_to(target, base):
            raise PlanError(
                "install", path, f"it leads outside the {scheme!r} directory {base!r}"
            )
        return target

    # -- writing ---------------------------------------------------------------

    def _write(
        self,
        scheme: str,
        path: str,
        stream: BinaryIO,
        mode: Optional[int],
        *,
        check: bool = True,
    ) -> RecordEntry:
        target = self._locate(scheme, path)
        if check and not self.overwrite_existing and self.tx.exists(target):
            raise PlanError(
                "install",
                target,
                "something is already there (another distribution may own "
                "it): uninstall that first, or pass overwrite_existing=True",
            )
        keep = (
            bool(self.bytecode_optimization_levels)
            and scheme in _LIB_SCHEMES
            and path.endswith(".py")
        )
        hasher = hashlib.new(self.hash_algorithm)
        size = 0
        kept: List[bytes] = []
        first = stream.read(_CHUNK)
        second = stream.read(_CHUNK) if first else b""
        pieces: Iterable[bytes] = (first,)
        if second:
            rest = iter(functools.partial(stream.read, _CHUNK), b"")
            pieces = itertools.chain((first, second), rest)

        def counted() -> Iterator[bytes]:
            nonlocal size
            for chunk in pieces:
                hasher.update(chunk)
                size += len(chunk)
                if keep:
                    kept.append(chunk)
                yield chunk

        if not second:
            # Most files of a wheel: the whole content in one read, one write.
            self.tx.write_bytes(target, b"".join(counted()), mode=mode)
        else:
            with self.tx.open(target, "wb", file_mode=mode) as f:
                for chunk in counted():
                    f.write(chunk)
        if keep:
            self._sources[(scheme, path)] = b"".join(kept)
        digest = base64.urlsafe_b64encode(hasher.digest()).decode("ascii").rstrip("=")
        return RecordEntry(path, Hash(self.hash_algorithm, digest), size)

    def write_file(
        self,
        scheme: str,
        path: StrPath,
        stream: BinaryIO,
        is_executable: bool,
    ) -> RecordEntry:
        """Plan file ``path`` of ``scheme`` with the content of ``stream``.

        Scripts of the ``.data/scripts`` directory get their ``#!python``
        shebang pointed at ``interpreter``; executables get mode 0o755.
        """
        path_ = os.fspath(path)
        mode = _EXECUTABLE if is_executable else None
        if scheme == "scripts":
            with fix_shebang(stream, self.interpreter) as fixed:
                return self._write(scheme, path_, fixed, mode)
        return self._write(scheme, path_, stream, mode)

    def write_script(
        self, name: str, module: str, attr: str, section: ScriptSection
    ) -> RecordEntry:
        """Plan the launcher of entry point ``name = module:attr`` (mode 0o755)."""
        script = Script(name, module, attr, section)
        script_name, data = script.generate(self.interpreter, self.script_kind)
        return self._write("scripts", script_name, io.BytesIO(data), _EXECUTABLE)

    def finalize_installation(
        self,
        scheme: str,
        record_file_path: str,
        records: Iterable[Tuple[str, RecordEntry]],
    ) -> None:
        """Plan the bytecode, if asked for, then ``RECORD``, last."""
        entries = list(records)
        entries.extend(self._compile_bytecode(entries))
        self._sources.clear()
        rows = sorted(self._row(scheme, file_scheme, e) for file_scheme, e in entries)
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        content = io.BytesIO(text.getvalue().encode("utf-8"))
        self._write(scheme, record_file_path, content, None)

    def _row(
        self, record_scheme: str, scheme: str, entry: RecordEntry
    ) -> Tuple[str, str, str]:
        path = entry.path.replace(os.sep, "/")
        if scheme != record_scheme:
            here = self._runtime_dir(record_scheme)
            there = self._runtime_dir(scheme)
            try:
                prefix = os.path.relpath(there, here).replace(os.sep, "/")
            except ValueError:  # another drive (Windows): no relative path exists
                prefix = there.replace(os.sep, "/")
            path = posixpath.normpath(posixpath.join(prefix, path))
        digest = "" if entry.hash_ is None else str(entry.hash_)
        size = "" if entry.size is None else str(entry.size)
        return path, digest, size

    def _compile_bytecode(
        self, entries: Sequence[Tuple[str, RecordEntry]]
    ) -> List[Tuple[str, RecordEntry]]:
        tag = sys.implementation.cache_tag
        if not self._sources or tag is None:
            return []
        levels = sorted(
            {
                sys.flags.optimize if level < 0 else level
                for level in self.bytecode_optimization_levels
            }
        )
        flags = _PYC_CHECKED_HASH.to_bytes(4, "little")
        compiled: List[Tuple[str, RecordEntry]] = []
        for scheme, entry in entries:
            source = self._sources.get((scheme, entry.path))
            if source is None:
                continue
            # Tracebacks name the file where it lives at run time.
            dfile = os.path.join(self._runtime_dir(scheme), *entry.path.split("/"))
            head, name = posixpath.split(entry.path)
            header = (
                importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source)
            )
            for level in levels:
                try:
                    code = compile(
                        source, dfile, "exec", dont_inherit=True, optimize=level
                    )
                except (SyntaxError, ValueError) as exc:
                    # As compileall does: a module that does not compile is
                    # installed without bytecode, not refused.
                    _log.warning("not compiling %r: %s", dfile, exc)
                    break
                suffix = f".opt-{level}" if level else ""
                pyc = posixpath.join(
                    head, "__pycache__", f"{name[:-3]}.{tag}{suffix}.pyc"
                )
                data = io.BytesIO(header + marshal.dumps(code))
                # A stale .pyc of the module just planned is replaced, not refused.
                compiled.append(
                    (scheme, self._write(scheme, pyc, data, None, check=False))
                )
        return compiled


# -- uninstall -------------------------------------------------------------------


def _read_record(given: str, dist_info: str) -> List[str]:
    record = os.path.join(dist_info, "RECORD")
    try:
        with open(record, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise PlanError(
            "uninstall",
            given,
            "it has no RECORD file, so which files it installed is unknown",
        ) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PlanError(
            "uninstall", given, f"its RECORD cannot be read: {exc}"
        ) from exc
    # RECORD paths use "/"; a RECORD written on Windows may use "\\".
    return [
        row[0].replace("\\", "/") if os.altsep else row[0]
        for row in rows
        if row and row[0]
    ]


def _cached_bytecode(
    view: _PlannedView, rel: str, listings: Dict[str, List[str]]
) -> List[str]:
    """The ``__pycache__`` files of module ``rel`` (any interpreter, any level)."""
    head, name = posixpath.split(rel)
    cache = posixpath.join(head, "__pycache__") if head else "__pycache__"
    names = listings.get(cache)
    if names is None:
        try:
            names = sorted(os.listdir(view.real(cache)))
        except (FileNotFoundError, NotADirectoryError):
            names = []
        listings[cache] = names
    stem = name[:-3] + "."
    return [f"{cache}/{n}" for n in names if _is_bytecode_of(stem, n)]


def _is_bytecode_of(stem: str, name: str) -> bool:
    """Whether ``name`` is ``<stem><cache tag>[.opt-N].pyc``.

    A cache tag has no dot, so module ``a.py`` never claims the bytecode of a
    file ``a.b.py``.
    """
    if not (name.startswith(stem) and name.endswith(".pyc")):
        return False
    parts = name[len(stem) : -len(".pyc")].split(".")
    if len(parts) == 2 and parts[1].startswith("opt-") and parts[1][4:].isdigit():
        parts.pop()
    return len(parts) == 1 and parts[0] != ""


def uninstall(tx: Transaction, dist_info_dir: StrPath) -> Tuple[str, ...]:
    """Plan the removal of an installed distribution, as its ``RECORD`` lists it.

    Plans, in ``tx``, the deletion of every file that ``RECORD`` lists
    (relative to the ``.dist-info``'s parent, site-packages; scripts listed
    as ``../../../bin/tool`` are fine as long as they stay inside the root),
    of the ``__pycache__`` bytecode of every listed ``.py`` file, of the
    ``.dist-info`` directory itself, and of the directories this leaves empty
    as planned (never site-packages, its parents or the root). Listed files
    that are already gone are skipped; a listed directory is never deleted
    as a whole, only when it ends up empty.

    Args:
        tx: the transaction to plan in.
        dist_info_dir: the ``name-version.dist-info`` directory, absolute
            inside the root or relative to it.

    Returns:
        The root-relative paths planned for deletion, in order.

    Raises:
        PlanError: the directory is not an installed ``.dist-info`` with a
            ``RECORD``, or ``RECORD`` lists a path outside the root. Nothing
            was planned then.
    """
    given = os.fspath(dist_info_dir)
    view = _PlannedView(tx)
    dist_info = os.path.normpath(os.path.join(tx.root, given))
    dist_rel = view.rel(dist_info)
    if not dist_rel:
        raise PlanError("uninstall", given, f"it is outside the root {tx.root!r}")
    if not dist_rel.endswith(".dist-info"):
        raise PlanError("uninstall", given, "it is not a .dist-info directory")
    if not os.path.isdir(view.real(dist_rel)):
        raise PlanError("uninstall", given, f"there is no directory {dist_info!r}")
    site_rel = posixpath.dirname(dist_rel)
    site = view.real(site_rel)
    listed: Dict[str, None] = {}
    refused: List[str] = []
    for entry in _read_record(given, view.real(dist_rel)):
        rel = view.rel(os.path.join(site, entry))
        if not rel or _STAGING in rel.split("/"):
            refused.append(entry)
        else:
            listed[rel] = None
    if refused:
        raise PlanError(
            "uninstall",
            given,
            f"its RECORD lists paths that are not inside the root {tx.root!r} "
            f"({', '.join(map(repr, refused))}); nothing was planned",
        )

    planned: List[str] = []

    def delete(rel: str) -> None:
        tx.delete(rel, missing_ok=True)
        planned.append(rel)

    for rel in listed:
        real = view.real(rel)
        if os.path.isdir(real) and not os.path.islink(real):
            _log.warning(
                "RECORD of %r lists the directory %r: it is removed only if "
                "the uninstall leaves it empty",
                given,
                rel,
            )
            continue
        delete(rel)
    listings: Dict[str, List[str]] = {}
    for rel in listed:
        if rel.endswith(".py"):
            for pyc in _cached_bytecode(view, rel, listings):
                delete(pyc)
    delete(dist_rel)

    kept = {"", site_rel, *_parents(site_rel)}
    emptied: Set[str] = set()
    for rel in planned:
        parent = posixpath.dirname(rel)
        while parent not in kept and parent not in emptied:
            emptied.add(parent)
            parent = posixpath.dirname(parent)
    for rel in sorted(emptied, key=lambda r: r.count("/"), reverse=True):
        view.sync()
        real = view.real(rel)
        if not os.path.isdir(real) or os.path.islink(real):
            continue  # only real directories; a planned one is not ours to remove
        if view.exists(rel) and view.children(rel) == []:
            delete(rel)
    return tuple(planned)


# -- a small installer -----------------------------------------------------------


def _venv_version(base: str) -> Dict[str, str]:
    """The Python version a venv at ``base`` was made with, as sysconfig variables."""
    try:
        with open(os.path.join(base, "pyvenv.cfg"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() in ("version_info", "version"):
            parts = value.strip().split(".")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                return {
                    "py_version_short": f"{parts[0]}.{parts[1]}",
                    "py_version_nodot": f"{parts[0]}{parts[1]}",
                }
    return {}


def _prefix_scheme(prefix: str) -> Dict[str, str]:
    """Installer's scheme for ``prefix``, laid out as a ``--prefix`` install is."""
    config = {
        "base": prefix,
        "platbase": prefix,
        "installed_base": prefix,
        "installed_platbase": prefix,
        **_venv_version(prefix),
    }
    # sysconfig's own names for a prefix layout: lib/pythonX.Y/site-packages
    # and bin on POSIX, Lib/site-packages and Scripts on Windows.
    name = "nt" if os.name == "nt" else "posix_prefix"
    paths = sysconfig.get_paths(name, vars=config)
    return {
        "purelib": paths["purelib"],
        "platlib": paths["platlib"],
        "headers": paths["include"],
        "scripts": paths["scripts"],
        "data": paths["data"],
    }


def _prefix_interpreter(prefix: str, scheme: Mapping[str, str]) -> str:
    """The venv's own Python if ``prefix`` is a venv, else the running one."""
    if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")):
        exe = sysconfig.get_config_var("EXE") or ""
        candidate = os.path.join(scheme["scripts"], "python" + exe)
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


def _installed(scheme: Mapping[str, str], name: str) -> List[str]:
    """The ``.dist-info`` directories of distribution ``name`` in site-packages."""
    found: List[str] = []
    for lib in _LIB_SCHEMES:
        try:
            entries = sorted(os.listdir(scheme[lib]))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.endswith(".dist-info"):
                continue
            # name-version.dist-info, the name escaped as PEP 427 says (older
            # tools left "-" in it: the version is what follows the last "-").
            project = entry[: -len(".dist-info")].rsplit("-", 1)[0]
            path = os.path.join(scheme[lib], entry)
            if _canonical_name(project) == name and path not in found:
                found.append(path)
    return found


@contextlib.contextmanager
def _invalid_wheel(wheel: str) -> Iterator[None]:
    """Report what installer finds wrong with a wheel as a PlanError naming it."""
    try:
        yield
    except PlanError:
        raise
    except (InstallerError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise PlanError("install", wheel, f"it is not a valid wheel: {exc}") from exc


def _install_one(
    tx: Transaction,
    wheel: str,
    scheme: Mapping[str, str],
    seen: Dict[str, str],
    *,
    upgrade: bool,
    interpreter: str,
    script_kind: LauncherKind,
) -> None:
    with contextlib.ExitStack() as stack:
        with _invalid_wheel(wheel):
            source = stack.enter_context(WheelFile.open(Path(wheel)))
            source.validate_record()
        name = _canonical_name(source.distribution)
        if name in seen:
            raise PlanError(
                "install",
                wheel,
                f"{seen[name]!r} is the same distribution; give one wheel each",
            )
        seen[name] = wheel
        installed = _installed(scheme, name)
        if installed and not upgrade:
            where = ", ".join(map(repr, installed))
            raise PlanError(
                "install",
                wheel,
                f"{source.distribution} is already installed ({where}); "
                "upgrade to replace it",
            )
        for dist_info in installed:
            uninstall(tx, dist_info)
        schemes = dict(scheme)
        # Headers go to a directory of their own per distribution, as pip does.
        schemes["headers"] = os.path.join(scheme["headers"], source.distribution)
        destination = TransactionalDestination(tx, schemes, interpreter, script_kind)
        with _invalid_wheel(wheel):
            installer.install(source, destination, {"INSTALLER": b"fstx"})


def install_wheels(
    prefix: StrPath,
    wheels: Iterable[StrPath],
    *,
    upgrade: bool = False,
    durability: str = "full",
    interpreter: Optional[str] = None,
    script_kind: Optional[LauncherKind] = None,
) -> CommitReport:
    """Install wheels into ``prefix`` as one transaction: all of them, or nothing.

    The layout is that of ``pip install --prefix`` for the running Python
    (``lib/pythonX.Y/site-packages`` and ``bin``; ``Lib/site-packages`` and
    ``Scripts`` on Windows); in a venv, the venv's Python version. Each
    wheel's ``RECORD`` is checked (names, hashes, sizes) before anything is
    planned. Compatibility tags are not checked.

    Args:
        prefix: the directory to install into; created if missing.
        wheels: the ``.whl`` files, one per distribution.
        upgrade: replace an installed version of a distribution (uninstalled
            in the same transaction). Without it an installed distribution
            is an error.
        durability: ``"full"`` or ``"none"``, as :func:`fstx.transaction`.
        interpreter: the Python for script shebangs; by default the venv's
            own Python when ``prefix`` is a venv, else the running one.
        script_kind: the launcher kind; by default the one for this machine.

    Returns:
        The commit's report.

    Raises:
        PlanError: a wheel is missing or invalid, or its distribution is
            installed already and ``upgrade`` is false; nothing changed.
        CommitError: the commit failed and was rolled back.
    """
    root = os.path.abspath(os.fspath(prefix))
    paths = [os.fspath(wheel) for wheel in wheels]
    for path in paths:
        if not os.path.isfile(path):
            raise PlanError("install", path, "there is no wheel file there")
    if os.path.lexists(root) and not os.path.isdir(root):
        raise PlanError("install into", root, "it is not a directory")
    scheme = _prefix_scheme(root)
    if interpreter is None:
        interpreter = _prefix_interpreter(root, scheme)
    kind: LauncherKind = script_kind if script_kind is not None else get_launcher_kind()
    os.makedirs(root, exist_ok=True)
    with fstx.transaction(root, durability=durability) as tx:
        seen: Dict[str, str] = {}
        for path in paths:
            _install_one(
                tx,
                path,
                scheme,
                seen,
                upgrade=upgrade,
                interpreter=interpreter,
                script_kind=kind,
            )
        return tx.commit()
