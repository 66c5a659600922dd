"""The Windows primitives' decisions, driven on any platform through a fake Win32 API.

The fake raises ``OSError``s carrying the ``winerror`` values Windows gives
(5, 32, 33, 145, 303...), built as CPython builds them there.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import logging
import os
import stat
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from fstx._platform import _windows
from fstx._platform._types import Dir
from fstx._platform._windows import RmProcessInfo
from fstx._retry import is_transient

# PC/errmap.h, the part these tests need.
_ERRNO_OF = {
    1: errno.EINVAL,
    2: errno.ENOENT,
    3: errno.ENOENT,
    5: errno.EACCES,
    6: errno.EBADF,
    32: errno.EACCES,
    33: errno.EACCES,
    50: errno.EINVAL,
    80: errno.EEXIST,
    87: errno.EINVAL,
    145: errno.ENOTEMPTY,
    183: errno.EEXIST,
    303: errno.EINVAL,
    1117: errno.EIO,
}


def werr(code: int, filename: Optional[str] = None) -> OSError:
    """``OSError(None, msg, filename, code)`` as CPython makes it on Windows."""
    exc = OSError(_ERRNO_OF.get(code, errno.EINVAL), f"winerror {code}", filename)
    # typeshed declares OSError.winerror on Windows only.
    setattr(exc, "winerror", code)  # noqa: B010
    return exc


def test_werr_builds_the_subclass_windows_would() -> None:
    assert isinstance(werr(5), PermissionError)
    assert isinstance(werr(32), PermissionError)
    assert isinstance(werr(183), FileExistsError)
    assert isinstance(werr(2), FileNotFoundError)
    assert type(werr(303)) is OSError
    assert getattr(werr(32), "winerror", None) == 32


def fake_stat(
    mode: int = stat.S_IFREG | 0o666,
    attributes: int = 0,
    tag: int = 0,
    nlink: int = 1,
) -> os.stat_result:
    st: Any = types.SimpleNamespace(
        st_mode=mode,
        st_file_attributes=attributes,
        st_reparse_tag=tag,
        st_nlink=nlink,
    )
    return st  # type: ignore[no-any-return]  # duck-typed stat result


DIR_MODE = stat.S_IFDIR | 0o777
LINK_MODE = stat.S_IFLNK | 0o777
RO = _windows.FILE_ATTRIBUTE_READONLY
DIRECTORY = _windows.FILE_ATTRIBUTE_DIRECTORY
REPARSE = _windows.FILE_ATTRIBUTE_REPARSE_POINT
NORMAL = _windows.FILE_ATTRIBUTE_NORMAL
ARCHIVE = 0x20
CLOUD_TAG = 0x9000001A  # IO_REPARSE_TAG_CLOUD_A: not a name surrogate


class FakeApi:
    """A scripted Win32: each method records its call, then answers from a plan.

    ``errors[name]`` is a list of exceptions (or None for success) consumed
    call by call; missing or exhausted means success.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[Any, ...]] = []
        self.errors: Dict[str, List[Optional[BaseException]]] = {}
        self.stats: Dict[str, os.stat_result] = {}
        self.attributes: Dict[str, int] = {}
        self.tags: Dict[int, Tuple[int, int]] = {}
        self.next_handle = 100
        self.open_handles: Dict[int, str] = {}
        self.rm_results: List[Tuple[int, int, Sequence[RmProcessInfo]]] = []

    def _step(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        plan = self.errors.get(name)
        if plan:
            exc = plan.pop(0)
            if exc is not None:
                raise exc

    def names(self) -> List[str]:
        return [call[0] for call in self.calls]

    def lstat(self, path: str) -> os.stat_result:
        self._step("lstat", path)
        if path not in self.stats:
            raise werr(2, path)
        return self.stats[path]

    def unlink(self, path: str) -> None:
        self._step("unlink", path)

    def move_file(self, src: str, dst: Optional[str], flags: int) -> None:
        self._step("move_file", src, dst, flags)

    def get_attributes(self, path: str) -> int:
        self._step("get_attributes", path)
        if path not in self.attributes:
            raise werr(2, path)
        return self.attributes[path]

    def set_attributes(self, path: str, attributes: int) -> None:
        self._step("set_attributes", path, attributes)
        self.attributes[path] = attributes

    def open_handle(self, path: str, access: int, disposition: int, flags: int) -> int:
        self._step("open_handle", path, access, disposition, flags)
        handle = self.next_handle
        self.next_handle += 1
        self.open_handles[handle] = path
        return handle

    def close_handle(self, handle: int) -> None:
        self._step("close_handle", handle)
        assert handle in self.open_handles, f"closing {handle} twice or never opened"
        del self.open_handles[handle]

    def attribute_tag(self, handle: int) -> Tuple[int, int]:
        self._step("attribute_tag", handle)
        return self.tags.get(handle, (ARCHIVE, 0))

    def set_disposition(self, handle: int, flags: int) -> None:
        self._step("set_disposition", handle, flags)

    def flush(self, handle: int) -> None:
        self._step("flush", handle)

    def set_times(self, handle: int, atime: int, mtime: int) -> None:
        self._step("set_times", handle, atime, mtime)

    def open_osfhandle(self, handle: int, flags: int) -> int:
        self._step("open_osfhandle", handle, flags)
        del self.open_handles[handle]  # the descriptor owns it now
        return 7

    def truncate(self, fd: int) -> None:
        self._step("truncate", fd)

    def rm_start(self) -> int:
        self._step("rm_start")
        return 42

    def rm_register(self, session: int, paths: Sequence[str]) -> None:
        self._step("rm_register", session, list(paths))

    def rm_get_list(
        self, session: int, capacity: int
    ) -> Tuple[int, int, Sequence[RmProcessInfo]]:
        self._step("rm_get_list", session, capacity)
        return self.rm_results.pop(0)

    def rm_end(self, session: int) -> None:
        self._step("rm_end", session)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    """A fake API, also installed as the one the public functions use."""
    fake = FakeApi()
    monkeypatch.setattr(_windows, "_api", lambda: fake)
    return fake


ROOT = Dir(-1, "C:\\venv")
X_ROOT = "\\\\?\\C:\\venv"


# --- the module itself ------------------------------------------------------------


def _public_functions(module: types.ModuleType) -> Dict[str, Callable[..., Any]]:
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isfunction(obj)
        and not name.startswith("_")
        and obj.__module__ == module.__name__
    }


@pytest.mark.skipif(os.name == "nt", reason="the POSIX module does not import here")
def test_same_functions_and_signatures_as_posix() -> None:
    from fstx._platform import _posix

    posix, windows = _public_functions(_posix), _public_functions(_windows)
    assert sorted(posix) == sorted(windows)
    for name in posix:
        assert inspect.signature(posix[name]) == inspect.signature(windows[name]), name


def test_the_brief_s_functions_exist() -> None:
    wanted = (
        "open_root open_dir close_dir same_dir stat_dir lstat listdir mkdir rmdir "
        "unlink rename rename_noreplace exchange link symlink readlink open_file "
        "chmod utime fsync fsync_dir syncfs copy_fd holders is_readonly_blocker "
        "clear_readonly set_readonly is_dir_stat schedule_delete_on_reboot"
    ).split()
    for name in wanted:
        assert callable(getattr(_windows, name)), name


@pytest.mark.skipif(os.name == "nt", reason="checks the non-Windows import")
def test_imports_without_loading_dlls() -> None:
    # Importing worked (this file did it); the DLLs load on first use only,
    # and off Windows that first use fails cleanly.
    assert _windows._kernel32.cache_info().currsize == 0
    with pytest.raises(OSError) as info:
        _windows._kernel32()
    assert info.value.errno == errno.ENOSYS
    with pytest.raises(OSError):
        _windows._rstrtmgr()


def test_rm_process_info_layout() -> None:
    # 668 bytes on Windows, where wchar_t is 2 bytes; the layout follows it.
    wchar = ctypes.sizeof(ctypes.c_wchar)
    assert ctypes.sizeof(RmProcessInfo) == 12 + (256 + 64) * wchar + 16
    assert RmProcessInfo.strAppName.offset == 12


# --- paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("C:\\venv\\lib", "\\\\?\\C:\\venv\\lib", id="drive"),
        pytest.param("C:/venv/lib", "\\\\?\\C:\\venv\\lib", id="slashes"),
        pytest.param("C:\\venv\\..\\x", "\\\\?\\C:\\x", id="dotdot"),
        pytest.param(
            "\\\\server\\share\\venv", "\\\\?\\UNC\\server\\share\\venv", id="unc"
        ),
        pytest.param("\\\\?\\C:\\already", "\\\\?\\C:\\already", id="extended"),
        pytest.param("\\\\.\\pipe\\x", "\\\\.\\pipe\\x", id="device"),
        pytest.param("venv\\lib", "venv\\lib", id="relative"),
        pytest.param("C:venv", "C:venv", id="drive-relative"),
    ],
)
def test_extended_paths(path: str, expected: str) -> None:
    assert _windows._extended(path) == expected


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dotdot"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("a/b", id="slash"),
        pytest.param("C:x", id="drive"),
        pytest.param("file:stream", id="stream"),
        pytest.param("a\0b", id="nul"),
    ],
)
def test_join_refuses_anything_but_one_name(name: str) -> None:
    with pytest.raises(OSError) as info:
        _windows._join(ROOT, name)
    assert info.value.errno == errno.EINVAL


def test_join_keeps_trailing_dots_and_long_names() -> None:
    assert _windows._join(ROOT, "a.") == X_ROOT + "\\a."
    long_name = "n" * 250
    deep = Dir(-1, "C:\\" + "\\".join(["d" * 100] * 5))
    assert _windows._join(deep, long_name).startswith("\\\\?\\C:\\")


# --- open_dir and is_dir_stat ---------------------------------------------------------


@pytest.mark.parametrize(
    ("st", "outcome"),
    [
        pytest.param(fake_stat(DIR_MODE, DIRECTORY), "ok", id="directory"),
        pytest.param(
            fake_stat(DIR_MODE, DIRECTORY | REPARSE, CLOUD_TAG),
            "ok",
            id="cloud-placeholder-dir",
        ),
        pytest.param(
            fake_stat(
                DIR_MODE, DIRECTORY | REPARSE, _windows.IO_REPARSE_TAG_MOUNT_POINT
            ),
            errno.ELOOP,
            id="junction",
        ),
        pytest.param(
            fake_stat(LINK_MODE, DIRECTORY | REPARSE, _windows.IO_REPARSE_TAG_SYMLINK),
            errno.ELOOP,
            id="dir-symlink",
        ),
        pytest.param(
            fake_stat(DIR_MODE, DIRECTORY | REPARSE, 0), errno.ELOOP, id="unknown-tag"
        ),
        pytest.param(fake_stat(), errno.ENOTDIR, id="file"),
    ],
)
def test_open_dir(api: FakeApi, st: os.stat_result, outcome: object) -> None:
    api.stats[X_ROOT + "\\lib"] = st
    if outcome == "ok":
        d = _windows.open_dir(ROOT, "lib")
        assert (d.fd, d.path) == (-1, "C:\\venv\\lib")
    else:
        with pytest.raises(OSError) as info:
            _windows.open_dir(ROOT, "lib")
        assert info.value.errno == outcome
        assert info.value.filename == X_ROOT + "\\lib"


def test_open_dir_missing(api: FakeApi) -> None:
    with pytest.raises(FileNotFoundError):
        _windows.open_dir(ROOT, "nope")


@pytest.mark.parametrize(
    ("st", "expected"),
    [
        pytest.param(fake_stat(DIR_MODE, DIRECTORY), True, id="directory"),
        pytest.param(
            fake_stat(
                DIR_MODE, DIRECTORY | REPARSE, _windows.IO_REPARSE_TAG_MOUNT_POINT
            ),
            False,
            id="junction",
        ),
        pytest.param(
            fake_stat(LINK_MODE, REPARSE, _windows.IO_REPARSE_TAG_SYMLINK),
            False,
            id="symlink",
        ),
        pytest.param(
            fake_stat(DIR_MODE, DIRECTORY | REPARSE, CLOUD_TAG), True, id="cloud-dir"
        ),
        pytest.param(fake_stat(), False, id="file"),
    ],
)
def test_is_dir_stat(st: os.stat_result, expected: bool) -> None:
    assert _windows.is_dir_stat(st) is expected


# --- unlink -------------------------------------------------------------------------

PATH = X_ROOT + "\\a.pyd"
OPEN_FOR_DELETE = (
    "open_handle",
    PATH,
    _windows.DELETE | _windows.FILE_READ_ATTRIBUTES,
    _windows.OPEN_EXISTING,
    _windows.FILE_FLAG_OPEN_REPARSE_POINT | _windows.FILE_FLAG_BACKUP_SEMANTICS,
)


def test_unlink_uses_posix_semantics(api: FakeApi) -> None:
    _windows.unlink(ROOT, "a.pyd")
    assert api.calls == [
        OPEN_FOR_DELETE,
        ("attribute_tag", 100),
        ("set_disposition", 100, 0x1 | 0x2 | 0x10),
        ("close_handle", 100),
    ]
    assert api.open_handles == {}


@pytest.mark.parametrize("code", [1, 50, 87])
def test_unlink_falls_back_where_posix_delete_is_unsupported(
    api: FakeApi, code: int
) -> None:
    api.errors["set_disposition"] = [werr(code)]
    _windows.unlink(ROOT, "a.pyd")
    assert api.names() == [
        "open_handle",
        "attribute_tag",
        "set_disposition",
        "close_handle",
        "unlink",
    ]
    assert api.calls[-1] == ("unlink", PATH)


def test_unlink_running_image_is_not_retried_legacy(api: FakeApi) -> None:
    # STATUS_CANNOT_DELETE arrives as 5; DeleteFileW would say the same.
    api.errors["set_disposition"] = [werr(5, PATH)]
    with pytest.raises(PermissionError) as info:
        _windows.unlink(ROOT, "a.pyd")
    assert getattr(info.value, "winerror", None) == 5
    assert "unlink" not in api.names()
    assert api.open_handles == {}


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        pytest.param(32, PermissionError, id="32-sharing-violation"),
        pytest.param(33, PermissionError, id="33-lock-violation"),
        pytest.param(2, FileNotFoundError, id="2-missing"),
    ],
)
def test_unlink_open_errors_are_raised(api: FakeApi, code: int, exc_type: type) -> None:
    api.errors["open_handle"] = [werr(code, PATH)]
    with pytest.raises(exc_type) as info:
        _windows.unlink(ROOT, "a.pyd")
    assert getattr(info.value, "winerror", None) == code
    assert api.names() == ["open_handle"]


def test_unlink_sharing_violation_is_transient_for_the_retrier(api: FakeApi) -> None:
    api.errors["open_handle"] = [werr(32, PATH)]
    with pytest.raises(OSError) as info:
        _windows.unlink(ROOT, "a.pyd")
    assert is_transient(info.value)


@pytest.mark.parametrize("code", [5, 87])
def test_unlink_open_refused_falls_back_to_deletefile(api: FakeApi, code: int) -> None:
    # 5: a delete-pending name, a directory link; DeleteFileW says what it says.
    api.errors["open_handle"] = [werr(code, PATH)]
    _windows.unlink(ROOT, "a.pyd")
    assert api.names() == ["open_handle", "unlink"]


def test_unlink_refuses_a_real_directory(api: FakeApi) -> None:
    api.tags[100] = (DIRECTORY, 0)
    with pytest.raises(IsADirectoryError):
        _windows.unlink(ROOT, "a.pyd")
    assert "set_disposition" not in api.names()
    assert api.open_handles == {}


def test_unlink_deletes_a_directory_link_itself(api: FakeApi) -> None:
    api.tags[100] = (DIRECTORY | REPARSE, _windows.IO_REPARSE_TAG_MOUNT_POINT)
    _windows.unlink(ROOT, "a.pyd")
    assert "set_disposition" in api.names()


def _legacy(api: FakeApi) -> None:
    """Make the POSIX delete unsupported, so unlink goes the DeleteFileW way."""
    api.errors["set_disposition"] = [werr(87)]


def test_legacy_unlink_clears_readonly_and_retries(api: FakeApi) -> None:
    _legacy(api)
    api.errors["unlink"] = [werr(5, PATH), None]
    api.stats[PATH] = fake_stat(attributes=RO | ARCHIVE)
    _windows.unlink(ROOT, "a.pyd")
    legacy = api.calls[4:]
    assert legacy == [
        ("unlink", PATH),
        ("lstat", PATH),
        ("set_attributes", PATH, ARCHIVE),
        ("unlink", PATH),
    ]


def test_legacy_unlink_readonly_only_attribute_becomes_normal(api: FakeApi) -> None:
    _legacy(api)
    api.errors["unlink"] = [werr(5, PATH), None]
    api.stats[PATH] = fake_stat(attributes=RO)
    _windows.unlink(ROOT, "a.pyd")
    assert ("set_attributes", PATH, NORMAL) in api.calls


def test_legacy_unlink_restores_readonly_when_the_retry_fails(api: FakeApi) -> None:
    _legacy(api)
    api.errors["unlink"] = [werr(5, PATH), werr(32, PATH)]
    api.stats[PATH] = fake_stat(attributes=RO | ARCHIVE)
    with pytest.raises(PermissionError) as info:
        _windows.unlink(ROOT, "a.pyd")
    assert getattr(info.value, "winerror", None) == 32  # the retry's error
    assert api.calls[-2:] == [
        ("unlink", PATH),
        ("set_attributes", PATH, RO | ARCHIVE),
    ]


def test_legacy_unlink_restore_failure_is_logged_not_lost(
    api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    _legacy(api)
    api.errors["unlink"] = [werr(5, PATH), werr(32, PATH)]
    api.errors["set_attributes"] = [None, werr(5, PATH)]
    api.stats[PATH] = fake_stat(attributes=RO)
    with caplog.at_level(logging.WARNING, logger="fstx"):
        with pytest.raises(PermissionError) as info:
            _windows.unlink(ROOT, "a.pyd")
    assert getattr(info.value, "winerror", None) == 32
    assert "read-only" in caplog.text


@pytest.mark.parametrize(
    ("st", "why"),
    [
        pytest.param(fake_stat(attributes=ARCHIVE), "not read-only", id="writable"),
        pytest.param(fake_stat(attributes=RO, nlink=2), "other links", id="nlink-2"),
    ],
)
def test_legacy_unlink_access_denied_without_clearing(
    api: FakeApi, st: os.stat_result, why: str
) -> None:
    _legacy(api)
    first = werr(5, PATH)
    api.errors["unlink"] = [first]
    api.stats[PATH] = st
    with pytest.raises(PermissionError) as info:
        _windows.unlink(ROOT, "a.pyd")
    assert info.value is first, why
    assert "set_attributes" not in api.names()


def test_legacy_unlink_other_errors_are_raised_as_they_are(api: FakeApi) -> None:
    _legacy(api)
    api.errors["unlink"] = [werr(32, PATH)]
    with pytest.raises(PermissionError):
        _windows.unlink(ROOT, "a.pyd")
    assert "lstat" not in api.names()


# --- rename ----------------------------------------------------------------------------


def test_rename_replaces_and_writes_through(api: FakeApi) -> None:
    _windows.rename(ROOT, "new", ROOT, "old")
    assert api.calls == [("move_file", X_ROOT + "\\new", X_ROOT + "\\old", 0x1 | 0x8)]


def test_rename_noreplace_does_not_replace(api: FakeApi) -> None:
    api.errors["move_file"] = [werr(183, X_ROOT + "\\new")]
    with pytest.raises(FileExistsError):
        _windows.rename_noreplace(ROOT, "new", ROOT, "old")
    assert api.calls == [("move_file", X_ROOT + "\\new", X_ROOT + "\\old", 0x8)]


@pytest.mark.parametrize("code", [5, 32, 33, 145, 303])
def test_rename_errors_keep_their_winerror(api: FakeApi, code: int) -> None:
    api.errors["move_file"] = [werr(code)]
    with pytest.raises(OSError) as info:
        _windows.rename(ROOT, "a", ROOT, "b")
    assert getattr(info.value, "winerror", None) == code
    assert is_transient(info.value) is (code != 145)


def test_exchange_is_not_available() -> None:
    with pytest.raises(OSError) as info:
        _windows.exchange(ROOT, "a", ROOT, "b")
    assert info.value.errno == errno.ENOSYS


def test_schedule_delete_on_reboot(api: FakeApi) -> None:
    assert _windows.schedule_delete_on_reboot("C:\\venv\\.fstx\\trash\\1") is True
    assert api.calls == [("move_file", "C:\\venv\\.fstx\\trash\\1", None, 0x4)]


def test_schedule_delete_on_reboot_unelevated(api: FakeApi) -> None:
    api.errors["move_file"] = [werr(5)]
    assert _windows.schedule_delete_on_reboot("C:\\x") is False


# --- read-only attribute and chmod -------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        pytest.param(RO, True, id="readonly"),
        pytest.param(RO | ARCHIVE, True, id="readonly-archive"),
        pytest.param(ARCHIVE, False, id="archive"),
        pytest.param(NORMAL, False, id="normal"),
        pytest.param(None, False, id="missing"),
    ],
)
def test_is_readonly_blocker(
    api: FakeApi, attributes: Optional[int], expected: bool
) -> None:
    if attributes is not None:
        api.attributes[X_ROOT + "\\f"] = attributes
    assert _windows.is_readonly_blocker(ROOT, "f") is expected


@pytest.mark.parametrize(
    ("before", "func", "after"),
    [
        pytest.param(RO | ARCHIVE, "clear_readonly", ARCHIVE, id="clear"),
        pytest.param(RO, "clear_readonly", NORMAL, id="clear-to-normal"),
        pytest.param(NORMAL, "set_readonly", RO, id="set-from-normal"),
        pytest.param(ARCHIVE, "set_readonly", RO | ARCHIVE, id="set"),
    ],
)
def test_readonly_set_and_clear(
    api: FakeApi, before: int, func: str, after: int
) -> None:
    path = X_ROOT + "\\f"
    api.attributes[path] = before
    getattr(_windows, func)(ROOT, "f")
    assert api.attributes[path] == after
    assert api.calls[-1] == ("set_attributes", path, after)


@pytest.mark.parametrize(
    ("before", "func"),
    [
        pytest.param(ARCHIVE, "clear_readonly", id="clear-when-clear"),
        pytest.param(RO, "set_readonly", id="set-when-set"),
    ],
)
def test_readonly_no_change_no_call(api: FakeApi, before: int, func: str) -> None:
    api.attributes[X_ROOT + "\\f"] = before
    getattr(_windows, func)(ROOT, "f")
    assert "set_attributes" not in api.names()


@pytest.mark.parametrize(
    ("mode", "after"),
    [
        pytest.param(0o444, RO | ARCHIVE, id="no-write-bit"),
        pytest.param(0o644, ARCHIVE, id="write-bit"),
        pytest.param(0o200, ARCHIVE, id="write-only"),
    ],
)
def test_chmod_maps_the_write_bit(api: FakeApi, mode: int, after: int) -> None:
    path = X_ROOT + "\\f"
    api.attributes[path] = ARCHIVE
    _windows.chmod(ROOT, "f", mode)
    assert api.attributes[path] == after


# --- open_file --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "mode", "expected"),
    [
        pytest.param(
            os.O_RDONLY,
            0o666,
            (_windows.GENERIC_READ, _windows.OPEN_EXISTING, NORMAL, False),
            id="read",
        ),
        pytest.param(
            os.O_WRONLY | os.O_CREAT | os.O_EXCL,
            0o666,
            (_windows.GENERIC_WRITE, _windows.CREATE_NEW, NORMAL, False),
            id="create-new",
        ),
        pytest.param(
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC,
            0o666,
            (_windows.GENERIC_WRITE, _windows.CREATE_NEW, NORMAL, False),
            id="create-new-trunc",
        ),
        pytest.param(
            os.O_RDWR | os.O_CREAT | os.O_TRUNC,
            0o444,
            (
                _windows.GENERIC_READ | _windows.GENERIC_WRITE,
                _windows.OPEN_ALWAYS,
                RO,
                True,
            ),
            id="create-trunc-readonly",
        ),
        pytest.param(
            os.O_WRONLY | os.O_CREAT,
            0o644,
            (_windows.GENERIC_WRITE, _windows.OPEN_ALWAYS, NORMAL, False),
            id="open-always",
        ),
        pytest.param(
            os.O_WRONLY | os.O_TRUNC,
            0o444,
            (_windows.GENERIC_WRITE, _windows.OPEN_EXISTING, NORMAL, True),
            id="truncate-existing",
        ),
    ],
)
def test_create_args(
    flags: int, mode: int, expected: Tuple[int, int, int, bool]
) -> None:
    assert _windows._create_args(flags, mode) == expected


def test_open_file_opens_without_following_and_shares(api: FakeApi) -> None:
    fd = _windows.open_file(ROOT, "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    assert fd == 7
    assert api.calls[0] == (
        "open_handle",
        X_ROOT + "\\f",
        _windows.GENERIC_WRITE,
        _windows.OPEN_ALWAYS,
        NORMAL | _windows.FILE_FLAG_OPEN_REPARSE_POINT,
    )
    # Truncated only once known to be no link, through the descriptor.
    assert api.names() == ["open_handle", "attribute_tag", "open_osfhandle", "truncate"]
    assert api.open_handles == {}


def test_open_file_refuses_a_symlink(api: FakeApi) -> None:
    api.tags[100] = (REPARSE, _windows.IO_REPARSE_TAG_SYMLINK)
    with pytest.raises(OSError) as info:
        _windows.open_file(ROOT, "f", os.O_WRONLY | os.O_TRUNC)
    assert info.value.errno == errno.ELOOP
    assert "truncate" not in api.names()
    assert api.open_handles == {}


def test_open_file_follows_a_cloud_placeholder(api: FakeApi) -> None:
    api.tags[100] = (REPARSE | ARCHIVE, CLOUD_TAG)
    assert _windows.open_file(ROOT, "f", os.O_RDONLY) == 7
    opens = [call for call in api.calls if call[0] == "open_handle"]
    assert [call[4] for call in opens] == [
        NORMAL | _windows.FILE_FLAG_OPEN_REPARSE_POINT,
        NORMAL,
    ]
    assert api.open_handles == {}


def test_open_file_closes_the_handle_when_the_descriptor_fails(api: FakeApi) -> None:
    api.errors["open_osfhandle"] = [OSError(errno.EMFILE, "too many")]
    with pytest.raises(OSError):
        _windows.open_file(ROOT, "f", os.O_RDONLY)
    assert api.open_handles == {}


def test_open_file_closes_the_handle_when_querying_fails(api: FakeApi) -> None:
    api.errors["attribute_tag"] = [werr(1)]
    with pytest.raises(OSError):
        _windows.open_file(ROOT, "f", os.O_RDONLY)
    assert api.open_handles == {}


def test_open_file_sharing_violation(api: FakeApi) -> None:
    api.errors["open_handle"] = [werr(32, X_ROOT + "\\f")]
    with pytest.raises(PermissionError) as info:
        _windows.open_file(ROOT, "f", os.O_WRONLY)
    assert is_transient(info.value)


# --- utime, fsync_dir, syncfs ----------------------------------------------------------


def test_filetime() -> None:
    assert _windows._filetime(0) == 116444736000000000
    assert _windows._filetime(1_000_000_000) == 116444736000000000 + 10_000_000
    assert _windows._filetime(150) == 116444736000000000 + 1  # 100 ns units


def test_utime_sets_times_on_the_link_itself(api: FakeApi) -> None:
    _windows.utime(ROOT, "f", (0, 2_000_000_000))
    assert api.calls == [
        (
            "open_handle",
            X_ROOT + "\\f",
            _windows.FILE_WRITE_ATTRIBUTES,
            _windows.OPEN_EXISTING,
            _windows.FILE_FLAG_OPEN_REPARSE_POINT | _windows.FILE_FLAG_BACKUP_SEMANTICS,
        ),
        ("set_times", 100, 116444736000000000, 116444736000000000 + 20_000_000),
        ("close_handle", 100),
    ]


def test_utime_closes_the_handle_on_error(api: FakeApi) -> None:
    api.errors["set_times"] = [werr(5)]
    with pytest.raises(PermissionError):
        _windows.utime(ROOT, "f", (0, 0))
    assert api.open_handles == {}


def test_fsync_dir_flushes_a_directory_handle(api: FakeApi) -> None:
    _windows.fsync_dir(ROOT)
    assert api.calls == [
        (
            "open_handle",
            X_ROOT,
            _windows.GENERIC_WRITE,
            _windows.OPEN_EXISTING,
            _windows.FILE_FLAG_BACKUP_SEMANTICS,
        ),
        ("flush", 100),
        ("close_handle", 100),
    ]


@pytest.mark.parametrize(
    ("step", "code"),
    [
        pytest.param("open_handle", 5, id="open-access-denied"),
        pytest.param("flush", 1, id="flush-invalid-function"),
        pytest.param("flush", 87, id="flush-invalid-parameter"),
        pytest.param("flush", 50, id="flush-not-supported"),
    ],
)
def test_fsync_dir_tolerates_refusals(api: FakeApi, step: str, code: int) -> None:
    api.errors[step] = [werr(code)]
    _windows.fsync_dir(ROOT)
    assert api.open_handles == {}


def test_fsync_dir_raises_real_io_errors(api: FakeApi) -> None:
    api.errors["flush"] = [werr(1117)]  # ERROR_IO_DEVICE
    with pytest.raises(OSError) as info:
        _windows.fsync_dir(ROOT)
    assert getattr(info.value, "winerror", None) == 1117
    assert api.open_handles == {}


def test_syncfs_is_unsupported() -> None:
    assert _windows.syncfs(ROOT) is False


def test_copy_fd_copies(tmp_path: Any) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 << 20) + b"tail"
    src.write_bytes(data)
    binary = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
    fs = os.open(src, os.O_RDONLY | binary)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | binary)
    try:
        _windows.copy_fd(fs, fd)
    finally:
        os.close(fs)
        os.close(fd)
    assert dst.read_bytes() == data


# --- holders (Restart Manager) ------------------------------------------------------------


def rm_info(pid: int, app: str = "", service: str = "") -> RmProcessInfo:
    info = RmProcessInfo()
    info.Process.dwProcessId = pid
    info.strAppName = app
    info.strServiceShortName = service
    return info


def test_holders_parses_the_list(api: FakeApi) -> None:
    api.rm_results = [
        (234, 3, []),  # ERROR_MORE_DATA: 3 needed
        (
            0,
            3,
            [
                rm_info(1200, "Python"),
                rm_info(1300, "", "WSearch"),
                rm_info(1200, "Python"),  # the same process twice
                rm_info(1400),
            ],
        ),
    ]
    assert _windows.holders("C:\\venv\\x.pyd") == [
        (1200, "Python"),
        (1300, "WSearch"),
        (1400, "?"),
    ]
    assert api.calls == [
        ("rm_start",),
        ("rm_register", 42, ["C:\\venv\\x.pyd"]),
        ("rm_get_list", 42, 0),
        ("rm_get_list", 42, 3 + 4),
        ("rm_end", 42),
    ]


def test_holders_none(api: FakeApi) -> None:
    api.rm_results = [(0, 0, [])]
    assert _windows.holders("C:\\x") == []
    assert api.names()[-1] == "rm_end"


def test_holders_gives_up_when_the_list_keeps_growing(api: FakeApi) -> None:
    api.rm_results = [(234, n, []) for n in range(1, 20)]
    assert _windows.holders("C:\\x") == []
    assert api.names().count("rm_get_list") == 5
    assert api.names()[-1] == "rm_end"


@pytest.mark.parametrize(
    ("step", "exc", "ends"),
    [
        pytest.param("rm_start", werr(5), False, id="start-fails"),
        pytest.param("rm_register", werr(87), True, id="register-fails"),
        pytest.param("rm_get_list", werr(5), True, id="get-list-raises"),
        pytest.param(
            "rm_start", AttributeError("no RmStartSession"), False, id="no-dll"
        ),
    ],
)
def test_holders_is_empty_on_any_failure(
    api: FakeApi, step: str, exc: BaseException, ends: bool
) -> None:
    api.errors[step] = [exc]
    api.rm_results = [(0, 1, [rm_info(5, "x")])]
    assert _windows.holders("C:\\x") == []
    assert ("rm_end" in api.names()) is ends


def test_holders_other_return_code(api: FakeApi) -> None:
    api.rm_results = [(5, 0, [])]
    assert _windows.holders("C:\\x") == []
    assert api.names()[-1] == "rm_end"


def test_holders_end_session_failure_is_swallowed(api: FakeApi) -> None:
    api.rm_results = [(0, 1, [rm_info(9, "app")])]
    api.errors["rm_end"] = [werr(6)]
    assert _windows.holders("C:\\x") == [(9, "app")]
