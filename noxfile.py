"""The version matrix: the test suite, less the slow sweeps, on each other Python.

3.11 is covered by the full run in ``.ci/run``. Interpreters come from PATH,
or from pyenv (``~/.pyenv/versions/3.X.*``) when PATH has none: pyenv's
shims refuse versions that are installed but not selected.
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

VERSIONS = ["3.9", "3.10", "3.12", "3.13"]

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"


def _release(exe: str) -> list[int]:
    """``[3, 10, 13]`` for ``~/.pyenv/versions/3.10.13/bin/python3.10``."""
    version = exe.split(os.sep)[-3]
    return [int(part) if part.isdigit() else -1 for part in version.split(".")]


def _pyenv_bins() -> list[str]:
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = []
    for version in VERSIONS:
        exe = f"python{version}"
        usable = shutil.which(exe)
        if usable and os.sep + "shims" + os.sep not in usable:
            continue
        pattern = os.path.join(root, "versions", f"{version}.*", "bin", exe)
        candidates = sorted(glob.glob(pattern), key=_release)
        if candidates:
            found.append(os.path.dirname(candidates[-1]))
    return found


os.environ["PATH"] = os.pathsep.join([*_pyenv_bins(), os.environ.get("PATH", "")])


# Stress and kill-sweep suites: they test timing and processes, not the Python
# version, and they are the bulk of the suite's time. The full run covers them.
STRESS_SUITES = [
    "tests/test_readers.py",
    "tests/test_concurrency.py",
    "tests/test_atomic_concurrency.py",
]
STRESS_TESTS = "killed_at_any_moment"  # kill sweeps not marked slow (yet)


@nox.session(python=VERSIONS)
def tests(session: nox.Session) -> None:
    """Install fstx (not editable) with its test extras and run the fast suite."""
    session.install(".[test]")
    ignored = [f"--ignore={path}" for path in STRESS_SUITES]
    session.run(
        "python", "-m", "pytest", "-n", "2", "-p", "no:cacheprovider",
        "-m", "not slow and not fuse and not root", "-k", f"not {STRESS_TESTS}",
        *ignored, *session.posargs,
    )  # fmt: skip
