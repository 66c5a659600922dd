"""The ``fstx`` command: every subcommand, its exit status, messages and JSON."""

from __future__ import annotations

import base64
import errno
import functools
import importlib
import io
import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap
import types
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import pytest

import fstx
from fstx import _cli
from fstx._cli import Progress, main
from treeutil import assert_clean, installed, make_tree, snapshot

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and names")


@attrs.frozen
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``main(argv)`` in this process; its exit status and what it printed."""

    def call(*argv: object) -> Result:
        capsys.readouterr()
        code = main(
            [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv]
        )
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


def run_process(*argv: object, cwd: Optional[pathlib.Path] = None) -> Result:
    """Run ``python -m fstx`` as a real process (stdin closed, output piped)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fstx", *map(str, argv)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_paragraph(err: str, *words: str) -> None:
    """A failure message: one line on stderr, no traceback, naming what it must."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, err)


def write_plan(where: pathlib.Path, plan: object) -> pathlib.Path:
    path = where / "plan.json"
    path.write_text(
        plan if isinstance(plan, str) else json.dumps(plan), encoding="utf-8"
    )
    return path


EXAMPLE_TREE = {
    "bin": "dir",
    "bin/hello": "file",
    "lib": "dir",
    "lib/site-packages": "dir",
    "lib/site-packages/hello": "dir",
    "lib/site-packages/hello/__init__.py": "file",
    "lib/site-packages/hello/__main__.py": "file",
    "lib/site-packages/hello-1.0.dist-info": "dir",
    "lib/site-packages/hello-1.0.dist-info/METADATA": "file",
    "lib/site-packages/hello-1.0.dist-info/RECORD": "file",
    "var": "dir",
    "var/cache": "dir",
    "var/cache/hello": "dir",
}


def kinds(root: pathlib.Path) -> Dict[str, str]:
    return {path: entry[0] for path, entry in snapshot(root).items()}


# -- apply ---------------------------------------------------------------------


def test_apply_example_creates_root_and_installs(
    run: Run, tmp_path: pathlib.Path
) -> None:
    root = tmp_path / "missing" / "demo"
    result = run("apply", EXAMPLES / "plan.json", "--root", root)
    assert result.code == 0, result.err
    assert result.out.startswith("applied 6 operation(s) under ")
    assert result.err == ""
    assert kinds(root) == EXAMPLE_TREE
    assert (root / "lib/site-packages/hello/__init__.py").read_bytes() == (
        EXAMPLES / "hello/__init__.py"
    ).read_bytes()
    if sys.platform != "win32":
        assert stat.S_IMODE((root / "bin/hello").stat().st_mode) == 0o755
        assert (
            stat.S_IMODE((root / "var/cache/hello").stat().st_mode) == 0o700 & ~_umask()
        )
    assert_clean(root)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_apply_example_twice_is_an_upgrade(run: Run, tmp_path: pathlib.Path) -> None:
    root = tmp_path / "demo"
    assert run("apply", EXAMPLES / "plan.json", "--root", root).code == 0
    (root / "lib/site-packages/hello/stale.pyc").write_bytes(b"old")
    assert run("apply", EXAMPLES / "plan.json", "--root", root).code == 0
    assert kinds(root) == EXAMPLE_TREE
    assert_clean(root)


@posix_only
def test_every_operation(run: Run, root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    plans = tmp_path / "plans"
    make_tree(
        plans, {"payload/a.txt": b"A", "payload/sub/b.txt": b"B", "single.txt": b"S"}
    )
    os.symlink("single.txt", plans / "link")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"O")
    make_tree(root, {"old.txt": b"old", "gone/x": b"x", "keep.txt": b"k"})
    plan = write_plan(
        plans,
        [
            {"op": "copy", "src": "payload", "dst": "tree"},  # relative to the plan
            {"op": "copy", "src": str(outside), "dst": "abs.txt"},
            {"op": "copy", "src": "link", "dst": "link-copy"},
            {"op": "copy", "src": "link", "dst": "followed", "follow_symlinks": True},
            {"op": "rename", "src": "old.txt", "dst": "new/place.txt"},
            {"op": "delete", "path": "gone"},
            {"op": "delete", "path": "never-was", "missing_ok": True},
            {"op": "write", "dst": "t.txt", "text": "héllo\n"},
            {"op": "write", "dst": "l1.txt", "text": "é", "encoding": "latin-1"},
            {
                "op": "write",
                "dst": "b.bin",
                "base64": base64.b64encode(b"\0\1\2").decode(),
            },
            {"op": "write", "dst": "x.sh", "text": "#!/bin/sh\n", "mode": "0o750"},
            {"op": "mkdir", "path": "d/e", "mode": "700"},
            {"op": "chmod", "path": "keep.txt", "mode": "600"},
            {
                "op": "chmod",
                "path": "tree/a.txt",
                "mode": 0o640,
            },  # an int is the number
        ],
    )
    result = run("apply", plan, "--root", root, "--durability", "none")
    assert result.code == 0, result.err
    got = snapshot(root, inodes=False)
    assert got["tree/a.txt"] == ("file", 0o640, b"A")
    assert got["tree/sub/b.txt"][2] == b"B"
    assert got["abs.txt"][2] == b"O"
    assert got["link-copy"] == ("link", "single.txt")
    assert got["followed"][0:3:2] == ("file", b"S")
    assert got["new/place.txt"][2] == b"old"
    assert not {"old.txt", "gone", "gone/x"} & set(got)
    assert got["t.txt"][2] == "héllo\n".encode()
    assert got["l1.txt"][2] == b"\xe9"
    assert got["b.bin"][2] == b"\0\1\2"
    assert got["x.sh"][1] == 0o750
    assert got["d/e"] == ("dir", 0o700 & ~_umask())
    assert got["keep.txt"] == ("file", 0o600, b"k")
    assert_clean(root)


@posix_only
def test_non_utf8_name_round_trips(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    plan = write_plan(tmp_path, [{"op": "write", "dst": "caf\udcff", "text": "x"}])
    assert run("apply", plan, "--root", root).code == 0
    assert sorted(os.listdir(os.fsencode(root))) == [b".fstx", b"caf\xff"]


def test_copy_source_beside_the_plan_wins_over_the_root(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    make_tree(tmp_path, {"shipped.txt": b"from the plan"})
    make_tree(root, {"shipped.txt": b"from the root", "inside.txt": b"inside"})
    plan = write_plan(
        tmp_path,
        [
            {"op": "copy", "src": "shipped.txt", "dst": "a"},  # beside the plan
            {"op": "copy", "src": "inside.txt", "dst": "b"},  # only in the root
            {"op": "write", "dst": "made.txt", "text": "planned"},
            {"op": "copy", "src": "made.txt", "dst": "c"},  # planned in the root
        ],
    )
    result = run("apply", plan, "--root", root)
    assert result.code == 0, result.err
    assert (root / "a").read_bytes() == b"from the plan"
    assert (root / "b").read_bytes() == b"inside"
    assert (root / "c").read_bytes() == b"planned"
    assert_clean(root)


def test_plan_from_stdin_takes_sources_from_cwd(
    run: Run,
    root: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "src.txt").write_bytes(b"from cwd")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "stdin", io.StringIO('[{"op": "copy", "src": "src.txt", "dst": "c"}]')
    )
    assert run("apply", "-", "--root", root).code == 0
    assert (root / "c").read_bytes() == b"from cwd"


def test_empty_plan_commits_nothing(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    result = run("apply", write_plan(tmp_path, []), "--root", root, "--json")
    assert result.code == 0
    assert result.json()["operations"] == 0
    assert snapshot(root) == {}
    assert_clean(root)


def test_apply_json_and_quiet(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    plan = write_plan(tmp_path, [{"op": "write", "dst": "a", "text": "1"}])
    result = run("apply", plan, "--root", root, "--json")
    assert result.code == 0
    report = result.json()
    assert report["root"] == str(root)
    assert report["operations"] == 1
    assert report["deferred"] == []
    assert report["retries"] == 0
    assert report["elapsed"] >= 0
    for argv in (
        ("-q", "apply", plan, "--root", root),
        ("apply", plan, "--root", root, "--quiet"),
    ):
        quiet = run(*argv)
        assert (quiet.code, quiet.out, quiet.err) == (0, "", "")


def test_dry_run_changes_nothing(run: Run, tmp_path: pathlib.Path) -> None:
    root = tmp_path / "not-yet"
    result = run("apply", EXAMPLES / "plan.json", "--root", root, "--dry-run")
    assert result.code == 0, result.err
    assert "write bin/hello (mode 755)" in result.out
    assert result.out.rstrip().endswith(
        "dry run: 6 operation(s) planned, nothing changed"
    )
    assert not root.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    listed = run(
        "apply", EXAMPLES / "plan.json", "--root", existing, "--dry-run", "--json"
    )
    assert len(listed.json()["operations"]) == 6
    assert snapshot(existing) == {}
    assert_clean(existing)


MALFORMED: List[Any] = [
    pytest.param("[{]", "not valid JSON", id="bad-json"),
    pytest.param(
        {"op": "copy"},
        "a plan is a JSON list of operations, not an object",
        id="not-a-list",
    ),
    pytest.param(
        ["copy"],
        "plan.json[0]: an entry must be an object, not a string",
        id="entry-string",
    ),
    pytest.param(
        [{"src": "a", "dst": "b"}], 'plan.json[0]: "op" is missing', id="no-op"
    ),
    pytest.param(
        [{"op": "move", "src": "a", "dst": "b"}],
        "\"op\" is 'move'; expected one of copy",
        id="unknown-op",
    ),
    pytest.param(
        [{"op": "copy", "src": "a"}],
        'plan.json[0] (copy): missing "dst"',
        id="missing-field",
    ),
    pytest.param(
        [{"op": "delete", "path": "a", "recursive": True}],
        'unknown "recursive"',
        id="unknown-field",
    ),
    pytest.param(
        [{"op": "delete", "path": 3}],
        '"path" must be a non-empty string, not a number',
        id="path-number",
    ),
    pytest.param(
        [{"op": "delete", "path": ""}],
        '"path" must be a non-empty string',
        id="path-empty",
    ),
    pytest.param(
        [{"op": "delete", "path": "a", "missing_ok": "yes"}],
        '"missing_ok" must be true or false',
        id="flag-string",
    ),
    pytest.param(
        [{"op": "chmod", "path": "a", "mode": "rwx"}],
        "'rwx' is not an octal mode",
        id="mode-letters",
    ),
    pytest.param(
        [{"op": "chmod", "path": "a", "mode": "789"}],
        "'789' is not an octal mode",
        id="mode-not-octal",
    ),
    pytest.param(
        [{"op": "chmod", "path": "a", "mode": "17777"}],
        "outside 0..0o7777",
        id="mode-too-big",
    ),
    pytest.param(
        [{"op": "chmod", "path": "a", "mode": -1}],
        "outside 0..0o7777",
        id="mode-negative",
    ),
    pytest.param(
        [{"op": "chmod", "path": "a", "mode": True}], "not a boolean", id="mode-bool"
    ),
    pytest.param(
        [{"op": "chmod", "path": "a", "mode": 7.5}], "not a number", id="mode-float"
    ),
    pytest.param(
        [{"op": "write", "dst": "a"}],
        'exactly one of "text" and "base64"',
        id="write-no-content",
    ),
    pytest.param(
        [{"op": "write", "dst": "a", "text": "", "base64": ""}],
        'exactly one of "text" and "base64"',
        id="write-both",
    ),
    pytest.param(
        [{"op": "write", "dst": "a", "text": 5}],
        '"text" must be a string',
        id="text-number",
    ),
    pytest.param(
        [{"op": "write", "dst": "a", "base64": "!!"}],
        '"base64" is not valid base64',
        id="bad-base64",
    ),
    pytest.param(
        [{"op": "write", "dst": "a", "base64": "", "encoding": "ascii"}],
        '"encoding" goes with "text"',
        id="encoding-base64",
    ),
    pytest.param(
        [{"op": "write", "dst": "a", "text": "", "encoding": "klingon"}],
        "not a known codec",
        id="bad-encoding",
    ),
]


@pytest.mark.parametrize(("plan", "message"), MALFORMED)
def test_malformed_plan_exits_2_and_changes_nothing(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path, plan: object, message: str
) -> None:
    make_tree(root, {"a": b"keep"})
    before = snapshot(root)
    # A valid first entry proves that nothing is applied before the whole plan parses.
    if isinstance(plan, list):
        plan = [{"op": "write", "dst": "first", "text": "x"}, *plan]
        message = message.replace("plan.json[0]", "plan.json[1]")
    path = write_plan(tmp_path, plan)
    result = run("apply", path, "--root", root)
    assert result.code == 2
    assert result.out == ""
    assert_one_paragraph(result.err, "fstx apply: error:", str(path), message)
    assert snapshot(root) == before
    assert_clean(root)


def test_malformed_plan_does_not_create_root(run: Run, tmp_path: pathlib.Path) -> None:
    root = tmp_path / "root"
    result = run("apply", write_plan(tmp_path, "[1]"), "--root", root)
    assert result.code == 2
    assert not root.exists()


def test_unreadable_plan_is_bad_usage(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    result = run("apply", tmp_path / "nope.json", "--root", root)
    assert result.code == 2
    assert_one_paragraph(result.err, "cannot read plan", "nope.json", "No such file")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"op": "write", "dst": "\xe9", "text": ""}]')
    assert run("apply", latin, "--root", root).code == 2


def test_refused_operation_exits_1_and_changes_nothing(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    make_tree(root, {"a": b"keep", "dir/b": b"b"})
    before = snapshot(root)
    plan = write_plan(
        tmp_path,
        [
            {"op": "write", "dst": "a", "text": "changed"},
            {"op": "delete", "path": "dir"},
            {"op": "copy", "src": "missing.txt", "dst": "c"},
        ],
    )
    result = run("apply", plan, "--root", root)
    assert result.code == 1
    assert result.out == ""
    assert_one_paragraph(
        result.err, "plan.json[2] (copy)", "cannot copy 'missing.txt'", "does not exist",
        f"looked for beside the plan file ({str(tmp_path)!r}), then in the root",
        "nothing under", "was changed",
    )  # fmt: skip
    assert snapshot(root) == before
    assert_clean(root)


def test_path_outside_root_exits_1(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    plan = write_plan(tmp_path, [{"op": "write", "dst": "../escape", "text": "x"}])
    result = run("apply", plan, "--root", root)
    assert result.code == 1
    assert_one_paragraph(result.err, "cannot write '../escape'", "outside the root")
    assert not (tmp_path / "escape").exists()


def test_failed_plan_removes_the_root_it_created(
    run: Run, tmp_path: pathlib.Path
) -> None:
    root = tmp_path / "new" / "root"
    plan = write_plan(tmp_path, [{"op": "delete", "path": "nothing-here"}])
    result = run("apply", plan, "--root", root)
    assert result.code == 1
    assert_one_paragraph(result.err, "cannot delete 'nothing-here'", "does not exist")
    assert not (tmp_path / "new").exists()


def test_root_that_is_a_file_exits_1(run: Run, tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    plan = write_plan(tmp_path, [])
    result = run("apply", plan, "--root", tmp_path / "file")
    assert result.code == 1
    assert_one_paragraph(result.err, "file", "not a directory")


class FailFirstRename:
    """Raise EIO at the first rename (or exchange), once: the rollback works.

    Planning never renames (it stages by copying); the first rename is the
    commit's first step, after the journal says "committing".
    """

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, name: str, phase: str, args: Tuple[Any, ...]) -> None:
        if phase == "before" and name in ("rename", "exchange") and not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "Input/output error (injected)")


@posix_only
def test_failed_commit_exits_1_and_rolls_back(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    make_tree(root, {"a": b"old", "b": b"b"})
    before = snapshot(root)
    plan = write_plan(
        tmp_path,
        [
            {"op": "write", "dst": "new", "text": "n"},
            {"op": "write", "dst": "a", "text": "x"},
        ],
    )
    with installed(FailFirstRename()):
        result = run("apply", plan, "--root", root)
    assert result.code == 1
    assert_one_paragraph(
        result.err, "fstx apply: commit failed during write", str(root / "a"),
        "Input/output error", "rolled back",
    )  # fmt: skip
    assert snapshot(root) == before
    assert_clean(root)


def test_lock_timeout(run: Run, root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    plan = write_plan(tmp_path, [{"op": "write", "dst": "a", "text": "x"}])
    holder = fstx.transaction(root)
    try:
        result = run("apply", plan, "--root", root, "--lock-timeout", "0.05", "-q")
        chatty = run("apply", plan, "--root", root, "--lock-timeout", "0.05")
    finally:
        holder.rollback()
    assert (result.code, chatty.code) == (1, 1)
    assert "fstx: waiting for another fstx transaction" in chatty.err
    assert_one_paragraph(
        result.err, f"cannot lock {str(root)!r}", "another fstx transaction"
    )
    assert snapshot(root) == {}
    assert_clean(root)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param((), id="no-command"),
        pytest.param(("frobnicate",), id="unknown-command"),
        pytest.param(("status",), id="status-no-root"),
        pytest.param(("apply", "plan.json"), id="apply-no-root"),
        pytest.param(
            ("apply", "plan.json", "--root", "r", "--durability", "some"),
            id="bad-durability",
        ),
        pytest.param(
            ("apply", "plan.json", "--root", "r", "--lock-timeout", "-1"),
            id="negative-timeout",
        ),
        pytest.param(
            ("apply", "plan.json", "--root", "r", "--lock-timeout", "soon"),
            id="word-timeout",
        ),
        pytest.param(("install", "--prefix", "p"), id="install-no-wheel"),
        pytest.param(("install", "x.whl"), id="install-no-prefix"),
    ],
)
def test_bad_usage_exits_2(
    run: Run,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: Sequence[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(*argv)
    assert result.code == 2
    assert result.out == ""
    assert "usage: fstx" in result.err
    assert "error:" in result.err
    assert "Traceback" not in result.err
    assert os.listdir(tmp_path) == []


def test_help_and_version(run: Run) -> None:
    top = run("--help")
    assert top.code == 0
    for command in ("status", "recover", "apply", "install", "Exit status"):
        assert command in top.out
    apply_help = run("apply", "--help")
    assert apply_help.code == 0
    assert (
        "looked for first relative to\nthe directory of the plan file" in apply_help.out
    )
    version = run("--version")
    assert (version.code, version.out.strip()) == (0, f"fstx {fstx.__version__}")


# -- progress --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_terminal_waits_then_redraws_in_place() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(stream, tty=True, clock=clock)
    progress.begin("committing")
    progress(1, 10)
    clock.now += 0.4
    progress(2, 10)
    assert stream.getvalue() == ""  # a quick commit draws nothing
    clock.now += 0.2
    progress(3, 10)
    clock.now += 0.01
    progress(4, 10)  # too soon after the last redraw
    clock.now += 0.2
    progress(10, 10)
    progress.close()
    line1, line2 = "fstx: committing 3/10 (30%)", "fstx: committing 10/10 (100%)"
    assert stream.getvalue() == f"\r{line1}\r{line2}\r{' ' * len(line2)}\r"


def test_progress_in_a_log_writes_plain_lines_rarely() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(stream, tty=False, clock=clock)
    progress.begin("committing")
    for done in range(1, 101):
        clock.now += 0.125  # exact in binary: no rounding at the thresholds
        progress(done, 100)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines == [
        "fstx: committing 4/100 (4%)",  # 0.5 s in
        "fstx: committing 20/100 (20%)",  # then every 2 s
        "fstx: committing 36/100 (36%)",
        "fstx: committing 52/100 (52%)",
        "fstx: committing 68/100 (68%)",
        "fstx: committing 84/100 (84%)",
        "fstx: committing 100/100 (100%)",  # and the end
    ]


def test_progress_disabled_or_quick_draws_nothing() -> None:
    clock, stream = FakeClock(), io.StringIO()
    quiet = Progress(stream, tty=True, enabled=False, clock=clock)
    clock.now += 10
    quiet(1, 1)
    quick = Progress(stream, tty=True, clock=clock)
    quick(1, 1)
    quick.close()
    assert stream.getvalue() == ""


def test_apply_reports_progress_on_stderr(
    run: Run,
    root: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eager = functools.partial(Progress, tty=False, delay=0.0, log_every=0.0)
    monkeypatch.setattr(_cli, "Progress", eager)
    plan = write_plan(
        tmp_path, [{"op": "write", "dst": f"f{i}", "text": str(i)} for i in range(5)]
    )
    result = run("apply", plan, "--root", root)
    assert result.code == 0
    lines = result.err.splitlines()
    assert "fstx: planning 5/5 (100%)" in lines
    assert lines[-1] == "fstx: committing 5/5 (100%)"
    assert "\r" not in result.err
    quiet = run("apply", plan, "--root", root, "-q")
    assert quiet.err == ""


# -- status and recover ----------------------------------------------------------


def test_status_and_recover_of_a_clean_root(run: Run, root: pathlib.Path) -> None:
    status = run("status", root)
    assert status.code == 0
    assert status.out.splitlines() == [
        f"root:     {root}", "pending:  no", "deferred: none", "clean:    yes",
    ]  # fmt: skip
    assert run("status", root, "--json").json() == {
        "root": str(root), "clean": True, "pending": False, "deferred": [],
    }  # fmt: skip
    recover = run("recover", root)
    assert (recover.code, recover.out.strip()) == (
        0,
        f"nothing to recover under {root}",
    )
    assert run("--json", "recover", root).json() == {
        "root": str(root), "rolled_back": False, "rolled_forward": False,
        "purged": 0, "deferred": [],
    }  # fmt: skip
    assert run("-q", "status", root).out == ""


@pytest.mark.parametrize("command", ["status", "recover"])
def test_status_and_recover_of_a_missing_root_exit_1(
    run: Run, tmp_path: pathlib.Path, command: str
) -> None:
    result = run(command, tmp_path / "nowhere")
    assert result.code == 1
    assert_one_paragraph(result.err, f"fstx {command}:", "nowhere", "not a directory")
    assert not (tmp_path / "nowhere").exists()


CRASH_CHILD = textwrap.dedent(
    """
    import os, sys
    import fstx
    from fstx import _os

    renames = 0

    def crash(name, phase, args):
        global renames
        if phase == "before" and name in ("rename", "exchange"):
            renames += 1
            if renames == 2:  # the first step is done, the second is not
                os._exit(9)

    with fstx.transaction(sys.argv[1], durability="none") as tx:
        tx.write_text("a.txt", "new")
        tx.delete("b.txt")
        _os.set_hook(crash)
    """
)


def crash_mid_commit(root: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(root)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 9, proc.stderr


def test_status_and_recover_after_a_crash(run: Run, root: pathlib.Path) -> None:
    make_tree(root, {"a.txt": b"old", "b.txt": b"b"})
    before = snapshot(root)
    crash_mid_commit(root)
    assert (
        root / "a.txt"
    ).read_bytes() == b"new"  # the crash left the tree half-changed

    status = run("status", root)
    assert status.code == 0  # looking succeeded; the root is just not clean
    assert "pending:  yes" in status.out
    assert "clean:    no" in status.out
    assert f"fstx recover {root}" in status.out
    assert run("status", root, "--json").json() == {
        "root": str(root), "clean": False, "pending": True, "deferred": [],
    }  # fmt: skip
    assert (root / "a.txt").read_bytes() == b"new"  # status changes nothing

    recover = run("recover", root)
    assert recover.code == 0
    assert recover.out.strip() == f"rolled back an interrupted transaction under {root}"
    assert snapshot(root) == before
    assert_clean(root)
    assert run("status", root, "--json").json()["clean"] is True
    assert run("recover", root, "--json").json()["rolled_back"] is False


def test_recover_after_a_crash_as_json(run: Run, root: pathlib.Path) -> None:
    make_tree(root, {"a.txt": b"old", "b.txt": b"b"})
    before = snapshot(root)
    crash_mid_commit(root)
    report = run("recover", root, "--json").json()
    assert report == {
        "root": str(root), "rolled_back": True, "rolled_forward": False,
        "purged": 0, "deferred": [],
    }  # fmt: skip
    assert snapshot(root) == before


def _backups_busy(name: str, phase: str, args: Tuple[Any, ...]) -> None:
    # The old file cannot be removed from staging after the commit point (its
    # backup link "b…", or the staged name "s…" it was swapped to), as if
    # another process held it open (EBUSY), so it goes to the trash.
    if (
        phase == "before"
        and name == "unlink"
        and "tx-" in str(args[0])
        and args[1].startswith(("b", "s"))
    ):
        raise OSError(errno.EBUSY, "Device or resource busy (injected)")


@posix_only
def test_deferred_files_in_apply_status_and_recover(
    run: Run, root: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    make_tree(root, {"tool": b"v1"})
    plan = write_plan(tmp_path, [{"op": "write", "dst": "tool", "text": "v2"}])
    with installed(_backups_busy):
        applied = run("apply", plan, "--root", root)
    assert applied.code == 0, applied.err
    assert "deferred: 1 old file(s) still in use" in applied.out
    assert f"  {root / 'tool'}" in applied.out
    assert "fstx: " in applied.err  # the engine's warning about the deferral
    assert (root / "tool").read_bytes() == b"v2"

    status = run("status", root, "--json").json()
    assert status == {
        "root": str(root),
        "clean": False,
        "pending": False,
        "deferred": [str(root / "tool")],
    }
    human = run("status", root).out
    assert "deferred: 1" in human
    assert f"  {root / 'tool'}" in human

    recover = run("recover", root)
    assert recover.code == 0
    assert "removed 1 deferred item(s) from the trash" in recover.out
    assert run("status", root, "--json").json()["clean"] is True
    assert_clean(root)


def test_damaged_journal_exits_1(run: Run, root: pathlib.Path) -> None:
    make_tree(root, {"a.txt": b"old", "b.txt": b"b"})
    crash_mid_commit(root)
    journal = next((root / ".fstx").glob("*.journal"))
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[0] = b"00000000" + lines[0][8:]  # a bad checksum on the header
    journal.write_bytes(b"".join(lines))
    result = run("recover", root)
    assert result.code == 1
    assert_one_paragraph(
        result.err, "fstx recover:", "cannot read journal", "Nothing was changed"
    )


# -- unexpected errors -----------------------------------------------------------


def test_interrupt_exits_130(
    run: Run, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(path: object) -> fstx.Status:
        raise KeyboardInterrupt

    monkeypatch.setattr(fstx, "status", interrupted)
    result = run("status", root)
    assert result.code == 130
    assert_one_paragraph(result.err, "fstx status: interrupted")


def test_unexpected_error_is_one_paragraph_unless_debugging(
    run: Run, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: object) -> fstx.Status:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(fstx, "status", broken)
    monkeypatch.delenv("FSTX_DEBUG", raising=False)
    result = run("status", root)
    assert result.code == 1
    assert_one_paragraph(
        result.err, "unexpected RuntimeError: something broke", "FSTX_DEBUG=1"
    )
    monkeypatch.setenv("FSTX_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["status", str(root)])


# -- install ---------------------------------------------------------------------


@pytest.fixture
def fake_integration(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    calls: List[Dict[str, Any]] = []

    def install_wheels(
        prefix: str,
        wheels: Sequence[str],
        *,
        upgrade: bool = False,
        durability: str = "full",
    ) -> fstx.CommitReport:
        calls.append(
            {
                "prefix": prefix,
                "wheels": list(wheels),
                "upgrade": upgrade,
                "durability": durability,
            }
        )
        assert os.path.isdir(prefix)
        return fstx.CommitReport(operations=3, deferred=(), retries=0, elapsed=0.25)

    module = types.ModuleType("fstx.integrations.installer")
    module.install_wheels = install_wheels  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fstx.integrations.installer", module)
    return calls


def test_install_calls_the_integration(
    run: Run,
    tmp_path: pathlib.Path,
    fake_integration: List[Dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    pathlib.Path("a-1.0-py3-none-any.whl").write_bytes(b"")
    pathlib.Path("b-2.0-py3-none-any.whl").write_bytes(b"")
    result = run(
        "install",
        "a-1.0-py3-none-any.whl",
        "b-2.0-py3-none-any.whl",
        "--prefix",
        "venv",
        "--upgrade",
        "--durability",
        "none",
    )
    assert result.code == 0, result.err
    assert fake_integration == [
        {
            "prefix": str(tmp_path / "venv"),
            "wheels": [
                str(tmp_path / "a-1.0-py3-none-any.whl"),
                str(tmp_path / "b-2.0-py3-none-any.whl"),
            ],
            "upgrade": True,
            "durability": "none",
        }
    ]
    assert result.out.startswith(
        "installed a-1.0-py3-none-any.whl, b-2.0-py3-none-any.whl: 3 operation(s)"
    )
    as_json = run(
        "install", "a-1.0-py3-none-any.whl", "--prefix", "venv", "--json"
    ).json()
    assert as_json["operations"] == 3
    assert fake_integration[-1]["upgrade"] is False
    assert fake_integration[-1]["durability"] == "full"


def test_install_failure_exits_1_and_removes_new_prefix(
    run: Run, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def install_wheels(
        prefix: str, wheels: Sequence[str], **kwargs: Any
    ) -> fstx.CommitReport:
        raise fstx.CommitError(
            "copy",
            os.path.join(prefix, "x"),
            f"commit failed during copy {prefix!r}: no space",
        )

    module = types.ModuleType("fstx.integrations.installer")
    module.install_wheels = install_wheels  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fstx.integrations.installer", module)
    wheel = tmp_path / "a-1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    result = run("install", wheel, "--prefix", tmp_path / "p")
    assert result.code == 1
    assert_one_paragraph(
        result.err, "fstx install: commit failed during copy", "no space"
    )
    assert not (tmp_path / "p").exists()


def test_install_without_installer_package_says_what_to_pip_install(
    run: Run, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if `installer` were not installed: importing it raises ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "installer", None)
    monkeypatch.delitem(sys.modules, "fstx.integrations.installer", raising=False)
    wheel = tmp_path / "a-1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    result = run("install", wheel, "--prefix", tmp_path / "p")
    assert result.code == 1
    assert_one_paragraph(
        result.err, "'installer' package is missing", "pip install fstx[installer]"
    )
    assert not (tmp_path / "p").exists()


def test_install_with_a_broken_integration_exits_1(
    run: Run, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def broken(name: str, package: Optional[str] = None) -> types.ModuleType:
        if name == "fstx.integrations.installer":
            raise ImportError("cannot import name 'x' from 'fstx'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", broken)
    result = run("install", tmp_path / "a.whl", "--prefix", tmp_path / "p")
    assert result.code == 1
    assert_one_paragraph(result.err, "cannot install wheels: cannot import name 'x'")


def _tiny_wheel(where: pathlib.Path, version: str) -> pathlib.Path:
    import hashlib

    name = f"tinypkg-{version}"
    files = {
        "tinypkg/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: tinypkg\nVersion: {version}\n".encode(),
        f"{name}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: fstx-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = (
            base64.urlsafe_b64encode(hashlib.sha256(data).digest())
            .rstrip(b"=")
            .decode()
        )
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}.dist-info/RECORD,,")
    files[f"{name}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = where / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def _real_integration() -> Optional[types.ModuleType]:
    try:
        module = importlib.import_module("fstx.integrations.installer")
    except ImportError:
        return None
    return module if hasattr(module, "install_wheels") else None


@pytest.mark.skipif(
    _real_integration() is None,
    reason="fstx.integrations.installer.install_wheels is not there yet",
)
def test_install_real_wheels(tmp_path: pathlib.Path) -> None:
    prefix = tmp_path / "venv"
    missing = run_process("install", tmp_path / "nope.whl", "--prefix", prefix)
    assert missing.code == 1
    assert_one_paragraph(missing.err, "cannot install", "nope.whl", "no wheel file")
    assert not prefix.exists()
    first = run_process("install", _tiny_wheel(tmp_path, "1.0"), "--prefix", prefix)
    assert first.code == 0, first.err
    inits = sorted(prefix.rglob("tinypkg/__init__.py"))
    assert len(inits) == 1
    assert inits[0].read_text() == "VERSION = '1.0'\n"
    again = run_process("install", _tiny_wheel(tmp_path, "2.0"), "--prefix", prefix)
    assert again.code == 1  # installed already, and no --upgrade
    assert_one_paragraph(again.err, "fstx install: cannot install", "tinypkg")
    upgraded = run_process(
        "install", _tiny_wheel(tmp_path, "2.0"), "--prefix", prefix, "--upgrade"
    )
    assert upgraded.code == 0, upgraded.err
    assert inits[0].read_text() == "VERSION = '2.0'\n"
    assert [p.name for p in prefix.rglob("tinypkg-*.dist-info")] == [
        "tinypkg-2.0.dist-info"
    ]
    assert_clean(prefix)


# -- as a real process -------------------------------------------------------------


def test_process_applies_the_example_quietly_in_a_pipe(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "demo"
    result = run_process("apply", EXAMPLES / "plan.json", "--root", root)
    assert result.code == 0, result.err
    assert result.err == ""  # no progress garbage in a pipe for a quick commit
    assert kinds(root) == EXAMPLE_TREE
    status = run_process("status", root, "--json")
    assert json.loads(status.out)["clean"] is True
    if sys.platform != "win32":
        hello = subprocess.run(
            [str(root / "bin/hello"), "fstx"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert hello.stdout == "hello, fstx, from hello 1.0\n"


def test_process_exit_statuses_without_tracebacks(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    usage = run_process("apply", "plan.json")
    assert usage.code == 2
    assert "the following arguments are required: --root" in usage.err
    malformed = run_process(
        "apply", write_plan(tmp_path, '[{"op": "copy"}]'), "--root", root
    )
    assert malformed.code == 2
    assert_one_paragraph(malformed.err, 'missing "src", "dst"')
    failing = run_process(
        "apply",
        write_plan(tmp_path, [{"op": "rename", "src": "a", "dst": "b"}]),
        "--root",
        root,
    )
    assert failing.code == 1
    assert_one_paragraph(
        failing.err,
        "plan.json[0] (rename): cannot rename 'a': the source does not exist",
    )
    assert snapshot(root) == {}


def test_process_status_and_recover_after_a_crash(root: pathlib.Path) -> None:
    make_tree(root, {"a.txt": b"old", "b.txt": b"b"})
    before = snapshot(root)
    crash_mid_commit(root)
    status = run_process("status", root, "--json")
    assert (status.code, json.loads(status.out)["pending"]) == (0, True)
    recover = run_process("recover", root, "--json")
    assert (recover.code, json.loads(recover.out)["rolled_back"]) == (0, True)
    assert snapshot(root) == before


def test_console_script_is_installed(tmp_path: pathlib.Path) -> None:
    script = pathlib.Path(sys.executable).with_name(
        "fstx.exe" if sys.platform == "win32" else "fstx"
    )
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    proc = subprocess.run(
        [str(script), "status", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "clean:    yes" in proc.stdout
