#!/usr/bin/env python3
"""What the per-action module cache costs a Swift compile, side by side in one run.

    python3 benchmarks/bench_toolcache.py [--rounds 5]

One small module importing Foundation and a C module behind a module map, compiled (`-c`, one object) through a
real stack's ActionExecutor, in alternating order:

- `seeded`: treemat's choice: a private cache per action over the read-only seed of system modules
  (`-module-cache-path {TOOL_CACHE}/...`);
- `empty`: a private, empty cache per action (no seed: every compile rebuilds the system modules);
- `shared` (the old, unsafe way, for reference): swiftc run directly with one persistent module cache.

Prints min and median (ms) per row and each row against `shared`. Needs swiftc.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_staging import time_alternating
from treemat.executor import ActionRequest, RequestInput
from treemat.flagfile import ActionSpec
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.sandbox import TOOL_CACHE
from treemat.stack import open_stack

SWIFTC = shutil.which("swiftc") or "/opt/swift/usr/bin/swiftc"
SOURCE = "import Foundation\nimport CVal\npublic func f() -> String { String(val()) + Date().description }\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-toolcache-", dir="/var/tmp"))
    stack = open_stack(Root(work / "root"), background_cleanup=False)
    try:
        execroot = work / "execroot"
        (execroot / "mod").mkdir(parents=True)
        (execroot / "mod/module.modulemap").write_text('module CVal {\n  header "val.h"\n  export *\n}\n')
        (execroot / "mod/val.h").write_text("static inline int val(void) { return 7; }\n")
        (execroot / "lib.swift").write_text(SOURCE)
        paths = ["mod/module.modulemap", "mod/val.h", "lib.swift"]
        inputs = [RequestInput(p, hashlib.sha256((execroot / p).read_bytes()).hexdigest()) for p in paths]
        flags = ["-c", "-parse-as-library", "-Xcc", "-fmodule-map-file=mod/module.modulemap", "lib.swift"]

        def through_treemat(cache: str) -> Callable[[], None]:
            argv = [SWIFTC, "-module-cache-path", cache, *flags, "-o", "out/lib.o"]
            spec = ActionSpec(argv=argv, outputs=["out/lib.o"])

            def run() -> None:
                result = stack.executor.execute(ActionRequest(spec, inputs, execroot))
                assert result.exit_code == 0, result.output

            return run

        shared_cache = work / "shared-cache"

        def shared() -> None:
            argv = [SWIFTC, "-module-cache-path", str(shared_cache), *flags, "-o", str(work / "lib.o")]
            subprocess.run(argv, cwd=execroot, check=True, capture_output=True)

        rows: dict[str, Callable[[], None]] = {
            "seeded (treemat)": through_treemat("{TOOL_CACHE}/swift-module-cache"),
            "empty per action": through_treemat(f"{TOOL_CACHE}/swift-module-cache"),  # no placeholder: no seed
            "shared (old, unsafe)": shared,
        }
        for run in rows.values():  # warm-up: builds the seed, fills the shared cache
            run()
        times = time_alternating(rows, args.rounds)
        reference = statistics.median(times["shared (old, unsafe)"])
        print(f"{'swiftc -c, 1 module':<24} {'min ms':>8} {'median ms':>10} {'x shared':>9}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<24} {min(values):8.0f} {median:10.0f} {median / reference:9.2f}")
        print(f"({args.rounds} rounds, alternating order; isolation {stack.isolation})")
    finally:
        stack.close()
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
