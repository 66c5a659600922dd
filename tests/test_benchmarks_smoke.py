"""The benchmark runner works end to end in its quickest mode, on tiny data.

It proves the workloads, baselines and the report run; the numbers of such a
run mean nothing, and no test here looks at a time.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
from typing import List

import pytest

TOP = pathlib.Path(__file__).resolve().parent.parent


def run_benchmarks(tmp_path: pathlib.Path, *args: str) -> str:
    out = tmp_path / "benchmarks.md"
    # The runner's data stays under tmp_path (--keep): deleting it here would
    # only add a slow clean-up to the test.
    cmd: List[str] = [
        sys.executable,
        "-m",
        "benchmarks",
        "--tiny",
        "--keep",
        "--workdir",
        str(tmp_path / "work"),
        "--output",
        str(out),
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=TOP, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out.read_text(encoding="utf-8")


def test_every_workload_runs_and_is_reported(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("installer")
    text = run_benchmarks(tmp_path, "--no-strace")
    for title in (
        "Install into an empty root",
        "Upgrade in place",
        "Wheel install, end to end",
        "cache writes of 4 KiB",
        "`recover()` on a clean root",
        "Scaling: one transaction",
    ):
        assert title in text
    assert "| target | measured" in text
    assert "python -m benchmarks --tiny" in text  # the command to reproduce
    assert "<!-- results:start -->" in text


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_fsync_calls_are_counted(tmp_path: pathlib.Path) -> None:
    text = run_benchmarks(tmp_path, "--only", "cache-full")
    rows = [
        line for line in text.splitlines() if line.startswith("| fstx.atomic_write")
    ]
    assert len(rows) == 1
    assert "fsync" in rows[0].split("|")[-2]  # the fsync column has a count
