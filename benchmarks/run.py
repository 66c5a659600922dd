"""Measure fstx against its baselines, side by side, and write docs/benchmarks.md.

    python -m benchmarks                  # the full run (about 15 minutes here)
    python -m benchmarks --quick          # fewer rounds, smaller counts
    python -m benchmarks --only install,upgrade --rounds 7
    python -m benchmarks --profile install/fstx-none   # cProfile of one run

Method (see docs/benchmarks.md): every variant of a workload runs once per
round, in alternating order (A B C, C B A, ...), each into a fresh target,
after ``sync``; outputs of earlier runs are never deleted between runs (on
this disk that slows down the next file creations), only after the last
measurement. Each round gives a ratio to the reference; the table shows the
median of those pairwise ratios with their min and max.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks import data as _data
from benchmarks import workloads as W

_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = _ROOT / "docs" / "benchmarks.md"
ALL = ("install", "upgrade", "wheel", "cache", "recover", "scaling")
_START = "<!-- results:start -->"
_END = "<!-- results:end -->"
_SYNCS = ("fsync", "fdatasync", "syncfs", "sync")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- configuration ---------------------------------------------------------------


def config_to_json(config: W.Config) -> str:
    d = dataclasses.asdict(config)
    return json.dumps(d)


def config_from_json(text: str) -> W.Config:
    d = json.loads(text)
    d["shape"] = _data.Shape(**d["shape"])
    d["scale_sizes"] = tuple(d["scale_sizes"])
    return W.Config(**d)


def make_workloads(bench: W.Bench, keys: Sequence[str]) -> List[W.Workload]:
    made: List[W.Workload] = []
    for key in keys:
        if key == "install":
            made.append(W.install_workload(bench))
        elif key == "upgrade":
            made.append(W.upgrade_workload(bench))
        elif key == "wheel":
            made.append(W.wheel_workload(bench))
        elif key in ("cache", "cache-none"):
            made.append(W.cache_workload(bench, "none"))
        if key in ("cache", "cache-full"):
            made.append(W.cache_workload(bench, "full"))
        elif key == "recover":
            made.append(W.recover_workload(bench))
    return made


# -- measuring -------------------------------------------------------------------


@dataclasses.dataclass
class Spread:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f} [{self.low:.2f}–{self.high:.2f}]"


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


def ratios(times: Dict[str, List[float]], num: str, den: str) -> Optional[Spread]:
    if not times.get(num) or not times.get(den):
        return None
    return spread([a / b for a, b in zip(times[num], times[den])])


def measure(
    bench: W.Bench, workload: W.Workload, rounds: int, warm_up: bool = True
) -> Dict[str, List[float]]:
    variants = [v for v in workload.variants if v.available is None]
    times: Dict[str, List[float]] = {v.key: [] for v in variants}
    if warm_up:
        log(f"[{workload.key}] warm-up")
        for v in variants:  # untimed: imports, page cache of the sources, uv's cache
            v.run(v.setup(bench))
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            state = v.setup(bench)
            times[v.key].append(W.timed(v.run, state))
        log(
            f"[{workload.key}] round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {t[-1]:.3f}s" for k, t in times.items())
        )
    return times


def count_syncs(
    bench: W.Bench, workload: str, variant: str
) -> Optional[Dict[str, int]]:
    """fsync-family calls of one run (setup included: it makes none), from ``strace -f -c``."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    out = bench.workdir / "strace.txt"
    cmd = [strace, "-f", "-c", "-o", str(out), "-e", "trace=" + ",".join(_SYNCS),
           sys.executable, "-m", "benchmarks.drivers", "once", str(bench.workdir),
           config_to_json(bench.config), workload, variant]  # fmt: skip
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log(f"strace of {workload}/{variant} failed: {proc.stderr[-1500:]}")
        return None
    counts = dict.fromkeys(_SYNCS, 0)
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in counts and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    return counts


def fmt_syncs(counts: Optional[Dict[str, int]]) -> str:
    if counts is None:
        return "n/a"
    used = [(name, n) for name, n in counts.items() if n]
    if not used:
        return "0"
    return ", ".join(f"{n:,} {name}" for name, n in used)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


# -- scaling ---------------------------------------------------------------------


def measure_scaling(
    bench: W.Bench, *, memory: bool = False
) -> Tuple[Dict[Tuple[str, int], List[Dict[str, float]]], Dict[int, Dict[str, float]]]:
    sizes = bench.config.scale_sizes
    kinds = ("plain", "fstx-none")
    runs: Dict[Tuple[str, int], List[Dict[str, float]]] = {
        (k, n): [] for k in kinds for n in sizes
    }
    for r in range(bench.config.scale_rounds):
        order = [(k, n) for n in sizes for k in kinds]
        if r % 2:
            order.reverse()
        for k, n in order:
            runs[(k, n)].append(W.scale_once(bench, k, n, memory=memory))
            where = "tmpfs" if memory else "disk"
            log(
                f"[scaling, {where}] round {r + 1}: {k} {n}: "
                f"{runs[(k, n)][-1]['seconds']:.2f}s"
            )
    traced = {
        n: W.scale_once(bench, "fstx-none", n, traced=True, memory=memory)
        for n in sizes
    }
    return runs, traced


def scaling_section(
    bench: W.Bench,
    runs: Dict[Tuple[str, int], List[Dict[str, float]]],
    traced: Dict[int, Dict[str, float]],
    *,
    memory: bool = False,
) -> Tuple[List[str], List[Tuple[str, str, str, bool]]]:
    sizes = bench.config.scale_sizes
    where = (
        f"on tmpfs ({W.MEMORY_FS}): the engine without the disk"
        if memory
        else "on the disk"
    )
    lines = [
        "### Scaling: one transaction of N small writes (64 bytes, 100 per directory), "
        f"durability='none', {where}",
        "",
        "| operations | plain writes | fstx: total | fstx: planning | fstx: commit | fstx µs/op | peak RSS growth / op | peak traced memory / op |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sizes:
        f = runs[("fstx-none", n)]
        p = runs[("plain", n)]
        med = lambda key, f=f: statistics.median(x[key] for x in f)  # noqa: E731
        lines.append(
            f"| {n:,} | {fmt_time(statistics.median(x['seconds'] for x in p))} | {fmt_time(med('seconds'))} "
            f"| {fmt_time(med('plan_seconds'))} | {fmt_time(med('commit_seconds'))} | {med('seconds') / n * 1e6:.0f} "
            f"| {max(x['rss_kib_per_op'] for x in f):.2f} KiB | {traced[n]['traced_kib_per_op']:.2f} KiB |"
        )
    lines.append("")
    lines.append(
        "| step | fstx: time ratio, median [min–max] | plain writes: time ratio |"
    )
    lines.append("| --- | ---: | ---: |")
    targets: List[Tuple[str, str, str, bool]] = []
    for a, b in zip(sizes, sizes[1:]):
        fr = spread(
            [
                x["seconds"] / y["seconds"]
                for x, y in zip(runs[("fstx-none", b)], runs[("fstx-none", a)])
            ]
        )
        pr = spread(
            [
                x["seconds"] / y["seconds"]
                for x, y in zip(runs[("plain", b)], runs[("plain", a)])
            ]
        )
        lines.append(f"| {a:,} → {b:,} operations | {fr} | {pr} |")
        limit = 11.0 * b / a / 10
        fs = " (tmpfs)" if memory else ""
        targets.append(
            (
                f"scaling {a:,} → {b:,} operations{fs}: time ≤ {limit:.0f}×",
                str(fr),
                f"{limit:.0f}",
                fr.median <= limit,
            )
        )
    if memory:
        return lines, targets
    big = sizes[-1]
    mem = traced[big]["traced_kib_per_op"]
    rss = max(x["rss_kib_per_op"] for x in runs[("fstx-none", big)])
    targets.append((f"peak memory ≤ 1 KiB per planned operation ({big:,} operations)",
                    f"{mem:.2f} KiB traced, {rss:.2f} KiB RSS", "1 KiB", max(mem, rss) <= 1.0))  # fmt: skip
    return lines, targets


# -- the report ------------------------------------------------------------------


def machine() -> List[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- Machine: {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores",
        f"- Python {platform.python_version()} ({sys.executable})",
    ]


def filesystem(path: Path) -> str:
    best = ("?", "?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mnt, kind, opts = line.split()[:4]
            if str(path).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (kind, mnt, opts)
    except OSError:
        return "?"
    return f"{best[0]} on {best[1]} ({best[2]})"


def versions() -> str:
    found = []
    for name in ("pip", "installer", "atomicwrites"):
        try:
            from importlib.metadata import version

            found.append(f"{name} {version(name)}")
        except Exception:
            found.append(f"{name} not installed")
    uv = W.uv_path()
    found.append(
        (W.tool_version([uv, "--version"]) or "uv ?") if uv else "uv not installed"
    )
    return ", ".join(found)


def git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() + (
        " (src/ has uncommitted changes)" if dirty.stdout.strip() else ""
    )


def render(
    command: str,
    bench: W.Bench,
    sections: List[str],
    targets: List[Tuple[str, str, str, bool]],
) -> str:
    shape = bench.config.shape
    lines = [
        _START,
        "",
        f"Measured on {datetime.date.today().isoformat()} with `{command}`",
        f"(fstx {git_head()}; {versions()}).",
        "",
        *machine(),
        f"- Benchmark data under {bench.workdir.parent} ({filesystem(bench.workdir)})",
        f"- Data: seed {shape.seed}, {bench.config.rounds} rounds per workload",
        "",
        "### Targets (medians of per-round ratios, measured in this run)",
        "",
        "| target | measured: median [min–max] | limit | met |",
        "| --- | ---: | ---: | :---: |",
        *[
            f"| {text} | {got} | {limit} | {'yes' if ok else '**no**'} |"
            for text, got, limit, ok in targets
        ],
        "",
        *sections,
        _END,
    ]
    return "\n".join(lines) + "\n"


_TEMPLATE = """# Benchmarks

How fast a transaction is next to the unsafe and the hand-made ways of doing
the same thing, measured side by side in one run. Regenerate the results with
`python -m benchmarks` (or `--quick`); the text outside the results block is
kept.

{results}
"""


def write_output(path: Path, results: str) -> None:
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if _START in old and _END in old:
            head, rest = old.split(_START, 1)
            tail = rest.split(_END, 1)[1]
            path.write_text(head + results.rstrip("\n") + tail, encoding="utf-8")
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_TEMPLATE.format(results=results.rstrip("\n")), encoding="utf-8")


def workload_section(
    w: W.Workload,
    times: Dict[str, List[float]],
    syncs: Dict[str, Optional[Dict[str, int]]],
) -> List[str]:
    ref = next(v for v in w.variants if v.key == w.reference)
    lines = [
        f"### {w.title}",
        "",
        f"| variant | median time | × {ref.label.split(' (')[0]}: median [min–max] | fsync-family calls per run |",
        "| --- | ---: | ---: | ---: |",
    ]
    for v in w.variants:
        if v.available is not None:
            lines.append(f"| {v.label} | — | not measured: {v.available} | — |")
            continue
        r = ratios(times, v.key, w.reference)
        lines.append(
            f"| {v.label} | {fmt_time(statistics.median(times[v.key]))} | {r} | {fmt_syncs(syncs.get(v.key))} |"
        )
    if w.note:
        lines += ["", w.note]
    lines.append("")
    return lines


def extra_ratios(w: W.Workload, times: Dict[str, List[float]]) -> List[str]:
    """uv's and pip's place next to fstx, for the wheel table."""
    if w.key != "wheel":
        return []
    rows = []
    r = ratios(times, "fstx-none-in-process", "installer-in-process")
    if r is not None:
        rows.append(f"| fstx-none ÷ installer, both in one process | {r} |")
    for other in ("pip", "uv-cold", "uv-copy", "uv-link"):
        for mine in ("fstx-none", "fstx-full"):
            r = ratios(times, mine, other)
            if r is not None:
                rows.append(f"| {mine} ÷ {other} | {r} |")
    if not rows:
        return []
    return ["| ratio | median [min–max] |", "| --- | ---: |", *rows, ""]


# -- main -------------------------------------------------------------------------


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds, 1,000 cache writes, scaling up to 10k",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny data, one round: proves the runner works (no useful numbers)",
    )
    p.add_argument("--rounds", type=int, help="rounds per workload")
    p.add_argument("--only", help=f"comma-separated workloads among {','.join(ALL)}")
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where the results go (default docs/benchmarks.md)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="parent of the temporary data directory (default: the system temp dir)",
    )
    p.add_argument("--no-strace", action="store_true", help="do not count fsync calls")
    p.add_argument("--keep", action="store_true", help="keep the data and outputs")
    p.add_argument(
        "--profile",
        metavar="WORKLOAD/VARIANT",
        help="cProfile one run and print the top functions",
    )
    return p.parse_args(argv)


def config_for(args: argparse.Namespace) -> W.Config:
    config = W.Config()
    if args.quick:
        config = dataclasses.replace(config, rounds=3, cache_writes=1000, cache_writes_full=1000,
                                     scale_sizes=(1000, 10_000), scale_rounds=2, recover_calls=1000)  # fmt: skip
    if args.tiny:
        config = dataclasses.replace(config, shape=_data.TINY, rounds=1, cache_writes=20, cache_writes_full=10,
                                     scale_sizes=(10, 100), scale_rounds=1, recover_calls=20)  # fmt: skip
    if args.rounds:
        config = dataclasses.replace(config, rounds=args.rounds)
    return config


def profile(bench: W.Bench, spec: str) -> None:
    workload, variant = spec.split("/", 1)
    for w in make_workloads(bench, [workload]):
        for v in w.variants:
            if v.key == variant:
                v.run(v.setup(bench))  # warm-up
                state = v.setup(bench)
                prof = cProfile.Profile()
                prof.enable()
                v.run(state)
                prof.disable()
                stats = pstats.Stats(prof, stream=sys.stdout)
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats(30)
                return
    raise SystemExit(f"no variant {spec}")


def _compile_fstx() -> None:
    """Byte-compile fstx as an install would, before any process imports it.

    pip and uv write ``.pyc`` files when they install a package (so do the
    baselines' own installs); a source checkout run with
    ``PYTHONDONTWRITEBYTECODE`` would compile fstx afresh in every
    end-to-end process and charge that to fstx.
    """
    import compileall

    import fstx

    compileall.compile_dir(os.path.dirname(fstx.__file__), quiet=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    config = config_for(args)
    _compile_fstx()
    keys = args.only.split(",") if args.only else list(ALL)
    unknown = set(keys) - set(ALL) - {"cache-none", "cache-full"}
    if unknown:
        raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fstx-bench-", dir=parent))
    bench = W.Bench(workdir, config)
    if args.tiny:
        W.SYNC = (
            False  # tiny data proves that the runner works; its numbers mean nothing
        )
    try:
        log(f"data in {workdir}")
        bench.prepare()
        if args.profile:
            profile(bench, args.profile)
            return 0
        sections: List[str] = []
        targets: List[Tuple[str, str, str, bool]] = []
        for w in make_workloads(bench, [k for k in keys if k != "scaling"]):
            times = measure(bench, w, config.rounds, warm_up=not args.tiny)
            syncs: Dict[str, Optional[Dict[str, int]]] = {}
            if not args.no_strace:
                for v in w.variants:
                    if v.available is None:
                        syncs[v.key] = count_syncs(bench, w.key, v.key)
            sections += workload_section(w, times, syncs)
            sections += extra_ratios(w, times)
            for t in w.targets:
                r = ratios(times, t.num, t.den)
                if r is not None:
                    targets.append(
                        (t.text, str(r), f"{t.limit:.2f}", r.median <= t.limit)
                    )
        if "scaling" in keys:
            runs, traced = measure_scaling(bench)
            lines, more = scaling_section(bench, runs, traced)
            sections += lines + [""]
            targets += more
            if W.memory_fs() is not None:
                runs, traced = measure_scaling(bench, memory=True)
                lines, more = scaling_section(bench, runs, traced, memory=True)
                sections += lines + [""]
                targets += more
        command = "python -m benchmarks " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        results = render(command.strip(), bench, sections, targets)
        write_output(args.output, results)
        print(results)
        log(f"results written to {args.output}")
    finally:
        if not args.keep:
            log("removing the benchmark data (after the last measurement)")
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
