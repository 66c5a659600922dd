"""Entry points for the runs that happen in a process of their own.

    python -m benchmarks.drivers wheel {installer,fstx-none,fstx-full} PREFIX WHEEL
    python -m benchmarks.drivers scale {plain,fstx-none,fstx-full} ROOT N [--trace]
    python -m benchmarks.drivers once WORKDIR CONFIG_JSON WORKLOAD VARIANT

``once`` sets up and runs one variant of one workload (for counting its
fsync calls under strace); it never calls ``sync`` itself.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List


def _scheme(prefix: str) -> Dict[str, str]:
    config = {
        "base": prefix,
        "platbase": prefix,
        "installed_base": prefix,
        "installed_platbase": prefix,
    }
    paths = sysconfig.get_paths("posix_prefix", vars=config)
    return {
        "purelib": paths["purelib"],
        "platlib": paths["platlib"],
        "headers": os.path.join(paths["include"], "bigpkg"),
        "scripts": paths["scripts"],
        "data": paths["data"],
    }


def wheel(kind: str, prefix: str, path: str) -> None:
    from installer import install
    from installer.sources import WheelFile

    scheme = _scheme(prefix)
    if kind == "installer":
        from installer.destinations import SchemeDictionaryDestination

        dest = SchemeDictionaryDestination(scheme, sys.executable, "posix")
        with WheelFile.open(path) as source:
            install(source, dest, {"INSTALLER": b"bench"})
        return
    import fstx
    from fstx.integrations.installer import TransactionalDestination

    durability = kind.split("-", 1)[1]
    with fstx.transaction(prefix, durability=durability) as tx:
        tdest = TransactionalDestination(tx, scheme, sys.executable, "posix")
        with WheelFile.open(path) as source:
            install(source, tdest, {"INSTALLER": b"bench"})


def _maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def scale(kind: str, root: str, n: int, trace: bool) -> None:
    """Write ``n`` small files in directories of 100: plain, or as one transaction."""
    import fstx

    payload = b"x" * 64
    names = [f"d{i // 100:05d}/f{i:07d}" for i in range(n)]
    if trace:
        import tracemalloc

        tracemalloc.start()
    rss0 = _maxrss_kib()
    start = time.perf_counter()
    plan = 0.0
    if kind == "plain":
        made = set()
        for name in names:
            parent = name.split("/", 1)[0]
            if parent not in made:
                os.mkdir(os.path.join(root, parent))
                made.add(parent)
            fd = os.open(
                os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
            )
            os.write(fd, payload)
            os.close(fd)
    else:
        tx = fstx.transaction(root, durability=kind.split("-", 1)[1])
        for name in names:
            tx.write_bytes(name, payload)
        plan = time.perf_counter() - start
        tx.commit()
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "plan_seconds": plan,
        "commit_seconds": seconds - plan if plan else 0.0,
        "rss_kib_per_op": (_maxrss_kib() - rss0) / n,
    }
    if trace:
        import tracemalloc

        result["traced_kib_per_op"] = tracemalloc.get_traced_memory()[1] / 1024 / n
    print(json.dumps(result))


def once(workdir: str, config_json: str, workload: str, variant: str) -> None:
    from benchmarks import run, workloads

    workloads.SYNC = False
    bench = workloads.Bench(Path(workdir), run.config_from_json(config_json))
    bench.prepare()
    for w in run.make_workloads(bench, [workload]):
        for v in w.variants:
            if v.key == variant:
                v.run(v.setup(bench))
                return
    raise SystemExit(f"no variant {workload}/{variant}")


def main(argv: List[str]) -> None:
    cmd, *args = argv
    if cmd == "wheel":
        wheel(*args)
    elif cmd == "scale":
        scale(args[0], args[1], int(args[2]), "--trace" in args[3:])
    elif cmd == "once":
        once(*args)
    else:
        raise SystemExit(f"unknown driver {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
