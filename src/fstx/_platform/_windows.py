r"""Windows primitives: names are resolved as checked full paths, not descriptors.

Windows has no directory descriptors, so a :class:`Dir` carries ``fd == -1``
and the full path; :func:`open_dir` checks each component as it is opened and
refuses a symlink or junction, and single-file calls open the name without
following a reparse point where Win32 allows it. Paths reach Win32 in the
``\\?\`` form, so long paths work and trailing dots or spaces are kept.

Everything that decides something (which flags, what to fall back to, when to
clear and restore a read-only attribute, how to read a Restart Manager list)
takes an API object (:class:`WinApi`), so that tests drive it on any platform
with fakes raising the real ``winerror`` values. The real API loads its DLLs
on first use, never at import.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import ntpath
import os
import stat
import sys
from typing import Any, List, Optional, Protocol, Sequence, Tuple

from fstx._platform._types import Dir

_log = logging.getLogger("fstx")

# Win32 error codes (winerror.h) met below.
ERROR_INVALID_FUNCTION = 1
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_NOT_SUPPORTED = 50
ERROR_INVALID_PARAMETER = 87
ERROR_MORE_DATA = 234

# MoveFileExW flags (MoveFileEx docs).
LINK_BACKUPS = False
"""Windows cannot rename over a file another process holds, so the engine moves
the old file into staging first instead of hard-linking a backup beside it."""

EXCHANGE_REPLACES = False
"""No atomic swap of two names: a replaced file is moved away, then the new one in."""

MOVEFILE_REPLACE_EXISTING = 0x1
MOVEFILE_DELAY_UNTIL_REBOOT = 0x4
MOVEFILE_WRITE_THROUGH = 0x8

# File attributes; st_file_attributes carries the same bits.
FILE_ATTRIBUTE_READONLY = 0x1
FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_NORMAL = 0x80
FILE_ATTRIBUTE_REPARSE_POINT = 0x400

# Reparse tags (ntifs.h). IsReparseTagNameSurrogate(): the tag stands for
# another name (symlink, junction); other tags (cloud files, dedup) do not.
IO_REPARSE_TAG_MOUNT_POINT = 0xA0000003
IO_REPARSE_TAG_SYMLINK = 0xA000000C
_NAME_SURROGATE_BIT = 0x20000000

# CreateFileW arguments.
DELETE = 0x00010000
FILE_READ_ATTRIBUTES = 0x0080
FILE_WRITE_ATTRIBUTES = 0x0100
GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
FILE_SHARE_ALL = 0x1 | 0x2 | 0x4  # READ | WRITE | DELETE: we never block others
CREATE_NEW = 1
CREATE_ALWAYS = 2
OPEN_EXISTING = 3
OPEN_ALWAYS = 4
TRUNCATE_EXISTING = 5
FILE_FLAG_BACKUP_SEMANTICS = 0x02000000  # needed to open a directory
FILE_FLAG_OPEN_REPARSE_POINT = 0x00200000  # open a link itself (O_NOFOLLOW)

# SetFileInformationByHandle(FileDispositionInfoEx): POSIX semantics from
# Windows 10 1607, IGNORE_READONLY_ATTRIBUTE from 1809; NTFS only in practice
# (semantics.md §1.6; rust-lang/rust#134679, libuv/libuv#3839).
FILE_DISPOSITION_FLAG_DELETE = 0x1
FILE_DISPOSITION_FLAG_POSIX_SEMANTICS = 0x2
FILE_DISPOSITION_FLAG_IGNORE_READONLY_ATTRIBUTE = 0x10
POSIX_DELETE = (
    FILE_DISPOSITION_FLAG_DELETE
    | FILE_DISPOSITION_FLAG_POSIX_SEMANTICS
    | FILE_DISPOSITION_FLAG_IGNORE_READONLY_ATTRIBUTE
)
_FILE_ATTRIBUTE_TAG_INFO = 9  # FILE_INFO_BY_HANDLE_CLASS values
_FILE_DISPOSITION_INFO_EX = 21

# What a file system or Windows version without POSIX delete answers (FAT,
# exFAT, network redirectors, builds before 1809): fall back to DeleteFileW,
# as Rust, Zig and libuv do (ziglang/zig#16499, libuv/libuv#4318).
_POSIX_DELETE_UNSUPPORTED = frozenset(
    {ERROR_INVALID_FUNCTION, ERROR_NOT_SUPPORTED, ERROR_INVALID_PARAMETER}
)
# Opening for DELETE can fail where DeleteFileW itself may still work or give
# the error users know (a delete-pending name, a directory symlink).
_OPEN_FOR_DELETE_FALLBACK = _POSIX_DELETE_UNSUPPORTED | {ERROR_ACCESS_DENIED}

# FlushFileBuffers on a directory handle: refused by some file systems and for
# users without write access to the directory; NTFS journals its metadata, so
# the flush is an extra, not a requirement (semantics.md §2.4).
_DIR_FLUSH_UNSUPPORTED = frozenset(
    {
        ERROR_INVALID_FUNCTION,
        ERROR_ACCESS_DENIED,
        ERROR_INVALID_HANDLE,
        ERROR_NOT_SUPPORTED,
        ERROR_INVALID_PARAMETER,
    }
)

# 100 ns intervals between 1601-01-01 (FILETIME) and 1970-01-01 (Unix).
_FILETIME_EPOCH = 116444736000000000

_RM_MAX_APP_NAME = 255
_RM_MAX_SVC_NAME = 63
_RM_SESSION_KEY_LEN = 32
_RM_ATTEMPTS = 5  # RmGetList races with processes starting; then give up
_RM_SLACK = 4


class _FileTime(ctypes.Structure):
    _fields_ = (("dwLowDateTime", ctypes.c_uint32), ("dwHighDateTime", ctypes.c_uint32))


class _RmUniqueProcess(ctypes.Structure):
    _fields_ = (("dwProcessId", ctypes.c_uint32), ("ProcessStartTime", _FileTime))


class RmProcessInfo(ctypes.Structure):
    """``RM_PROCESS_INFO`` (restartmanager.h); 668 bytes where ``wchar_t`` is 2."""

    _fields_ = (
        ("Process", _RmUniqueProcess),
        ("strAppName", ctypes.c_wchar * (_RM_MAX_APP_NAME + 1)),
        ("strServiceShortName", ctypes.c_wchar * (_RM_MAX_SVC_NAME + 1)),
        ("ApplicationType", ctypes.c_int),
        ("AppStatus", ctypes.c_uint32),
        ("TSSessionId", ctypes.c_uint32),
        ("bRestartable", ctypes.c_int),
    )


class WinApi(Protocol):
    """The Win32 calls made here; each raises an ``OSError`` with ``winerror``."""

    def lstat(self, path: str) -> os.stat_result:
        """``os.lstat``."""

    def unlink(self, path: str) -> None:
        """``os.unlink``: ``DeleteFileW``; ``RemoveDirectoryW`` for a directory link."""

    def move_file(self, src: str, dst: Optional[str], flags: int) -> None:
        """``MoveFileExW``."""

    def get_attributes(self, path: str) -> int:
        """``GetFileAttributesW`` (does not follow a link)."""

    def set_attributes(self, path: str, attributes: int) -> None:
        """``SetFileAttributesW`` (does not follow a link)."""

    def open_handle(self, path: str, access: int, disposition: int, flags: int) -> int:
        """``CreateFileW`` sharing read, write and delete; returns the handle."""

    def close_handle(self, handle: int) -> None:
        """``CloseHandle``."""

    def attribute_tag(self, handle: int) -> Tuple[int, int]:
        """``GetFileInformationByHandleEx(FileAttributeTagInfo)``: attributes, tag."""

    def set_disposition(self, handle: int, flags: int) -> None:
        """``SetFileInformationByHandle(FileDispositionInfoEx)``."""

    def flush(self, handle: int) -> None:
        """``FlushFileBuffers``."""

    def set_times(self, handle: int, atime: int, mtime: int) -> None:
        """``SetFileTime`` with access and write times as FILETIME integers."""

    def open_osfhandle(self, handle: int, flags: int) -> int:
        """``msvcrt.open_osfhandle``: a C runtime descriptor that owns ``handle``."""

    def truncate(self, fd: int) -> None:
        """``os.ftruncate(fd, 0)``."""

    def rm_start(self) -> int:
        """``RmStartSession``; returns the session handle."""

    def rm_register(self, session: int, paths: Sequence[str]) -> None:
        """``RmRegisterResources`` for files."""

    def rm_get_list(
        self, session: int, capacity: int
    ) -> Tuple[int, int, Sequence[RmProcessInfo]]:
        """``RmGetList``: its return code, the entries needed, the entries got."""

    def rm_end(self, session: int) -> None:
        """``RmEndSession``."""


# --- the real API ----------------------------------------------------------------

if sys.platform == "win32":
    import msvcrt

    def _load(name: str) -> Any:
        # A private WinDLL, so the argtypes set here touch no one else's.
        return ctypes.WinDLL(name, use_last_error=True)

    def _win_error(
        code: int, filename: Optional[str] = None, filename2: Optional[str] = None
    ) -> OSError:
        # ctypes.WinError(code) with the paths: CPython derives errno and the
        # subclass (PermissionError, FileExistsError...) from winerror.
        return OSError(
            None, ctypes.FormatError(code).strip(), filename, code, filename2
        )

    def _get_last_error() -> int:
        return ctypes.get_last_error()

    def _open_osfhandle(handle: int, flags: int) -> int:
        return msvcrt.open_osfhandle(handle, flags)

else:

    def _load(name: str) -> Any:
        raise OSError(errno.ENOSYS, f"{name}.dll exists only on Windows")

    def _win_error(
        code: int, filename: Optional[str] = None, filename2: Optional[str] = None
    ) -> OSError:
        return OSError(errno.ENOSYS, f"Windows error {code}", filename, None, filename2)

    def _get_last_error() -> int:
        return 0

    def _open_osfhandle(handle: int, flags: int) -> int:
        del handle, flags
        raise OSError(errno.ENOSYS, "msvcrt exists only on Windows")


def _last_error(
    filename: Optional[str] = None, filename2: Optional[str] = None
) -> OSError:
    return _win_error(_get_last_error(), filename, filename2)


_HANDLE = ctypes.c_void_p
_DWORD = ctypes.c_uint32
_BOOL = ctypes.c_int
_WSTR = ctypes.c_wchar_p
_INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value
_INVALID_FILE_ATTRIBUTES = 0xFFFFFFFF


@functools.cache
def _kernel32() -> Any:
    dll = _load("kernel32")
    signatures: Sequence[Tuple[str, Any, Tuple[Any, ...]]] = (
        ("MoveFileExW", _BOOL, (_WSTR, _WSTR, _DWORD)),
        ("GetFileAttributesW", _DWORD, (_WSTR,)),
        ("SetFileAttributesW", _BOOL, (_WSTR, _DWORD)),
        (
            "CreateFileW",
            _HANDLE,
            (_WSTR, _DWORD, _DWORD, _HANDLE, _DWORD, _DWORD, _HANDLE),
        ),
        ("CloseHandle", _BOOL, (_HANDLE,)),
        (
            "GetFileInformationByHandleEx",
            _BOOL,
            (_HANDLE, ctypes.c_int, _HANDLE, _DWORD),
        ),
        ("SetFileInformationByHandle", _BOOL, (_HANDLE, ctypes.c_int, _HANDLE, _DWORD)),
        ("FlushFileBuffers", _BOOL, (_HANDLE,)),
        ("SetFileTime", _BOOL, (_HANDLE, _HANDLE, _HANDLE, _HANDLE)),
    )
    for name, restype, argtypes in signatures:
        func = getattr(dll, name)
        func.restype = restype
        func.argtypes = argtypes
    return dll


@functools.cache
def _rstrtmgr() -> Any:
    dll = _load("rstrtmgr")
    p_dword = ctypes.POINTER(_DWORD)
    signatures: Sequence[Tuple[str, Tuple[Any, ...]]] = (
        ("RmStartSession", (p_dword, _DWORD, _WSTR)),
        (
            "RmRegisterResources",
            (_DWORD, _DWORD, ctypes.POINTER(_WSTR), _DWORD, _HANDLE, _DWORD, _HANDLE),
        ),
        (
            "RmGetList",
            (_DWORD, p_dword, p_dword, ctypes.POINTER(RmProcessInfo), p_dword),
        ),
        ("RmEndSession", (_DWORD,)),
    )
    for name, argtypes in signatures:
        func = getattr(dll, name)
        func.restype = _DWORD  # Restart Manager returns error codes, not BOOL
        func.argtypes = argtypes
    return dll


def _check(ok: object, filename: Optional[str] = None) -> None:
    if not ok:
        raise _last_error(filename)


def _rm_check(code: int) -> None:
    if code:
        raise _win_error(code)


class _Win32:
    """The real :class:`WinApi`, over kernel32, rstrtmgr and msvcrt."""

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def move_file(self, src: str, dst: Optional[str], flags: int) -> None:
        if not _kernel32().MoveFileExW(src, dst, flags):
            raise _last_error(src, dst)

    def get_attributes(self, path: str) -> int:
        attributes = int(_kernel32().GetFileAttributesW(path))
        if attributes == _INVALID_FILE_ATTRIBUTES:
            raise _last_error(path)
        return attributes

    def set_attributes(self, path: str, attributes: int) -> None:
        _check(_kernel32().SetFileAttributesW(path, attributes), path)

    def open_handle(self, path: str, access: int, disposition: int, flags: int) -> int:
        handle = _kernel32().CreateFileW(
            path, access, FILE_SHARE_ALL, None, disposition, flags, None
        )
        if handle is None or handle == _INVALID_HANDLE_VALUE:
            raise _last_error(path)
        return int(handle)

    def close_handle(self, handle: int) -> None:
        _check(_kernel32().CloseHandle(handle))

    def attribute_tag(self, handle: int) -> Tuple[int, int]:
        info = (_DWORD * 2)()
        _check(
            _kernel32().GetFileInformationByHandleEx(
                handle,
                _FILE_ATTRIBUTE_TAG_INFO,
                ctypes.byref(info),
                ctypes.sizeof(info),
            )
        )
        return int(info[0]), int(info[1])

    def set_disposition(self, handle: int, flags: int) -> None:
        info = _DWORD(flags)
        _check(
            _kernel32().SetFileInformationByHandle(
                handle,
                _FILE_DISPOSITION_INFO_EX,
                ctypes.byref(info),
                ctypes.sizeof(info),
            )
        )

    def flush(self, handle: int) -> None:
        _check(_kernel32().FlushFileBuffers(handle))

    def set_times(self, handle: int, atime: int, mtime: int) -> None:
        access, write = ctypes.c_uint64(atime), ctypes.c_uint64(mtime)
        _check(
            _kernel32().SetFileTime(
                handle, None, ctypes.byref(access), ctypes.byref(write)
            )
        )

    def open_osfhandle(self, handle: int, flags: int) -> int:
        return _open_osfhandle(handle, flags)

    def truncate(self, fd: int) -> None:
        os.ftruncate(fd, 0)

    def rm_start(self) -> int:
        session = _DWORD(0)
        key = ctypes.create_unicode_buffer(_RM_SESSION_KEY_LEN + 1)
        _rm_check(_rstrtmgr().RmStartSession(ctypes.byref(session), 0, key))
        return int(session.value)

    def rm_register(self, session: int, paths: Sequence[str]) -> None:
        names = (_WSTR * len(paths))(*paths)
        _rm_check(
            _rstrtmgr().RmRegisterResources(
                session, len(paths), names, 0, None, 0, None
            )
        )

    def rm_get_list(
        self, session: int, capacity: int
    ) -> Tuple[int, int, Sequence[RmProcessInfo]]:
        needed, count, reasons = _DWORD(0), _DWORD(capacity), _DWORD(0)
        array = (RmProcessInfo * capacity)() if capacity else None
        code = int(
            _rstrtmgr().RmGetList(
                session,
                ctypes.byref(needed),
                ctypes.byref(count),
                array,
                ctypes.byref(reasons),
            )
        )
        got = list(array[: count.value]) if code == 0 and array is not None else []
        return code, int(needed.value), got

    def rm_end(self, session: int) -> None:
        _rm_check(_rstrtmgr().RmEndSession(session))


@functools.cache
def _api() -> WinApi:
    return _Win32()


# --- paths -----------------------------------------------------------------------


def _extended(path: str) -> str:
    r"""``path`` in the ``\\?\`` form: no MAX_PATH limit, no name rewriting.

    Only an absolute path can take the prefix; others come back normalized.
    """
    if path.startswith(("\\\\?\\", "\\\\.\\")):
        return path
    path = ntpath.normpath(path)
    drive, rest = ntpath.splitdrive(path)
    if not drive or not rest.startswith("\\"):  # relative, or "C:x"
        return path
    if drive.startswith("\\\\"):  # \\server\share\...
        return "\\\\?\\UNC\\" + path[2:]
    return "\\\\?\\" + path


def _join(d: Dir, name: str) -> str:
    """The extended path of ``name`` in ``d``; ``name`` must be one plain component.

    Without descriptors a separator, ``..`` or a drive/stream colon in a name
    would resolve outside ``d``, so they are refused.
    """
    if not name or name in {".", ".."} or any(c in name for c in "\\/:\0"):
        raise OSError(errno.EINVAL, "not a single file name", name)
    return _extended(ntpath.join(d.path, name))


def _winerror(exc: OSError) -> Optional[int]:
    return getattr(exc, "winerror", None)


def _is_name_surrogate(attributes: int, tag: int) -> bool:
    """Whether a reparse point stands for another name (symlink, junction).

    An unknown tag (0) counts as one: refusing is the safe mistake.
    """
    if not attributes & FILE_ATTRIBUTE_REPARSE_POINT:
        return False
    return tag == 0 or bool(tag & _NAME_SURROGATE_BIT)


def _stat_is_link(st: os.stat_result) -> bool:
    if stat.S_ISLNK(st.st_mode):
        return True
    attributes: int = getattr(st, "st_file_attributes", 0)
    tag: int = getattr(st, "st_reparse_tag", 0)
    return _is_name_surrogate(attributes, tag)


# --- directories -----------------------------------------------------------------


def open_root(path: str) -> Dir:
    """Open the transaction root, resolving links once (the root is the user's choice).

    The resolved path is kept, so a link swapped into the root's own path
    later cannot redirect the names resolved under it.
    """
    full = os.path.realpath(path)
    st = os.stat(_extended(full))
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    return Dir(-1, full)


def _open_dir(api: WinApi, parent: Dir, name: str) -> Dir:
    path = _join(parent, name)
    st = api.lstat(path)
    if _stat_is_link(st):
        raise OSError(errno.ELOOP, "refusing to follow a symlink or junction", path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    return Dir(-1, ntpath.join(parent.path, name))


def open_dir(parent: Dir, name: str) -> Dir:
    """Open a subdirectory, refusing a symlink or junction (``ELOOP``).

    The check is made when the directory is opened; Windows offers no
    descriptor to hold on to, so a component swapped afterwards is not seen.
    """
    return _open_dir(_api(), parent, name)


def mount_id(d: Dir) -> int:
    """Windows has no bind mounts to tell apart: the volume (``st_dev``) decides."""
    del d
    return 0


def close_dir(d: Dir) -> None:
    """Nothing to close: a Windows :class:`Dir` holds no handle."""
    del d


def same_dir(a: Dir, b: Dir) -> bool:
    """Whether two handles refer to one directory (volume serial and file index)."""
    sa, sb = os.stat(_extended(a.path)), os.stat(_extended(b.path))
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def stat_dir(d: Dir) -> os.stat_result:
    """``stat`` of an open directory."""
    return os.stat(_extended(d.path))


def lstat(d: Dir, name: str) -> os.stat_result:
    """``lstat`` of ``name`` in ``d``."""
    return os.lstat(_join(d, name))


def listdir(d: Dir) -> List[str]:
    """Names in ``d``."""
    return os.listdir(_extended(d.path))


def mkdir(d: Dir, name: str, mode: int) -> None:
    """Create directory ``name`` in ``d`` (Windows ignores ``mode``)."""
    os.mkdir(_join(d, name), mode)


def rmdir(d: Dir, name: str) -> None:
    """Remove the empty directory ``name`` from ``d``."""
    os.rmdir(_join(d, name))


# --- unlink ----------------------------------------------------------------------


def _unlink(api: WinApi, path: str) -> None:
    """Delete with POSIX semantics, else ``DeleteFileW``.

    POSIX semantics free the name at once even while a scanner holds the
    file with FILE_SHARE_DELETE, and ignore the read-only attribute without
    changing it (rust-lang/rust#134679). The handle is opened without
    following a link, so a link is deleted and never its target.
    """
    try:
        handle = api.open_handle(
            path,
            DELETE | FILE_READ_ATTRIBUTES,
            OPEN_EXISTING,
            FILE_FLAG_OPEN_REPARSE_POINT | FILE_FLAG_BACKUP_SEMANTICS,
        )
    except OSError as exc:
        if _winerror(exc) not in _OPEN_FOR_DELETE_FALLBACK:
            raise  # missing, or in use by a holder that does not share delete
        _log.debug("cannot open %r for delete (%s); using DeleteFileW", path, exc)
        _legacy_unlink(api, path)
        return
    try:
        attributes, _tag = api.attribute_tag(handle)
        if attributes & FILE_ATTRIBUTE_DIRECTORY and not (
            attributes & FILE_ATTRIBUTE_REPARSE_POINT
        ):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        try:
            api.set_disposition(handle, POSIX_DELETE)
        except OSError as exc:
            if _winerror(exc) not in _POSIX_DELETE_UNSUPPORTED:
                raise  # e.g. 5 for a running image: DeleteFileW would say the same
            _log.debug("no POSIX delete for %r (%s); using DeleteFileW", path, exc)
        else:
            return
    finally:
        api.close_handle(handle)
    _legacy_unlink(api, path)


def _legacy_unlink(api: WinApi, path: str) -> None:
    """``os.unlink``; a read-only attribute in the way is cleared, restored on failure.

    Like Cargo, only when the delete was refused (5) and the attribute is set
    (rust-lang/cargo@af373f76 ``remove_with_permission_check``). Not for a file
    with several links: they share the attribute, and the others would keep
    it cleared (the engine restores attributes on rollback itself).
    """
    try:
        api.unlink(path)
    except OSError as exc:
        if _winerror(exc) != ERROR_ACCESS_DENIED:
            raise
        first = exc
    else:
        return
    try:
        st = api.lstat(path)
    except OSError:
        raise first from None
    attributes: int = getattr(st, "st_file_attributes", 0)
    if not attributes & FILE_ATTRIBUTE_READONLY or st.st_nlink > 1:
        raise first
    api.set_attributes(path, _with_readonly(attributes, on=False))
    try:
        api.unlink(path)
    except OSError:
        try:
            api.set_attributes(path, attributes)
        except OSError as restore:
            _log.warning(
                "could not restore the read-only attribute of %r: %s", path, restore
            )
        raise


def unlink(d: Dir, name: str) -> None:
    """Remove the file or link ``name`` from ``d`` (never a link's target)."""
    _unlink(_api(), _join(d, name))


# --- rename ----------------------------------------------------------------------


def _rename(api: WinApi, src: str, dst: str, *, replace: bool) -> None:
    # WRITE_THROUGH: return only once a move done as copy + delete is on disk;
    # a same-volume rename is one journaled metadata change either way.
    flags = MOVEFILE_WRITE_THROUGH | (MOVEFILE_REPLACE_EXISTING if replace else 0)
    api.move_file(src, dst, flags)


def rename(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Rename, replacing a file or link at the destination (``MoveFileExW``).

    A read-only destination refuses (5); the engine clears and restores the
    attribute with :func:`clear_readonly` and :func:`set_readonly`.
    """
    _rename(_api(), _join(sd, sn), _join(dd, dn), replace=True)


def rename_noreplace(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Rename, failing with ``FileExistsError`` (183) if the destination exists."""
    _rename(_api(), _join(sd, sn), _join(dd, dn), replace=False)


def exchange(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Windows has no atomic swap of two names (semantics.md §1.8).

    Raises:
        OSError: always, with ``ENOSYS``; the engine swaps in two renames.
    """
    del dd, dn
    raise OSError(
        errno.ENOSYS, "atomic exchange is not available", ntpath.join(sd.path, sn)
    )


# --- links -----------------------------------------------------------------------


def link(sd: Dir, sn: str, dd: Dir, dn: str) -> None:
    """Create hard link ``dn`` to ``sn`` (``CreateHardLinkW`` links a link itself)."""
    os.link(_join(sd, sn), _join(dd, dn))


def link_in(src: str, d: Dir, name: str, follow: bool) -> None:
    """Hard-link ``name`` in ``d`` to the file at path ``src`` (``CreateHardLinkW``).

    ``follow``: link what a symlink at ``src`` points to, not the symlink.
    """
    if follow:
        src = os.path.realpath(src)
    os.link(src, _join(d, name))


def symlink(target: str, d: Dir, name: str) -> None:
    """Create symlink ``name`` pointing at ``target``.

    Windows needs to know whether the target is a directory; it is looked up
    relative to ``d``, and a dangling target makes a file link. Creating a
    link needs Developer Mode or the privilege (else winerror 1314).
    """
    is_dir = os.path.isdir(_extended(ntpath.join(d.path, target)))
    os.symlink(target, _join(d, name), target_is_directory=is_dir)


def readlink(d: Dir, name: str) -> str:
    """Target of link ``name``."""
    return os.readlink(_join(d, name))


# --- files -----------------------------------------------------------------------


def _create_args(flags: int, mode: int) -> Tuple[int, int, int, bool]:
    """``CreateFileW`` access, disposition, attributes, and whether to truncate.

    Truncation is left until the handle is known not to be a link (with
    ``FILE_FLAG_OPEN_REPARSE_POINT``, ``CREATE_ALWAYS`` would act on the link
    itself). As the C runtime's ``_wsopen`` does, a new file without the write
    bit in ``mode`` gets the read-only attribute.
    """
    accmode = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
    access = {
        os.O_WRONLY: GENERIC_WRITE,
        os.O_RDWR: GENERIC_READ | GENERIC_WRITE,
    }.get(accmode, GENERIC_READ)
    create = bool(flags & os.O_CREAT)
    if create and flags & os.O_EXCL:
        disposition = CREATE_NEW
    elif create:
        disposition = OPEN_ALWAYS
    else:
        disposition = OPEN_EXISTING
    truncate = bool(flags & os.O_TRUNC) and disposition != CREATE_NEW
    readonly = create and not mode & stat.S_IWRITE
    attributes = FILE_ATTRIBUTE_READONLY if readonly else FILE_ATTRIBUTE_NORMAL
    return access, disposition, attributes, truncate


def _refuse_link(
    api: WinApi, handle: int, path: str, reopen: Tuple[int, int, int]
) -> int:
    """``handle`` if it is no reparse point; closed and ``ELOOP`` if it is a link.

    Another reparse point (a cloud file) is opened again, following it, so
    that its content is recalled.
    """
    try:
        found, tag = api.attribute_tag(handle)
    except BaseException:
        api.close_handle(handle)
        raise
    if not found & FILE_ATTRIBUTE_REPARSE_POINT:
        return handle
    api.close_handle(handle)
    if _is_name_surrogate(found, tag):
        raise OSError(errno.ELOOP, "refusing to follow a symlink", path)
    return api.open_handle(path, *reopen)


def _open_file(api: WinApi, path: str, flags: int, mode: int) -> int:
    """Open without following a link, sharing delete, as a C runtime descriptor.

    Sharing delete keeps our own open files from blocking renames (builtin
    ``open()`` does not share it, semantics.md §1.3). A link is refused with
    ``ELOOP``, like ``O_NOFOLLOW``.
    """
    access, disposition, attributes, truncate = _create_args(flags, mode)
    handle = api.open_handle(
        path, access, disposition, attributes | FILE_FLAG_OPEN_REPARSE_POINT
    )
    handle = _refuse_link(api, handle, path, (access, disposition, attributes))
    text = getattr(os, "O_TEXT", 0)  # Windows only
    try:
        fd = api.open_osfhandle(handle, flags & (os.O_APPEND | text))
    except BaseException:
        api.close_handle(handle)
        raise
    if truncate:
        try:
            api.truncate(fd)
        except BaseException:
            os.close(fd)
            raise
    return fd


def open_file(d: Dir, name: str, flags: int, mode: int = 0o666) -> int:
    """Open ``name`` in ``d`` without following a link; returns a descriptor."""
    return _open_file(_api(), _join(d, name), flags, mode)


def _with_readonly(attributes: int, *, on: bool) -> int:
    # As CPython's win32_lchmod: toggle the one bit, keep the others.
    # FILE_ATTRIBUTE_NORMAL is valid only alone (SetFileAttributes docs).
    attributes &= ~FILE_ATTRIBUTE_NORMAL
    if on:
        return attributes | FILE_ATTRIBUTE_READONLY
    return (attributes & ~FILE_ATTRIBUTE_READONLY) or FILE_ATTRIBUTE_NORMAL


def _set_readonly(api: WinApi, path: str, *, on: bool) -> None:
    attributes = api.get_attributes(path)
    wanted = _with_readonly(attributes, on=on)
    if wanted != attributes:
        api.set_attributes(path, wanted)


def chmod(d: Dir, name: str, mode: int) -> None:
    """Windows keeps one mode bit: no write permission is the read-only attribute.

    ``SetFileAttributesW`` does not follow a link (``os.chmod`` did before
    3.13), so a link to outside the root is never changed through.
    """
    _set_readonly(_api(), _join(d, name), on=not mode & stat.S_IWRITE)


def _filetime(ns: int) -> int:
    """Unix nanoseconds as a FILETIME (100 ns units since 1601)."""
    return ns // 100 + _FILETIME_EPOCH


def _utime(api: WinApi, path: str, ns: Tuple[int, int]) -> None:
    handle = api.open_handle(
        path,
        FILE_WRITE_ATTRIBUTES,
        OPEN_EXISTING,
        FILE_FLAG_OPEN_REPARSE_POINT | FILE_FLAG_BACKUP_SEMANTICS,
    )
    try:
        api.set_times(handle, _filetime(ns[0]), _filetime(ns[1]))
    finally:
        api.close_handle(handle)


def utime(d: Dir, name: str, ns: Tuple[int, int]) -> None:
    """Set access and modification times without following a link."""
    _utime(_api(), _join(d, name), ns)


def fsync(fd: int) -> None:
    """Flush a file to stable storage (``FlushFileBuffers`` under ``os.fsync``)."""
    os.fsync(fd)


def _fsync_dir(api: WinApi, path: str) -> None:
    try:
        handle = api.open_handle(
            path, GENERIC_WRITE, OPEN_EXISTING, FILE_FLAG_BACKUP_SEMANTICS
        )
        try:
            api.flush(handle)
        finally:
            api.close_handle(handle)
    except OSError as exc:
        if _winerror(exc) not in _DIR_FLUSH_UNSUPPORTED:
            raise
        _log.debug("directory flush not supported on %r: %s", path, exc)


def fsync_dir(d: Dir) -> None:
    """Flush ``d``'s entries where Windows allows it; refusals are tolerated.

    NTFS journals metadata, so a refused directory flush (no write access,
    another file system) costs nothing the commit relies on.
    """
    _fsync_dir(_api(), _extended(d.path))


def syncfs(d: Dir) -> bool:
    """No per-file-system flush without admin rights; the caller syncs file by file."""
    del d
    return False


CLONE_FILES = False
"""Whether :func:`clone_into` can make a file."""


def clone_into(src: int, d: Dir, name: str) -> bool:
    """No file clones through this API here (ReFS block cloning is not used)."""
    del src, d, name
    return False


def copy_fd(src: int, dst: int, clone: bool = True) -> bool:
    """Copy all data of ``src`` into the empty file ``dst``; never a clone here."""
    del clone
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return False
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


# --- files in use ------------------------------------------------------------------


def _parse_rm(infos: Sequence[RmProcessInfo]) -> List[Tuple[int, str]]:
    found: List[Tuple[int, str]] = []
    seen = set()
    for info in infos:
        pid = int(info.Process.dwProcessId)
        if pid in seen:
            continue
        seen.add(pid)
        name = str(info.strAppName) or str(info.strServiceShortName) or "?"
        found.append((pid, name))
    return found


def _holders(api: WinApi, path: str) -> List[Tuple[int, str]]:
    try:
        session = api.rm_start()
    except Exception as exc:  # diagnostics only: never hide the error being reported
        _log.debug("Restart Manager unavailable: %s", exc)
        return []
    try:
        api.rm_register(session, [path])
        capacity = 0
        for _ in range(_RM_ATTEMPTS):
            code, needed, infos = api.rm_get_list(session, capacity)
            if code == 0:
                return _parse_rm(infos)
            if code != ERROR_MORE_DATA:
                _log.debug("RmGetList(%r) failed with %d", path, code)
                return []
            capacity = needed + _RM_SLACK  # processes may start in between
    except Exception as exc:  # diagnostics only, as above
        _log.debug("Restart Manager failed for %r: %s", path, exc)
        return []
    finally:
        try:
            api.rm_end(session)
        except Exception as exc:  # diagnostics only, as above
            _log.debug("RmEndSession failed: %s", exc)
    return []


def holders(path: str) -> List[Tuple[int, str]]:
    """Processes holding ``path``, as ``(pid, name)``, from the Restart Manager.

    Empty when they cannot be found out, for whatever reason: this only
    improves an error message.
    """
    return _holders(_api(), path)


def _schedule_delete_on_reboot(api: WinApi, path: str) -> bool:
    try:
        api.move_file(path, None, MOVEFILE_DELAY_UNTIL_REBOOT)
    except OSError as exc:  # 5 unless elevated: an opt-in extra, not an error
        _log.debug("cannot schedule %r for deletion at reboot: %s", path, exc)
        return False
    return True


def schedule_delete_on_reboot(path: str) -> bool:
    """Ask Windows to delete ``path`` at the next boot; False if it refused.

    ``MOVEFILE_DELAY_UNTIL_REBOOT`` needs an elevated process and works only
    for local files (semantics.md §1.7). An opt-in extra for leftovers in the
    trash, off by default.
    """
    return _schedule_delete_on_reboot(_api(), path)


# --- read-only attribute -----------------------------------------------------------


def _is_readonly_blocker(api: WinApi, path: str) -> bool:
    try:
        attributes = api.get_attributes(path)
    except OSError:  # gone, or not ours to look at: no attribute to clear
        return False
    return bool(attributes & FILE_ATTRIBUTE_READONLY)


def is_readonly_blocker(d: Dir, name: str) -> bool:
    """Whether ``name`` has the read-only attribute, which fails delete and replace."""
    return _is_readonly_blocker(_api(), _join(d, name))


def clear_readonly(d: Dir, name: str) -> None:
    """Clear the read-only attribute of ``name`` (not following a link)."""
    _set_readonly(_api(), _join(d, name), on=False)


def set_readonly(d: Dir, name: str) -> None:
    """Set the read-only attribute of ``name`` (not following a link)."""
    _set_readonly(_api(), _join(d, name), on=True)


def is_dir_stat(st: os.stat_result) -> bool:
    """Whether an ``lstat`` result is a real directory, not a junction or a link.

    ``os.lstat`` reports a junction as a directory; its reparse tag tells.
    """
    return stat.S_ISDIR(st.st_mode) and not _stat_is_link(st)
