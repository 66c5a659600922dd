"""The docs' examples run, and docs/api.md matches the docstrings."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys
from typing import List

import pytest

TOP = pathlib.Path(__file__).resolve().parent.parent
DOCS = [TOP / "README.md", *sorted((TOP / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks() -> List[object]:
    """Every ```python block of README.md and docs/*.md, with an id file:line."""
    found: List[object] = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{path.relative_to(TOP).as_posix()}:{line}"
            found.append(pytest.param(match.group(1), id=name))
    return found


def test_the_docs_have_examples() -> None:
    assert len(python_blocks()) >= 5


@pytest.mark.parametrize("code", python_blocks())
def test_example_runs(code: str, tmp_path: pathlib.Path) -> None:
    # A fresh process in an empty directory: each example stands on its own.
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_api_reference_is_up_to_date() -> None:
    # The reference includes fstx.integrations.installer, which needs `installer`.
    pytest.importorskip("installer")
    spec = importlib.util.spec_from_file_location(
        "gen_api", TOP / "docs" / "gen_api.py"
    )
    assert spec is not None
    assert spec.loader is not None
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    current = (TOP / "docs" / "api.md").read_text(encoding="utf-8")
    assert gen_api.render() == current, (
        "docs/api.md is out of date: run python docs/gen_api.py"
    )


def test_doc_links_resolve() -> None:
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), (
                f"{path.name} links to missing {target}"
            )
