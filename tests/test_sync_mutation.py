"""Sync-site mutation (crash.md §10, F12): removing any one durability call is caught.

Every ``_os.fsync``, ``_os.fsync_dir`` and ``_os.syncfs`` the engine makes is
identified by where it is made: the engine line that asks for it (its *site*)
and, at a finer grain, the protocol step that got there (its *context*: the
chain of frames up to the first one outside ``_commit.py``, e.g. the barrier
before the journal versus the one after the renames). The sites are found by
running the mutation workloads through both durability protocols and all
the scenarios of :mod:`crashmodel` (commits, failed commits rolling back,
recoveries).

Then, one site (or one context) at a time, that call is removed: the wrapped
``_os`` function returns at once without flushing (``syncfs`` says it did, so
the engine does not fall back), and the shadow durability model must find a
crash state that recovers wrong. A removal nobody notices is either a useless
fsync or a gap in the tests; both have been met and fixed (see the report
that introduced this file).

:data:`SITES` lists them all; when the engine gains or loses one,
:func:`test_the_sites_are_the_known_ones` says which, so that the list (and
the tests catching each removal) keep up.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections import defaultdict
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import attrs
import pytest

from crashmodel import (
    PROTOCOLS,
    SCENARIOS,
    SECOND_DEVICE,
    Checker,
    Frame,
    MountUnavailableError,
    SyncCall,
    record,
    sync_calls,
)
from workloads import BY_NAME, Workload, scratch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="the recorder reads /proc/self/fd and directory descriptors",
    ),
]

WORKLOADS: Tuple[Tuple[Workload, Optional[str]], ...] = (
    (SECOND_DEVICE, "mnt"),
    (BY_NAME["replace-one-file"], None),
    (BY_NAME["chmod"], None),
    (BY_NAME["installer-upgrade"], None),
)
"""The workloads run, with their mount point: a second device, a replaced file,
mode changes, and a copied tree with nested directories. Tried in this order."""

SEARCH = ("max-loss", "torn-append", "rename-half", "prefix", "except-one")
"""Kinds of crash state tried, most likely to catch a missing flush first."""

SITES: Dict[str, bool] = {
    # name: only the second device's workload reaches it (needs a mount)
    "fsync in JournalFile.append": False,
    "fsync in JournalFile.append <- Transaction._abort": False,
    "fsync in JournalFile.append <- Transaction._area": True,
    "fsync in JournalFile.append <- Transaction.commit#1": False,
    "fsync in JournalFile.append <- Transaction.commit#2": False,
    "fsync in _fsync_file": False,
    "fsync in _fsync_file <- _fsync_tree <- barrier <- Transaction.commit": False,
    "fsync in _fsync_file <- barrier <- Transaction._abort": False,
    "fsync in _fsync_file <- barrier <- Transaction.commit": False,
    "fsync in _fsync_file <- barrier <- recover_locked": False,
    "fsync_dir in JournalFile.append": True,
    "fsync_dir in JournalFile.append <- Transaction._area": True,
    "fsync_dir in Transaction._open": False,
    "fsync_dir in _fsync_tree": False,
    "fsync_dir in _fsync_tree <- barrier <- Transaction.commit": False,
    "fsync_dir in barrier": False,
    "fsync_dir in barrier <- Transaction._abort": False,
    "fsync_dir in barrier <- Transaction.commit#1": False,
    "fsync_dir in barrier <- Transaction.commit#2": False,
    "fsync_dir in barrier <- recover_locked": False,
    "fsync_dir in settle_areas": True,
    "fsync_dir in settle_areas <- Transaction._clean_staging": True,
    "fsync_dir in settle_areas <- recover_locked": True,
    "syncfs in barrier": False,
    "syncfs in barrier <- Transaction._abort": False,
    "syncfs in barrier <- Transaction.commit#1": False,
    "syncfs in barrier <- Transaction.commit#2": False,
    "syncfs in barrier <- recover_locked": False,
}


Combo = Tuple[int, str, str]
"""``(index into WORKLOADS, protocol, scenario)``."""


def _chain(call: SyncCall) -> Tuple[Frame, ...]:
    """The engine frames from the site up to the first protocol step outside ``_commit.py``."""
    out: List[Frame] = []
    for frame in call.frames:
        out.append(frame)
        if frame[0] != "_commit.py":
            break
    return tuple(out)


@attrs.frozen
class Namer:
    """Stable names for call sites: functions and ordinals, not line numbers.

    Attributes:
        lines: for each ``(op, function)`` the lines making that call, and for
            each chain without its last line the lines of its last function.
    """

    lines: Dict[Tuple[object, ...], Tuple[int, ...]]

    @classmethod
    def of(cls, calls: List[SyncCall]) -> Namer:
        """Learn the ordinals from every call seen."""
        found: Dict[Tuple[object, ...], Set[int]] = defaultdict(set)
        for call in calls:
            site = call.frames[0]
            found[(call.name, site[0], site[1])].add(site[2])
            chain = _chain(call)
            if len(chain) > 1:
                last = chain[-1]
                found[(call.name, chain[:-1], last[0], last[1])].add(last[2])
        return cls({key: tuple(sorted(v)) for key, v in found.items()})

    def _ordinal(self, key: Tuple[object, ...], line: int) -> str:
        lines = self.lines.get(key, (line,))
        return f"#{lines.index(line) + 1}" if len(lines) > 1 else ""

    def names(self, call: SyncCall) -> Tuple[str, Optional[str]]:
        """The call's site name, and its context name (None for a call made by a protocol step itself)."""
        site = call.frames[0]
        name = f"{call.name} in {site[1]}{self._ordinal((call.name, site[0], site[1]), site[2])}"
        chain = _chain(call)
        if len(chain) < 2:
            return name, None
        last = chain[-1]
        middle = "".join(f" <- {frame[1]}" for frame in chain[1:-1])
        ordinal = self._ordinal((call.name, chain[:-1], last[0], last[1]), last[2])
        return name, f"{name}{middle} <- {last[1]}{ordinal}"


@attrs.frozen
class Discovery:
    """Where each site is met.

    Attributes:
        namer: names calls.
        where: site or context name -> the combos that make that call.
        unavailable: combos that could not run here (no mount).
    """

    namer: Namer
    where: Dict[str, FrozenSet[Combo]]
    unavailable: FrozenSet[Combo]


def _combos() -> List[Combo]:
    return [
        (i, protocol, scenario)
        for i in range(len(WORKLOADS))
        for protocol in PROTOCOLS
        for scenario in SCENARIOS
    ]


@functools.cache
def discover() -> Discovery:
    """Run every combo once, watching the durability calls (cached per process)."""
    seen: Dict[Combo, List[SyncCall]] = {}
    unavailable: Set[Combo] = set()
    with scratch(tempfile.gettempdir()) as base:
        for n, combo in enumerate(_combos()):
            i, protocol, scenario = combo
            workload, mount = WORKLOADS[i]
            calls: List[SyncCall] = []
            try:
                with sync_calls(seen=calls):
                    record(
                        workload, os.path.join(base, str(n)), protocol=protocol,
                        scenario=scenario, mount=mount,
                    )  # fmt: skip
            except MountUnavailableError:
                unavailable.add(combo)
                continue
            seen[combo] = calls
    namer = Namer.of([c for calls in seen.values() for c in calls])
    where: Dict[str, Set[Combo]] = defaultdict(set)
    for combo, calls in seen.items():
        for call in calls:
            for name in namer.names(call):
                if name is not None:
                    where[name].add(combo)
    return Discovery(
        namer, {k: frozenset(v) for k, v in where.items()}, frozenset(unavailable)
    )


def test_the_sites_are_the_known_ones() -> None:
    found = discover()
    missing = set(SITES) - set(found.where)
    if found.unavailable:
        missing -= {name for name, mount in SITES.items() if mount}
    new = set(found.where) - set(SITES)
    assert not new, (
        f"durability calls no test removes yet: {sorted(new)}; add them to SITES "
        f"(their removal must be caught like the others')"
    )
    assert not missing, (
        f"durability calls in SITES the engine no longer makes: {sorted(missing)}"
    )
    for name, mount in SITES.items():
        if name in found.where:
            needs = all(WORKLOADS[c[0]][1] is not None for c in found.where[name])
            assert needs == mount, (
                f"{name!r}: needs a mount is {needs}, SITES says {mount}"
            )


@pytest.mark.parametrize("site", sorted(SITES))
def test_removing_a_site_is_caught(site: str, tmp_path: object) -> None:
    found = discover()
    combos = sorted(found.where.get(site, ()))
    if not combos:
        if SITES.get(site) and found.unavailable:
            pytest.skip(
                "only a second device inside the root reaches it, and none can be mounted"
            )
        pytest.fail(
            f"{site!r} is not met by any workload (see test_the_sites_are_the_known_ones)"
        )
    namer = found.namer

    def removed(call: SyncCall) -> bool:
        return site in namer.names(call)

    tried = []
    with scratch(str(tmp_path)) as base:
        for n, (i, protocol, scenario) in enumerate(combos):
            workload, mount = WORKLOADS[i]
            rec = record(
                workload, os.path.join(base, f"r{n}"), protocol=protocol, scenario=scenario,
                mount=mount, skip=removed,
            )  # fmt: skip
            os.mkdir(os.path.join(base, f"w{n}"))
            stats = Checker(rec, os.path.join(base, f"w{n}")).run(
                kinds=SEARCH, stop_at_first=True
            )
            tried.append(f"{rec.name}: {stats.unique} states")
            if stats.failures:
                print(f"removing {site!r} is caught:\n{stats.failures[0]}")
                return
    pytest.fail(
        f"removing {site!r} is never caught, a useless fsync or a testing gap; "
        f"tried: {'; '.join(tried)}"
    )
