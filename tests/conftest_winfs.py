"""Pytest plugin: the ``winfs`` fixture, a FUSE mount with Windows-like sharing rules.

Enable it with ``pytest_plugins = ["conftest_winfs"]`` in ``tests/conftest.py``
(or in one test module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import pytest

from fstx import _commit
from winfs import WinFS, mount, unavailable

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def windows_protocol() -> None:
    """Replace files the way fstx does on Windows, which has no atomic exchange.

    winfs models Windows' sharing rules; on Linux the commit would otherwise
    swap a replaced file out with ``RENAME_EXCHANGE``. The root conftest
    puts the switch back after each test.
    """
    _commit._EXCHANGE = False


@pytest.fixture
def winfs(tmp_path: Path) -> Iterator[WinFS]:
    """A fresh winfs mount at ``tmp_path/"mnt"`` over ``tmp_path/"backing"``.

    Skips the test when FUSE cannot run here. Holders still running under the
    mount are killed and the mount is removed when the test ends, pass or fail.
    """
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"winfs: {reason}")
    with mount(tmp_path / "backing", tmp_path / "mnt") as fs:
        yield fs
