#!/usr/bin/env python3
"""The fixed cost of running a tool sandboxed, against a plain fork+exec, side by side in one run.

    python3 benchmarks/bench_sandbox.py [--rounds 30] [--block 5] [--root DIR] [--inputs 1,1978]

For `/bin/true` (the tool's own cost is ~nothing), each round times, in alternating order, a block of `--block`
runs of each row back to back (reported per run: the block's mean):

- `fork+exec`: subprocess.Popen + wait, stdout on a pipe read to EOF (what an unsandboxed worker pays);
- `copy-on-write` / `overlay`: Sandbox.start + read to EOF + wait through sandboxd (fresh mount+pid namespaces:
  overlay takes a spare cloned ahead, copy-on-write clones one per run; the view: exec dir bound or overlaid,
  private /tmp, /dev/shm, read-only remount, TREEMAT_ROOT masked, fresh /proc; an init as pid 1, the tool pid 2);
- `action`: a whole action through the stack's ActionExecutor (`touch out/x`: stage, run, collect, finish), with 1
  input and with 1,978 (a SwiftCompile's shape; after the first round its exec dir is reused and patched).

Prints min and median per row (ms) and each row's overhead over fork+exec (difference of medians). The CI-speed
issue's budget is <= 3 ms over fork+exec for the sandbox itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
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
from treemat.sandbox import ISOLATION_COW, ISOLATION_OVERLAY, Sandbox, ToolPlan, open_sandbox
from treemat.stack import open_stack
from treemat.toolrun import read_bounded

TOOL = ["/bin/true"]


def fork_exec() -> None:
    proc = subprocess.Popen(TOOL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.read()
    proc.wait()


def sandboxed(sandbox: Sandbox, work: Path, overlay: bool) -> Callable[[], None]:
    exec_dir = work / f"exec-{sandbox.mode}"
    exec_dir.mkdir()
    (exec_dir / "input").write_bytes(b"x")

    def run() -> None:
        process = sandbox.start(ToolPlan(list(TOOL), {"PATH": "/usr/bin:/bin"}, exec_dir, None, overlay))
        try:
            read_bounded(process.output_fd)
            assert process.wait() == 0
        finally:
            os.close(process.output_fd)
            os.close(process.view_fd)

    return run


def whole_action(root: Path, work: Path, count: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """`touch out/x` with `count` inputs through a stack of its own (after the first round: a reused exec dir)."""
    stack = open_stack(Root(root), background_cleanup=False)
    execroot = work / f"execroot-{count}"
    inputs = []
    for index in range(count):
        path = f"in/{index % 40}/f{index}.swiftmodule"
        data = f"input {index}\n".encode() * 64
        (execroot / path).parent.mkdir(parents=True, exist_ok=True)
        (execroot / path).write_bytes(data)
        inputs.append(RequestInput(path, hashlib.sha256(data).hexdigest()))
    spec = ActionSpec(argv=["touch", "out/x"], outputs=["out/x"])

    def run() -> None:
        result = stack.executor.execute(ActionRequest(spec, inputs, execroot))
        assert result.exit_code == 0, result.output

    return run, stack.close


def in_blocks(run: Callable[[], None], count: int) -> Callable[[], None]:
    """`run`, `count` times back to back: what a row costs includes the work it leaves for the next run (the
    sandbox helper prepares the next namespace once a tool ends), not spilled into another row's timing."""

    def block() -> None:
        for _ in range(count):
            run()

    return block


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=5, help="runs of a row back to back per round (timed as a mean)")
    parser.add_argument("--inputs", default="1,1978", help="input counts of the whole-action rows (comma-separated)")
    parser.add_argument("--root", type=Path, default=None, help="where the scratch root goes (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sandbox-", dir=args.root))
    closers: list[Callable[[], None]] = []
    try:
        rows: dict[str, Callable[[], None]] = {"fork+exec": fork_exec}
        for mode in (ISOLATION_COW, ISOLATION_OVERLAY):
            sandbox = open_sandbox(Root(work / "root"), mode)
            closers.append(sandbox.close)
            rows[mode] = sandboxed(sandbox, work, overlay=mode == ISOLATION_OVERLAY)
        for count in (int(text) for text in args.inputs.split(",") if text):
            action, close_stack = whole_action(work / f"stack-root-{count}", work, count)
            closers.append(close_stack)
            rows[f"action ({count} input{'s' if count > 1 else ''}, touch)"] = action
        for run in rows.values():  # warm-up: one of each
            run()
        times = time_alternating({name: in_blocks(run, args.block) for name, run in rows.items()}, args.rounds)
        times = {name: [value / args.block for value in values] for name, values in times.items()}
        floor = statistics.median(times["fork+exec"])
        print(f"{'run of /bin/true':<30} {'min ms':>8} {'median ms':>10} {'over fork+exec':>15}")
        for name, values in times.items():
            over = statistics.median(values) - floor
            print(f"{name:<30} {min(values):8.2f} {statistics.median(values):10.2f} {over:+14.2f}")
        print(
            f"({args.rounds} rounds of {args.block} runs per row, alternating order; the mean of a block per round; "
            f"python {sys.version.split()[0]}, {os.uname().release})"
        )
    finally:
        for close in closers:
            close()
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
