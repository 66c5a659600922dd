"""Tests of fstx._tree.RootFS: path operations through directory handles only."""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, List

import pytest

from fstx import _tree
from fstx._tree import RootFS
from treeutil import make_tree, snapshot

if TYPE_CHECKING:
    import pathlib

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX semantics")


@pytest.fixture
def outside(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "outside"
    make_tree(path, {"x": b"outside x", "sub/y": b"y"})
    return path


@pytest.fixture
def fs(root: pathlib.Path, outside: pathlib.Path) -> Iterator[RootFS]:
    make_tree(root, {"a/x": b"ax", "a/sub/z": b"z", "f": b"file", "real/x": b"rx"})
    os.symlink("real", root / "dirlink")
    os.symlink(str(outside), root / "outlink")
    os.symlink("f", root / "filelink")
    os.symlink("missing", root / "dangling")
    tree = RootFS(str(root))
    yield tree
    tree.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_queries(fs: RootFS, root: pathlib.Path) -> None:
    st = fs.lstat(("a", "x"))
    assert st is not None
    assert st.st_ino == os.lstat(root / "a/x").st_ino
    assert fs.lstat(("missing",)) is None
    assert fs.lstat(("a", "missing", "deeper")) is None
    assert fs.lstat(("f", "below-a-file")) is None
    assert fs.exists(("dangling",))
    assert fs.is_dir(("a",))
    assert not fs.is_dir(("dirlink",))  # a symlink to a directory is no directory
    assert not fs.is_dir(("missing",))
    assert sorted(fs.listdir(("a",))) == ["sub", "x"]
    assert fs.readlink(("dirlink",)) == "real"
    assert fs.same(("f",), ("f",))
    assert not fs.same(("f",), ("a", "x"))
    assert not fs.same(("f",), ("missing",))
    root_st = fs.lstat(())
    assert root_st is not None
    assert root_st.st_ino == os.stat(root).st_ino
    assert fs.abspath(("a", "x")) == os.path.join(str(root), "a", "x")
    assert fs.abspath(()) == str(root)


@pytest.mark.parametrize(
    "name",
    ["plain", os.fsdecode(b"caf\xe9"), "new\nline", "-rf", "a" * 255, "C:", "\\x"],
)
def test_join_and_split_round_trip(name: str) -> None:
    rel = ("dir", name, "leaf")
    assert _tree.split(_tree.join(rel)) == rel


THROUGH_LINK: List[Any] = [
    pytest.param(lambda fs: fs.listdir(("dirlink",)), id="listdir"),
    pytest.param(lambda fs: fs.open(("dirlink", "x"), os.O_RDONLY), id="open"),
    pytest.param(
        lambda fs: fs.open(("outlink", "new"), os.O_WRONLY | os.O_CREAT), id="create"
    ),
    pytest.param(lambda fs: fs.unlink(("outlink", "x")), id="unlink"),
    pytest.param(lambda fs: fs.rmdir(("outlink", "sub")), id="rmdir"),
    pytest.param(lambda fs: fs.mkdir(("outlink", "made")), id="mkdir"),
    pytest.param(lambda fs: fs.rename(("outlink", "x"), ("stolen",)), id="rename-src"),
    pytest.param(lambda fs: fs.rename(("f",), ("outlink", "planted")), id="rename-dst"),
    pytest.param(lambda fs: fs.link(("f",), ("outlink", "hard")), id="link"),
    pytest.param(lambda fs: fs.symlink("/etc", ("outlink", "sym")), id="symlink"),
    pytest.param(lambda fs: fs.chmod(("outlink", "x"), 0o777), id="chmod"),
    pytest.param(lambda fs: fs.utime(("outlink", "x"), (0, 0)), id="utime"),
    pytest.param(lambda fs: fs.readlink(("outlink", "x")), id="readlink"),
    pytest.param(lambda fs: fs.fsync_dir(("outlink",)), id="fsync_dir"),
    pytest.param(
        lambda fs: fs.remove_tree(("outlink", "sub")), id="remove_tree-absent"
    ),
    pytest.param(
        lambda fs: list(fs.walk_files(("outlink", "sub"))), id="walk_files-absent"
    ),
]


REFUSED = (errno.ENOTDIR, errno.ELOOP)  # O_DIRECTORY|O_NOFOLLOW on a symlink


def outcome(call: Callable[[], Any]) -> Any:
    """What ``call`` returned, or the OSError it raised."""
    try:
        return call()
    except OSError as exc:
        return exc


@pytest.mark.parametrize("call", THROUGH_LINK)
def test_never_walks_through_a_symlinked_directory(
    fs: RootFS,
    root: pathlib.Path,
    outside: pathlib.Path,
    call: Callable[[RootFS], Any],
    request: pytest.FixtureRequest,
) -> None:
    before = (snapshot(root), snapshot(outside))
    result = outcome(lambda: call(fs))
    if request.node.callspec.id.endswith("-absent") and not isinstance(result, OSError):
        # These look first; what cannot be reached may read as absent.
        assert result in ([], None)
    else:
        assert isinstance(result, OSError), result
        assert result.errno in REFUSED
    assert (snapshot(root), snapshot(outside)) == before


def test_lstat_never_reaches_behind_a_symlinked_directory(fs: RootFS) -> None:
    for path in [("dirlink", "x"), ("outlink", "x"), ("outlink", "sub", "y")]:
        result = outcome(lambda: fs.lstat(path))  # noqa: B023 - called at once
        if isinstance(result, OSError):
            assert result.errno in REFUSED
        else:
            assert result is None, path  # never the stat of what lies behind


def test_open_refuses_a_symlink_as_last_component(fs: RootFS) -> None:
    with pytest.raises(OSError) as info:
        fs.open(("filelink",), os.O_RDONLY)
    assert info.value.errno == errno.ELOOP


def test_the_root_itself_cannot_be_changed(fs: RootFS) -> None:
    calls: List[Callable[[], None]] = [
        lambda: fs.rmdir(()),
        lambda: fs.unlink(()),
        lambda: fs.chmod((), 0o700),
    ]
    for call in calls:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EINVAL


def test_changes(fs: RootFS, root: pathlib.Path) -> None:
    fs.mkdir(("new",), 0o700)
    fd = fs.open(("new", "file"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"data")
    os.close(fd)
    fs.link(("new", "file"), ("new", "hard"))
    assert fs.same(("new", "file"), ("new", "hard"))
    fs.symlink("file", ("new", "sym"))
    fs.chmod(("new", "file"), 0o640)
    fs.utime(("new", "file"), (1, 2_000_000_003))
    with pytest.raises(FileExistsError):
        fs.rename_noreplace(("f",), ("new", "file"))
    fs.rename_noreplace(("f",), ("new", "moved"))
    fs.rename(("new", "moved"), ("new", "hard"))  # replaces a file
    fs.unlink(("new", "sym"))
    st = os.lstat(root / "new/file")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 2_000_000_003)
    assert stat.S_IMODE(os.lstat(root / "new").st_mode) == 0o700 & ~_umask()
    assert (root / "new/hard").read_bytes() == b"file"
    assert sorted(os.listdir(root / "new")) == ["file", "hard"]
    fs.remove_tree(("new",))
    assert not (root / "new").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_remove_tree_never_follows_symlinks(
    fs: RootFS, root: pathlib.Path, outside: pathlib.Path
) -> None:
    os.symlink(str(outside), root / "a/sub/escape")
    os.symlink(str(outside / "x"), root / "a/file-escape")
    before = snapshot(outside)
    fs.remove_tree(("a",))
    assert not (root / "a").exists()
    assert snapshot(outside) == before
    fs.remove_tree(("missing",))  # nothing to do


def test_walk_files_lists_children_before_parents(fs: RootFS) -> None:
    walked = list(fs.walk_files(("a",)))
    assert sorted(walked) == sorted(
        [("a",), ("a", "x"), ("a", "sub"), ("a", "sub", "z")]
    )
    for i, path in enumerate(walked):
        assert all(other[: len(path)] != path for other in walked[i + 1 :])
    assert list(fs.walk_files(("missing",))) == []
    assert list(fs.walk_files(("dirlink",))) == [("dirlink",)]


# -- the handle cache ---------------------------------------------------------------------


def test_handle_cache_is_bounded_and_evicted_handles_reopen(root: pathlib.Path) -> None:
    count = 100
    make_tree(root, {f"d{i:03d}/f": b"%d" % i for i in range(count)})
    fs = RootFS(str(root))
    fds = open_fds()
    try:
        for i in range(count):
            st = fs.lstat((f"d{i:03d}", "f"))
            assert st is not None
            assert st.st_size == len(b"%d" % i)
        assert open_fds() - fds <= 64
        for i in range(count):  # the first ones were evicted: opened again
            fd = fs.open((f"d{i:03d}", "f"), os.O_RDONLY)
            try:
                assert os.read(fd, 10) == b"%d" % i
            finally:
                os.close(fd)
        assert open_fds() - fds <= 64
    finally:
        fs.close()
    assert open_fds() == fds - 1  # the root's own handle went too


def test_deep_paths_beyond_the_cache(root: pathlib.Path) -> None:
    deep = tuple(f"n{i}" for i in range(100))
    os.makedirs(os.path.join(root, *deep))
    make_tree(root, {"src/a": b"A", "src/b": b"B"})
    fs = RootFS(str(root))
    try:
        fs.rename(("src", "a"), (*deep, "a"))
        fs.link(("src", "b"), (*deep, "b"))
        fs.rename_noreplace((*deep, "b"), ("src", "c"))
        fs.rename(("src", "b"), (*deep, "b2"))
    finally:
        fs.close()
    assert os.path.isfile(os.path.join(root, *deep, "a"))
    assert os.path.isfile(os.path.join(root, *deep, "b2"))
    assert sorted(os.listdir(root / "src")) == ["c"]
    assert (root / "src" / "c").read_bytes() == b"B"


def test_forget_after_a_directory_moved_behind_our_back(
    fs: RootFS, root: pathlib.Path
) -> None:
    assert fs.lstat(("a", "sub", "z")) is not None  # caches a and a/sub
    os.rename(root / "a", root / "b")
    os.mkdir(root / "a")
    # A cached handle still points at the moved directory: that is why every
    # rename or removal of a directory must forget it.
    stale = fs.lstat(("a", "x"))
    assert stale is not None
    assert stale.st_ino == os.lstat(root / "b/x").st_ino
    fs.forget(("a",))
    assert fs.lstat(("a", "x")) is None
    assert fs.lstat(("a", "sub", "z")) is None  # a/sub was forgotten too
    assert fs.lstat(("b", "sub", "z")) is not None


def test_rename_and_rmdir_forget_their_handles(fs: RootFS, root: pathlib.Path) -> None:
    assert fs.lstat(("a", "sub", "z")) is not None
    fs.rename(("a",), ("moved",))
    os.makedirs(root / "a/sub")
    assert fs.lstat(("a", "x")) is None
    assert fs.lstat(("a", "sub", "z")) is None
    assert fs.lstat(("moved", "sub", "z")) is not None
    fs.rmdir(("a", "sub"))
    os.rename(root / "moved/sub", root / "a/sub")
    assert fs.lstat(("a", "sub", "z")) is not None
    fs.rename_noreplace(("a",), ("again",))
    assert fs.lstat(("a", "sub", "z")) is None
    assert fs.lstat(("again", "sub", "z")) is not None
