"""``python -m hello [NAME]``."""

import sys

from hello import greet

print(greet(*sys.argv[1:2]))
