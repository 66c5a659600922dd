"""Shared fixtures."""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fstx import _commit, _os


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    """An empty transaction root."""
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _no_leftover_hook() -> Iterator[None]:
    """A test that forgets to remove its OS-layer hook must not poison the next."""
    yield
    _os.set_hook(None)
    _commit._EXCHANGE = _commit.EXCHANGE_DEFAULT  # a workload may have switched it
