"""``python -m fstx``: the ``fstx`` command."""

from __future__ import annotations

import sys

from fstx._cli import main

if __name__ == "__main__":
    sys.exit(main())
