"""The ``fstx`` command: look at a root, recover it, apply a JSON plan, install wheels.

Exit status: 0 on success; 1 on failure, with one paragraph on stderr that
names the path and the operation (no traceback); 2 on bad usage, a malformed
plan file included; 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import codecs
import contextlib
import importlib
import json
import logging
import os
import shlex
import sys
import time
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import attrs

import fstx

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_log = logging.getLogger("fstx")

_PLAN_HELP = """\
PLAN.json is a JSON list of operations, applied in order as ONE transaction:
all of them take effect, or none does. Each entry is an object naming its
"op" and the same arguments as the Python method of fstx.Transaction:

  {"op": "copy",   "src": "pkg", "dst": "lib/pkg", "follow_symlinks": false}
  {"op": "rename", "src": "lib/old.py", "dst": "lib/new.py"}
  {"op": "delete", "path": "lib/pkg-1.0.dist-info", "missing_ok": true}
  {"op": "write",  "dst": "bin/tool", "text": "#!/bin/sh\\n", "mode": "755"}
  {"op": "write",  "dst": "data.bin", "base64": "AAEC"}
  {"op": "mkdir",  "path": "var/cache", "mode": "700"}
  {"op": "chmod",  "path": "bin/tool", "mode": "755"}

Paths are relative to ROOT (absolute ones must lie inside it), except the
"src" of "copy": a relative copy source is looked for first relative to
the directory of the plan file (to the current directory when the plan is
read from stdin, PLAN "-"), so that a plan can ship its files beside it,
and only if nothing is there, inside ROOT as planned so far (as in the
Python method); an absolute one may be anywhere.

A mode is an octal string ("755", "0o755") or an integer holding the
number itself (493 for 0o755, as json.dumps(0o755) writes it).
"write" takes "text" (with an optional "encoding", UTF-8 by default) or
"base64", not both. ROOT is created (with its parents) if missing, and
removed again if the plan fails.

A plan that is not valid JSON, has an unknown op, a missing, unknown or
mistyped field is refused before anything is touched (exit status 2); an
operation the library refuses (a missing source, a path outside ROOT) or
a commit that fails leaves ROOT as it was (exit status 1).
"""

_EPILOG = """\
Exit status: 0 success; 1 failure (one paragraph on stderr naming the path
and the operation, no traceback); 2 bad usage or a malformed plan file;
130 interrupted. `fstx status` exits 0 whenever it could look, clean or
not: read "clean" from --json to decide. FSTX_DEBUG=1 in the environment
shows the traceback of an unexpected error.
"""


class _CliError(Exception):
    """A failure reported in one paragraph; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _bad_input(message: str) -> _CliError:
    return _CliError(f"error: {message}", EXIT_USAGE)


# -- the plan file -------------------------------------------------------------


@attrs.frozen
class PlanEntry:
    """One parsed entry of a plan file, ready to be applied to a transaction.

    Attributes:
        where: the entry's place and op, for messages (``plan.json[3] (copy)``).
        method: the :class:`fstx.Transaction` method that carries it out.
        args: its positional arguments.
        kwargs: its keyword arguments.
        source_base: for ``copy``, the directory where a relative source is
            looked for first (the plan file's).
    """

    where: str
    method: str
    args: Tuple[Any, ...]
    kwargs: Mapping[str, Any]
    source_base: Optional[str] = None

    def apply(self, tx: fstx.Transaction) -> None:
        """Plan this entry in ``tx``."""
        if self.source_base is None:
            getattr(tx, self.method)(*self.args, **self.kwargs)
            return
        # copy: a relative source beside the plan file if it is there, else
        # (as in the Python method) inside the root, as planned so far.
        src, *rest = self.args
        beside = os.path.join(self.source_base, src)
        if os.path.isabs(src) or os.path.lexists(beside):
            tx.copy(beside, *rest, **self.kwargs)
            return
        try:
            tx.copy(src, *rest, **self.kwargs)
        except fstx.PlanError as exc:
            if exc.path != src:
                raise
            where = f"beside the plan file ({self.source_base!r}), then in the root"
            raise fstx.PlanError(
                exc.operation,
                src,
                f"{exc.reason}; a relative source is looked for {where}",
            ) from None


# op -> (required fields, optional fields)
_FIELDS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "copy": (("src", "dst"), ("follow_symlinks",)),
    "rename": (("src", "dst"), ()),
    "delete": (("path",), ("missing_ok",)),
    "write": (("dst",), ("text", "base64", "encoding", "mode")),
    "mkdir": (("path",), ("mode",)),
    "chmod": (("path", "mode"), ()),
}


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def parse_mode(value: object) -> int:
    """Mode bits from a plan: an octal string (``"755"``, ``"0o755"``) or an int.

    Raises:
        TypeError: neither a string nor an int.
        ValueError: not an octal string, or outside ``0..0o7777``.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        text = text.removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise ValueError(f'{value!r} is not an octal mode such as "755"')
        mode = int(text, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise TypeError(
            f'a mode is an octal string such as "755", not {_type_name(value)}'
        )
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {value!r} is outside 0..0o7777")
    return mode


def _parse_entry(entry: object, where: str, base: str) -> PlanEntry:
    if not isinstance(entry, dict):
        raise _bad_input(
            f"{where}: an entry must be an object, not {_type_name(entry)}"
        )
    op = entry.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        known = ", ".join(_FIELDS)
        shown = "missing" if op is None else repr(op)
        raise _bad_input(f'{where}: "op" is {shown}; expected one of {known}')
    required, optional = _FIELDS[op]
    where = f"{where} ({op})"
    missing = [name for name in required if name not in entry]
    unknown = sorted(set(entry) - {"op", *required, *optional})
    if missing or unknown:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f'"{n}"' for n in missing))
        if unknown:
            parts.append("unknown " + ", ".join(f'"{n}"' for n in unknown))
        raise _bad_input(f"{where}: {'; '.join(parts)}")

    def path(name: str) -> str:
        value = entry[name]
        if not isinstance(value, str) or not value:
            raise _bad_input(
                f'{where}: "{name}" must be a non-empty string, not {_type_name(value)}'
            )
        return value

    def flag(name: str) -> Dict[str, bool]:
        if name not in entry:
            return {}
        value = entry[name]
        if not isinstance(value, bool):
            raise _bad_input(
                f'{where}: "{name}" must be true or false, not {_type_name(value)}'
            )
        return {name: value}

    def mode(name: str) -> Optional[int]:
        if name not in entry:
            return None
        try:
            return parse_mode(entry[name])
        except (TypeError, ValueError) as exc:
            raise _bad_input(f'{where}: "{name}": {exc}') from None

    if op == "copy":
        args = (path("src"), path("dst"))
        return PlanEntry(where, "copy", args, flag("follow_symlinks"), base)
    if op == "rename":
        return PlanEntry(where, "rename", (path("src"), path("dst")), {})
    if op == "delete":
        return PlanEntry(where, "delete", (path("path"),), flag("missing_ok"))
    if op == "mkdir":
        chosen = mode("mode")
        kwargs = {} if chosen is None else {"mode": chosen}
        return PlanEntry(where, "mkdir", (path("path"),), kwargs)
    if op == "chmod":
        return PlanEntry(where, "chmod", (path("path"), mode("mode")), {})
    return _parse_write(entry, where, path("dst"), mode("mode"))


def _parse_write(
    entry: Mapping[str, Any], where: str, dst: str, mode: Optional[int]
) -> PlanEntry:
    if ("text" in entry) == ("base64" in entry):
        raise _bad_input(f'{where}: give exactly one of "text" and "base64"')
    if "text" in entry:
        text, encoding = entry["text"], entry.get("encoding", "utf-8")
        if not isinstance(text, str):
            raise _bad_input(
                f'{where}: "text" must be a string, not {_type_name(text)}'
            )
        try:
            codecs.lookup(encoding if isinstance(encoding, str) else "")
        except LookupError:
            raise _bad_input(
                f'{where}: "encoding" {encoding!r} is not a known codec'
            ) from None
        kwargs: Dict[str, Any] = {"encoding": encoding, "mode": mode}
        return PlanEntry(where, "write_text", (dst, text), kwargs)
    if "encoding" in entry:
        raise _bad_input(f'{where}: "encoding" goes with "text", not with "base64"')
    raw = entry["base64"]
    if not isinstance(raw, str):
        raise _bad_input(f'{where}: "base64" must be a string, not {_type_name(raw)}')
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad_input(f'{where}: "base64" is not valid base64 ({exc})') from None
    return PlanEntry(where, "write_bytes", (dst, data), {"mode": mode})


def load_plan(text: str, name: str, base: str) -> List[PlanEntry]:
    """Parse a plan file's text; relative copy sources are looked for in ``base`` first.

    Raises:
        _CliError: with exit status 2, naming the entry at fault.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _bad_input(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise _bad_input(
            f"{name}: a plan is a JSON list of operations, not {_type_name(data)}"
        )
    return [_parse_entry(e, f"{name}[{i}]", base) for i, e in enumerate(data)]


def _read_plan(plan: str) -> List[PlanEntry]:
    if plan == "-":
        return load_plan(sys.stdin.read(), "<stdin>", os.getcwd())
    try:
        with open(plan, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad_input(f"cannot read plan {plan!r}: {_reason(exc)}") from None
    return load_plan(text, plan, os.path.dirname(os.path.abspath(plan)))


# -- progress ------------------------------------------------------------------


class Progress:
    """A progress line on stderr that never litters a pipe or a log.

    Nothing is drawn before ``delay`` seconds have passed, so quick work draws
    nothing at all. On a terminal the line is then redrawn in place (at most
    every ``tty_every`` seconds) and wiped at the end; elsewhere a plain line
    is written at most every ``log_every`` seconds, with no carriage returns.

    Args:
        stream: where to draw (stderr).
        enabled: False draws nothing (``--quiet``).
        tty: whether ``stream`` is a terminal; asked of the stream if None.
        clock: a monotonic clock (a seam for tests).
    """

    def __init__(
        self,
        stream: IO[str],
        *,
        enabled: bool = True,
        tty: Optional[bool] = None,
        clock: Callable[[], float] = time.monotonic,
        delay: float = 0.5,
        tty_every: float = 0.1,
        log_every: float = 2.0,
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = _isatty(stream) if tty is None else tty
        self.clock = clock
        self.delay = delay
        self.every = tty_every if self.tty else log_every
        self.phase = "working"
        self._start = clock()
        self._last: Optional[float] = None
        self._width = 0

    def begin(self, phase: str) -> None:
        """Name what is counted from now on (``planning``, ``committing``)."""
        self.phase = phase

    def __call__(self, done: int, total: int) -> None:
        """Report ``done`` of ``total``; the signature of ``on_progress``."""
        if not self.enabled:
            return
        now = self.clock()
        if now - self._start < self.delay:
            return
        if self._last is not None and now - self._last < self.every and done < total:
            return
        self._last = now
        percent = 100 * done // total if total else 100
        text = f"fstx: {self.phase} {done}/{total} ({percent}%)"
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Wipe the line drawn on a terminal."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or bare stream
        return False


# -- output --------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """An error in words: the library's own message, or an OSError's strerror."""
    if isinstance(exc, fstx.FstxError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is not None:
            return f"{exc.strerror} ({exc.filename!r})"
        return exc.strerror
    return str(exc) or type(exc).__name__


def _paragraph(text: str) -> str:
    return " ".join(text.split())


def _json(data: Mapping[str, Any]) -> None:
    # ASCII: non-UTF-8 names travel as \udcXX escapes, which json.loads takes back.
    print(json.dumps(data, indent=2, sort_keys=True))


def _report_json(root: str, report: fstx.CommitReport) -> Dict[str, Any]:
    return {
        "root": root,
        "operations": report.operations,
        "deferred": list(report.deferred),
        "retries": report.retries,
        "elapsed": round(report.elapsed, 6),
    }


def _print_deferred(deferred: Sequence[str], root: str) -> None:
    if deferred:
        print(
            f"deferred: {len(deferred)} old file(s) still in use wait in the trash; "
            f"`fstx recover {shlex.quote(root)}` removes them once they are free:"
        )
        for path in deferred:
            print(f"  {path}")


def _print_commit(root: str, report: fstx.CommitReport, verb: str) -> None:
    retries = f", {report.retries} retried call(s)" if report.retries else ""
    print(
        f"{verb} {report.operations} operation(s) under {root} "
        f"in {report.elapsed:.2f} s{retries}"
    )
    _print_deferred(report.deferred, root)


# -- subcommands ---------------------------------------------------------------


def _existing_root(root: str, doing: str) -> str:
    path = os.path.abspath(root)
    if not os.path.isdir(path):
        raise _CliError(f"cannot {doing} {path!r}: it is not a directory")
    return path


def _cmd_status(args: argparse.Namespace) -> int:
    root = _existing_root(args.root, "read the status of")
    st = fstx.status(root)
    if args.json:
        _json(
            {
                "root": root,
                "clean": st.clean,
                "pending": st.pending,
                "deferred": list(st.deferred),
            }
        )
    elif not args.quiet:
        print(f"root:     {root}")
        print(f"pending:  {'yes' if st.pending else 'no'}")
        print(f"deferred: {len(st.deferred) or 'none'}")
        for path in st.deferred:
            print(f"  {path}")
        print(f"clean:    {'yes' if st.clean else 'no'}")
        if st.pending:
            print(
                "an interrupted transaction awaits recovery: "
                f"`fstx recover {shlex.quote(root)}` finishes or undoes it"
            )
    return EXIT_OK


def _cmd_recover(args: argparse.Namespace) -> int:
    root = _existing_root(args.root, "recover")
    report = fstx.recover(root)
    if args.json:
        _json(
            {
                "root": root,
                "rolled_back": report.rolled_back,
                "rolled_forward": report.rolled_forward,
                "purged": report.purged,
                "deferred": list(report.deferred),
            }
        )
    elif not args.quiet:
        if report.rolled_back:
            print(f"rolled back an interrupted transaction under {root}")
        if report.rolled_forward:
            print(f"finished the clean-up of a committed transaction under {root}")
        if report.purged:
            print(f"removed {report.purged} deferred item(s) from the trash")
        if not (report.rolled_back or report.rolled_forward or report.purged):
            print(f"nothing to recover under {root}")
        if report.deferred:
            print(f"still in use, left for the next recovery: {len(report.deferred)}")
            for path in report.deferred:
                print(f"  {path}")
    return EXIT_OK


@contextlib.contextmanager
def _created_root(root: str, *, keep: bool = True) -> Iterator[None]:
    """Create ``root`` and its missing parents; remove them if the block fails.

    With ``keep`` False they are removed when the block succeeds too (a dry run).
    """
    made: List[str] = []
    path = root
    while not os.path.lexists(path):
        made.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if made:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise _CliError(f"cannot create root {root!r}: {_reason(exc)}") from None
    try:
        yield
    except BaseException:
        _remove_made(root, made)
        raise
    if not keep:
        _remove_made(root, made)


def _remove_made(root: str, made: Sequence[str]) -> None:
    # Only the directories made above, and fstx's staging directory with its
    # lock file; rmdir refuses a directory that is not empty.
    if not made:
        return
    staging = os.path.join(root, ".fstx")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(staging, "lock"))
    with contextlib.suppress(OSError):
        os.rmdir(staging)
    for path in made:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _cmd_apply(args: argparse.Namespace) -> int:
    entries = _read_plan(args.plan)
    root = os.path.abspath(args.root)
    progress = Progress(sys.stderr, enabled=not args.quiet)
    try:
        with (
            _created_root(root, keep=not args.dry_run),
            fstx.transaction(
                root,
                durability=args.durability,
                lock_timeout=args.lock_timeout,
                on_progress=progress,
            ) as tx,
        ):
            progress.begin("planning")
            for index, entry in enumerate(entries):
                try:
                    entry.apply(tx)
                except (fstx.PlanError, OSError) as exc:
                    raise _CliError(
                        f"{entry.where}: {_reason(exc)}; nothing under {root!r} "
                        "was changed"
                    ) from exc
                progress(index + 1, len(entries))
            if args.dry_run:
                tx.rollback()
                if args.json:
                    _json({"root": root, "operations": [str(o) for o in tx.operations]})
                elif not args.quiet:
                    for op in tx.operations:
                        print(op)
                    count = len(tx.operations)
                    print(f"dry run: {count} operation(s) planned, nothing changed")
                return EXIT_OK
            progress.begin("committing")
            report = tx.commit()
    finally:
        progress.close()
    if args.json:
        _json(_report_json(root, report))
    elif not args.quiet:
        _print_commit(root, report, "applied")
    return EXIT_OK


def _missing_installer(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it came from, is "no module named installer"."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        name = seen.name if isinstance(seen, ModuleNotFoundError) else None
        if name is not None and name.split(".")[0] == "installer":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _cmd_install(args: argparse.Namespace) -> int:
    try:
        # Imported here: the integration needs the optional `installer` package.
        integration = importlib.import_module("fstx.integrations.installer")
    except ImportError as exc:
        if _missing_installer(exc):
            raise _CliError(
                "cannot install wheels: the optional 'installer' package is missing; "
                "run `pip install fstx[installer]`"
            ) from None
        raise _CliError(f"cannot install wheels: {exc}") from None
    prefix = os.path.abspath(args.prefix)
    with _created_root(prefix):
        report: fstx.CommitReport = integration.install_wheels(
            prefix,
            [os.path.abspath(w) for w in args.wheels],
            upgrade=args.upgrade,
            durability=args.durability,
        )
    if args.json:
        _json(_report_json(prefix, report))
    elif not args.quiet:
        names = ", ".join(os.path.basename(w) for w in args.wheels)
        _print_commit(prefix, report, f"installed {names}:")
    return EXIT_OK


# -- the parser ----------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds"
        ) from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _add_output_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # The same options before and after the subcommand name; below it they
    # default to SUPPRESS so that they never overwrite a value given above it.
    default: Any = False if top else argparse.SUPPRESS
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default,
        help="print nothing on success (errors and warnings still go to stderr)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", default=default,
        help="print the result as JSON on stdout",
    )  # fmt: skip


def _add_durability(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--durability", choices=("full", "none"), default="full",
        help="full: survives power loss once done (default); none: atomic "
        "against a crash of the process, no fsync (throwaway trees, tests)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``fstx`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fstx",
        description="Make a batch of filesystem changes all-or-nothing.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"fstx {fstx.__version__}"
    )
    _add_output_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, summary: str, description: str = ""
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=summary, description=description or summary, epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        _add_output_options(p, top=False)
        return p

    p = command(
        "status",
        "show whether ROOT is clean, has an interrupted transaction or deferred files",
        "Show whether ROOT has an interrupted transaction awaiting recovery\n"
        "(pending) or old files that were in use waiting in the trash\n"
        "(deferred). Changes nothing. Exits 0 whether or not ROOT is clean.",
    )
    p.add_argument("root", metavar="ROOT")
    p.set_defaults(run=_cmd_status)

    p = command(
        "recover",
        "roll back or finish an interrupted transaction and empty the trash",
    )
    p.add_argument("root", metavar="ROOT")
    p.set_defaults(run=_cmd_recover)

    p = command("apply", "apply a JSON plan to ROOT as one transaction", _PLAN_HELP)
    p.add_argument("plan", metavar="PLAN.json", help='the plan file ("-" reads stdin)')
    p.add_argument(
        "--root", required=True, metavar="ROOT", help="the directory to change"
    )
    _add_durability(p)
    p.add_argument(
        "--lock-timeout", type=_seconds, default=None, metavar="SECONDS",
        help="give up if another transaction holds ROOT this long (default: wait)",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true",
        help="check and stage the plan, print its operations, change nothing",
    )  # fmt: skip
    p.set_defaults(run=_cmd_apply)

    p = command(
        "install",
        "install wheels into PREFIX as one transaction",
        "Install wheels into PREFIX as one transaction: every file of every\n"
        "wheel is in place, or none is. PREFIX is created if missing. Needs\n"
        "the optional 'installer' package: pip install fstx[installer].",
    )
    p.add_argument("wheels", nargs="+", metavar="WHEEL")
    p.add_argument("--prefix", required=True, help="the environment to install into")
    p.add_argument(
        "--upgrade", action="store_true",
        help="replace installed versions of the same distributions",
    )  # fmt: skip
    _add_durability(p)
    p.set_defaults(run=_cmd_install)
    return parser


# -- entry point ---------------------------------------------------------------


class _Handler(logging.Handler):
    """The fstx logger's records on stderr as ``fstx: message``, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"fstx: {_paragraph(record.getMessage())}\n")
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _logging(quiet: bool) -> Iterator[None]:
    handler = _Handler(logging.WARNING if quiet else logging.INFO)
    level = _log.level
    _log.addHandler(handler)
    if _log.getEffectiveLevel() > handler.level:
        _log.setLevel(handler.level)
    try:
        yield
    finally:
        _log.removeHandler(handler)
        _log.setLevel(level)


def _tolerant_streams() -> None:
    # A non-UTF-8 file name (surrogate escapes) or a character the terminal
    # cannot show comes out as a backslash escape instead of an exception.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # detached or closed
                reconfigure(errors="backslashreplace")


def _fail(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: {_paragraph(message)}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fstx`` command with ``argv`` (``sys.argv[1:]`` if None).

    Returns:
        The exit status: 0 success, 1 failure, 2 bad usage, 130 interrupted.
    """
    _tolerant_streams()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    prog = f"fstx {args.command}"
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        with _logging(args.quiet):
            return run(args)
    except _CliError as exc:
        _fail(prog, exc.message)
        return exc.code
    except (fstx.FstxError, OSError) as exc:
        _fail(prog, _reason(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _fail(prog, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("FSTX_DEBUG"):
            raise
        _fail(
            prog,
            f"unexpected {type(exc).__name__}: {_reason(exc)} (FSTX_DEBUG=1 shows "
            "the traceback)",
        )
        return EXIT_FAILURE
