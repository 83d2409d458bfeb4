"""What reading every input's exec bit from the execroot costs a warm worker, per input (min and median).

`python3 benchmarks/bench_execbit.py [N]`: N inputs (default 2,000) in a SwiftCompile-like tree under /var/tmp;
prints the whole warm tree build (restaging), a bare `os.stat` loop over the same paths, and the diff of an
unchanged request against its pooled exec dir (the reuse path), each in µs per input over 15 rounds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from treemat.executor import ActionRequest, RequestInput, pool_key
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.stack import open_stack

ROUNDS = 15


def per_input(job: Callable[[], object], count: int) -> str:
    """min / median µs per input of `job` over ROUNDS runs."""
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        job()
        times.append(time.perf_counter() - started)
    return f"min {min(times) * 1e6 / count:.3f} median {statistics.median(times) * 1e6 / count:.3f} µs/input"


def main(count: int) -> None:
    """Build the tree, warm a worker's stack on it, time the three loops."""
    scratch = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="bench-execbit-"))
    try:
        execroot = scratch / "execroot"
        inputs = []
        for i in range(count):
            path = f"bazel-out/k8-fastbuild/bin/pkg{i % 40}/sub/file{i}.swift"
            data = f"// {i}\n".encode() * 20
            (execroot / path).parent.mkdir(parents=True, exist_ok=True)
            (execroot / path).write_bytes(data)
            inputs.append(RequestInput(path, hashlib.sha256(data).hexdigest()))
        with open_stack(Root(scratch / "root"), background_cleanup=False) as stack:
            executor = stack.executor
            spec = ActionSpec(argv=["sh", "-c", "echo > out/x"], outputs=["out/x"])
            request = ActionRequest(spec, inputs, execroot)
            executor.inputs.build_tree(request)
            print("warm tree build (restaging):", per_input(lambda: executor.inputs.build_tree(request), count))
            paths = [f"{execroot}/{item.path}" for item in inputs]
            print("bare os.stat loop:          ", per_input(lambda: [os.stat(p) for p in paths], count))
            assert executor.execute(request).exit_code == 0
            if executor.pool is not None:
                entry = executor.pool.acquire(pool_key(request))
                assert entry is not None
                again = ActionRequest(spec, list(inputs), execroot)
                print("reuse diff, nothing changed:", per_input(lambda: executor.inputs.delta(again, entry), count))
                executor.pool.release(entry)
            executor.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
