"""The one place that chooses between the POSIX and Windows primitives.

Both modules define the same functions with the same signatures; the engine
reaches them only through :mod:`fstx._os`, the seam that tests hook into.
"""

from __future__ import annotations

import sys

from fstx._platform._types import Dir

if sys.platform == "win32":
    from fstx._platform import _windows as impl
else:
    from fstx._platform import _posix as impl

__all__ = ["Dir", "impl"]
