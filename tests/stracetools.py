"""Reading strace output: the pieces the syscall audit and the security suite share."""

from __future__ import annotations

import os
from typing import List, Optional

__all__ = ["split_args", "string_arg", "unescape"]


def unescape(text: str) -> bytes:
    r"""Bytes of an strace string body (``\xHH`` with -xx; octal and C escapes too)."""
    out = bytearray()
    i = 0
    simple = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "\\": 92, '"': 34}
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        elif nxt in "01234567":
            j = i + 1
            while j < min(i + 4, len(text)) and text[j] in "01234567":
                j += 1
            out.append(int(text[i + 1 : j], 8))
            i = j
        else:
            out.append(simple.get(nxt, ord(nxt)))
            i += 2
    return bytes(out)


def split_args(text: str) -> List[str]:
    """Top-level comma-separated arguments (strings, arrays, structs and fd paths kept whole)."""
    args: List[str] = []
    depth, cur, quoted, escaped = 0, "", False, False
    for ch in text:
        if quoted:
            cur += ch
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "[{(<":
            depth += 1
        elif ch in "]})>":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        args.append(cur.strip())
    return args


def string_arg(arg: str) -> Optional[str]:
    """A string argument as a path (surrogate-escaped like os.fsdecode); None if NULL."""
    if not arg.startswith('"'):
        return None
    return os.fsdecode(unescape(arg[1 : arg.rindex('"')]))
