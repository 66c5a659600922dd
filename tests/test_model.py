"""Tests of fstx._model.PlannedTree: the tree as planned, over the real one."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fstx._model import PlannedTree
from fstx._tree import Rel, RootFS
from treeutil import make_tree

if TYPE_CHECKING:
    import pathlib

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX semantics")

S1: Rel = (".fstx", "tx-1", "s1")
S2: Rel = (".fstx", "tx-1", "s2")


@pytest.fixture
def fs(root: pathlib.Path) -> Iterator[RootFS]:
    make_tree(
        root,
        {
            "a/x": b"ax",
            "a/y": b"ay",
            "a/sub/z": b"z",
            "b/k": b"bk",
            "f": b"file",
            ".fstx/tx-1/s1/new": b"staged",
            ".fstx/tx-1/s1/inner/deep": b"d",
            ".fstx/tx-1/s2": b"staged file",
        },
    )
    tree = RootFS(str(root))
    yield tree
    tree.close()


@pytest.fixture
def model(fs: RootFS) -> PlannedTree:
    return PlannedTree(fs)


def test_untouched_paths_are_themselves(model: PlannedTree, root: pathlib.Path) -> None:
    for path in [("a",), ("a", "x"), ("missing",), ("a", "no", "such")]:
        assert model.locate(path) == path
    assert model.listdir(("a",)) == ["sub", "x", "y"]
    assert model.listdir(()) == [".fstx", "a", "b", "f"]
    st_ = model.lstat(("a", "x"))
    assert st_ is not None
    assert st_.st_ino == os.lstat(root / "a/x").st_ino
    assert model.lstat(("missing",)) is None
    assert model.is_dir(("a",))
    assert not model.is_dir(("f",))
    assert not model.is_dir(("missing",))


def test_set_to_a_staged_item(model: PlannedTree, root: pathlib.Path) -> None:
    model.set(("c",), S1)
    assert model.locate(("c",)) == S1
    assert model.locate(("c", "new")) == (*S1, "new")
    assert model.locate(("c", "inner", "deep")) == (*S1, "inner", "deep")
    assert model.listdir(()) == [".fstx", "a", "b", "c", "f"]
    assert model.listdir(("c",)) == ["inner", "new"]
    st_ = model.lstat(("c", "new"))
    assert st_ is not None
    assert st_.st_ino == os.lstat(root / ".fstx/tx-1/s1/new").st_ino
    assert model.is_dir(("c",))


def test_set_replaces_a_whole_subtree(model: PlannedTree) -> None:
    model.set(("a",), S1)
    assert model.locate(("a", "x")) == (*S1, "x")
    assert model.lstat(("a", "x")) is None  # the staged tree has no x
    assert model.listdir(("a",)) == ["inner", "new"]


def test_set_absent(model: PlannedTree) -> None:
    model.set(("a",), None)
    for path in [("a",), ("a", "x"), ("a", "sub", "z")]:
        assert model.locate(path) is None
        assert model.lstat(path) is None
    assert model.listdir(()) == [".fstx", "b", "f"]
    assert model.listdir(("a",)) == []
    assert not model.is_dir(("a",))


def test_set_below_a_set_parent(model: PlannedTree) -> None:
    model.set(("a",), S1)
    model.set(("a", "new"), None)
    model.set(("a", "extra"), S2)
    assert model.locate(("a", "new")) is None
    assert model.locate(("a", "extra")) == S2
    assert model.locate(("a", "inner")) == (*S1, "inner")
    assert model.listdir(("a",)) == ["extra", "inner"]


def test_set_parent_forgets_what_was_planned_below(model: PlannedTree) -> None:
    model.set(("a", "x"), S2)
    model.set(("a", "fresh"), S2)
    model.set(("a",), None)
    assert model.locate(("a", "x")) is None
    assert model.locate(("a", "fresh")) is None
    model.set(("a",), S1)
    assert model.locate(("a", "x")) == (*S1, "x")
    assert model.listdir(("a",)) == ["inner", "new"]


def test_move_takes_the_planned_subtree_along(model: PlannedTree) -> None:
    model.set(("a", "x"), S2)
    model.set(("a", "y"), None)
    model.move(("a",), ("m",))
    assert model.locate(("m",)) == ("a",)
    assert model.locate(("m", "x")) == S2
    assert model.locate(("m", "y")) is None
    assert model.locate(("m", "sub", "z")) == ("a", "sub", "z")
    for path in [("a",), ("a", "x"), ("a", "sub")]:
        assert model.locate(path) is None
    assert model.listdir(("m",)) == ["sub", "x"]
    assert model.listdir(()) == [".fstx", "b", "f", "m"]


def test_chained_moves(model: PlannedTree) -> None:
    model.move(("f",), ("g",))
    model.move(("g",), ("h",))
    model.move(("h",), ("a", "h"))
    assert model.locate(("a", "h")) == ("f",)
    for path in [("f",), ("g",), ("h",)]:
        assert model.locate(path) is None
    assert model.listdir(("a",)) == ["h", "sub", "x", "y"]


def test_swap_through_a_temporary_name(model: PlannedTree) -> None:
    model.move(("a",), ("t",))
    model.move(("b",), ("a",))
    model.move(("t",), ("b",))
    assert model.locate(("a",)) == ("b",)
    assert model.locate(("a", "k")) == ("b", "k")
    assert model.locate(("b", "x")) == ("a", "x")
    assert model.locate(("t",)) is None
    assert model.listdir(("a",)) == ["k"]
    assert model.listdir(("b",)) == ["sub", "x", "y"]


def test_move_out_of_a_moved_directory(model: PlannedTree) -> None:
    model.move(("a",), ("m",))
    model.move(("m", "x"), ("out",))
    assert model.locate(("out",)) == ("a", "x")
    assert model.locate(("m", "x")) is None
    assert model.locate(("a", "x")) is None
    assert model.listdir(("m",)) == ["sub", "y"]


def test_move_into_a_deleted_name_and_of_a_set_item(model: PlannedTree) -> None:
    model.set(("a",), None)
    model.move(("b",), ("a",))
    assert model.locate(("a", "k")) == ("b", "k")
    assert model.locate(("a", "x")) == ("b", "x")
    assert model.lstat(("a", "x")) is None  # the old a/x went with the old a
    assert model.listdir(("a",)) == ["k"]
    model.set(("n",), S2)
    model.move(("n",), ("b",))
    assert model.locate(("b",)) == S2
    assert model.locate(("n",)) is None


def test_move_below_a_set_ancestor(model: PlannedTree) -> None:
    model.set(("c",), S1)
    model.set(("c", "inner", "planned"), S2)
    model.move(("c", "inner"), ("d",))
    assert model.locate(("d",)) == (*S1, "inner")
    assert model.locate(("d", "deep")) == (*S1, "inner", "deep")
    assert model.locate(("d", "planned")) == S2
    assert model.locate(("c", "inner")) is None
    assert model.listdir(("c",)) == ["new"]
    assert model.listdir(("d",)) == ["deep", "planned"]


# -- a reference that replays the operations backwards ------------------------------

NAMES = ("p", "q", "r")
UNIVERSE: List[Rel] = [()]
for _ in range(4):
    UNIVERSE += [(*path, n) for path in UNIVERSE if len(path) == _ for n in NAMES]
UNIVERSE.remove(())

Op = Tuple[str, Rel, Optional[Rel]]


def _under(path: Rel, top: Rel) -> bool:
    return path[: len(top)] == top


def reference(ops: List[Op], path: Rel) -> Optional[Rel]:
    """Where ``path`` is after ``ops``, found by walking the operations backwards."""
    for kind, a, b in reversed(ops):
        if kind == "set" and _under(path, a):
            return None if b is None else b + path[len(a) :]
        if kind == "move":
            assert b is not None
            if _under(path, b):
                path = a + path[len(b) :]  # it was at the source before the move
            elif _under(path, a):
                return None  # moved away
    return path


_paths = st.sampled_from([p for p in UNIVERSE if len(p) <= 3])
_staged = st.integers(1, 5).map(lambda n: (".fstx", "tx-1", f"s{n}"))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), _paths, st.none() | _staged),
        st.tuples(st.just("move"), _paths, _paths).filter(
            lambda op: not _under(op[1], op[2]) and not _under(op[2], op[1])
        ),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_locate_matches_a_backward_replay(ops: List[Op]) -> None:
    model = PlannedTree(None)  # type: ignore[arg-type] # locate never looks at the disk
    for kind, a, b in ops:
        if kind == "set":
            model.set(a, b)
        else:
            assert b is not None
            model.move(a, b)
    for path in UNIVERSE:
        assert model.locate(path) == reference(ops, path), (path, ops)
