"""Adapters that route other tools' file writes through an fstx transaction.

Each integration lives in its own module and imports its tool only there, so
that the tool stays an optional dependency:

- :mod:`fstx.integrations.installer`: pypa/installer (``pip install fstx[installer]``).
"""

from __future__ import annotations
