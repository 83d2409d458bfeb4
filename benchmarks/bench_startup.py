#!/usr/bin/env python3
"""A fresh worker's start-up, black-box: spawn -> first reply of a 1-input request, against a bare interpreter.

    python3 benchmarks/bench_startup.py [--rounds 10] [--baseline NAME=OTHER/tools ...] [--no-bytecode]
        [--fresh-root] [--bazel-bin bazel-bin]

Each round times, in alternating order (wall clock, from this process):

- `python3 -c pass`: spawn -> exit of a bare interpreter (the floor the CI-speed issue's target is stated against);
  `python3 -S -c pass` the same without `site` (site-packages and their .pth files: what the launcher skips);
- `fork+exec touch`: the tool alone, as a plain child (the part of a first request no worker can avoid);
- `worker (in-process)`: spawn `python3 -m treemat --persistent_worker --root=R` (Bazel's command line) with
  TREEMAT_SERVICE=0, write one varint-delimited WorkRequest proto on its stdin (real bytes: 1 input,
  `touch out/x`, as Bazel writes them), read the delimited WorkResponse from its stdout; the worker is then
  closed and reaped outside the timing;
- `relay, warm service`: the same with TREEMAT_SERVICE=1: the relay forwards to the root's stager service,
  which outlives it (started in the warm-up round);
- `relay, cold service`: the same, but the service is killed (outside the timing) after every round: the relay
  starts it (a fresh machine, a reboot, or after the service exited idle);
- `py_binary stub, ...` and `shell launcher, ...` (`--bazel-bin`): a warm-service relay started as Bazel starts the
  worker, through the py_binary's Python stub (one more interpreter start) or the rules' shell launcher
  (rules/private/launcher.bzl, what the rules run, `python -S`), and that launcher with `site` (no `-S`); the
  launcher with a cold service (it starts the service, as on a fresh CI machine);
  `shell launcher, new output base`: that launcher and its runfiles tree copied to a new path before each start
  (outside the timing), as every CI build (a new output base) has them; `path-keyed bytecode`: the same with
  PYTHONPYCACHEPREFIX set (Python's path-keyed cache, as treemat ran before bytecode.py);
- `NAME worker (in-process)`, `NAME relay, cold service` (each `--baseline NAME=DIR`): the same through another
  checkout's package (a worktree of main), side by side with this one's.

Each row has its own root, kept across rounds (Bazel restarts workers on the same root: the blob is in its CAS
and ledger). The worker runs without PYTHONDONTWRITEBYTECODE, as users run it (__main__ keeps compiled modules in
~/.cache/treemat/pycache); `--no-bytecode` keeps the variable: every treemat module compiled at each start.
Prints min and median (ms); `x bare` is a row's median over the bare interpreter's, both of this run; `min x
bare min` the same of the minimums (steadier when other work loads the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from treemat import protos
from treemat.framing import encode_delimited, read_delimited
from treemat.fsprims import remove_tree

TOOLS = Path(__file__).resolve().parents[1] / "tools"


class FreshWorker:
    """Starts a new worker per call and waits for its first reply; `reap` ends them (outside the timings)."""

    def __init__(
        self,
        execroot: Path,
        root: Path,
        tools: Path,
        *,
        keep_no_bytecode: bool,
        service: str = "0",
        cold: bool = False,
        fresh_root: bool = False,
        program: list[str] | None = None,
        moving_launcher: Path | None = None,
    ) -> None:
        self.execroot = execroot
        self.base_root = self.root = root
        self.cold = cold
        self.fresh_root = fresh_root
        self.starts = 0
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools), os.environ.get("PYTHONPATH", "")])}
        self.env["TREEMAT_SERVICE"] = service
        if not keep_no_bytecode:
            self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.payload = request_bytes(execroot)
        self.running: list[subprocess.Popen[bytes]] = []
        self.program = program or [sys.executable, "-m", "treemat"]
        self.moving_launcher = moving_launcher
        self.moves = 0
        if moving_launcher:
            self.move_launcher()

    def move_launcher(self) -> None:
        """A copy of the built launcher and its runfiles tree at a new path, as every new output base has it."""
        assert self.moving_launcher is not None
        self.moves += 1
        where = self.base_root.parent / f"{self.base_root.name}-output-base-{self.moves}"
        where.mkdir(parents=True)
        shutil.copy2(self.moving_launcher, where / "launcher")
        runfiles = self.moving_launcher.with_name("launcher.runfiles")
        shutil.copytree(runfiles, where / "launcher.runfiles", symlinks=True)
        self.program = [str(where / "launcher")]

    def __call__(self) -> None:
        if self.fresh_root:  # a new root for every start, as a test harness's temp dir or a fresh CI machine
            self.starts += 1
            self.root = self.base_root / f"start-{self.starts}"
        command = [*self.program, "--persistent_worker", "--protocol=proto", f"--root={self.root}"]
        proc = subprocess.Popen(command, cwd=self.execroot, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.running.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(self.payload)
        proc.stdin.flush()
        reply = read_delimited(proc.stdout, protos.WorkResponse)
        assert reply is not None and reply.exit_code == 0, reply

    def reap(self) -> None:
        for proc in self.running:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
        self.running.clear()
        if self.cold or self.fresh_root:
            end_services(self.root)
        if self.fresh_root and self.root.exists():
            remove_tree(self.root)
        if self.moving_launcher:  # outside the timing: the next start is from another output base
            self.move_launcher()


def end_services(root: Path) -> None:
    """Kill the stager services of `root` and wait until they are gone."""
    for pid_file in (root / "service").glob("*.pid"):
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}") and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
            time.sleep(0.005)
        pid_file.unlink(missing_ok=True)


def launcher_with_site(launcher: Path, work: Path) -> Path:
    """A copy of the built launcher without `-S` (the interpreter runs `site` first), beside a link to its
    runfiles: the launcher as it was before it skipped `site`, timed side by side with it."""
    text = launcher.read_text()
    if ' -S "$runfiles/' not in text:
        raise SystemExit(f"{launcher} does not start Python with -S: bazel build //tools/treemat:launcher")
    copy = work / "launcher-with-site"
    copy.write_text(text.replace(' -S "$runfiles/', ' "$runfiles/'))
    copy.chmod(0o755)
    (work / "launcher-with-site.runfiles").symlink_to(launcher.with_name("launcher.runfiles"))
    return copy


def request_bytes(execroot: Path) -> bytes:
    """One WorkRequest as Bazel writes it: the flagfile contract's arguments, one input with its hex digest."""
    message = protos.WorkRequest()
    message.arguments.extend(["--output=out/x", "--", "touch", "out/x"])
    entry = message.inputs.add()
    entry.path = "in/a"
    entry.digest = hashlib.sha256((execroot / "in/a").read_bytes()).hexdigest().encode()
    return encode_delimited(message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--root", type=Path, default=None, help="where the scratch dirs go (default: a temp dir)")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another checkout's tools/ dir, timed alongside as `NAME worker` (repeatable)",
    )
    parser.add_argument(
        "--fresh-root", action="store_true", help="also time starts on a new root each (nothing in its CAS or service/)"
    )
    parser.add_argument(
        "--bazel-bin",
        type=Path,
        default=None,
        help="also start the worker as Bazel does, through DIR/tools/treemat/treemat (the py_binary's stub) and "
        "DIR/tools/treemat/launcher (the rules' shell launcher); first: bazel build //tools/treemat:launcher",
    )
    parser.add_argument("--no-bytecode", action="store_true", help="keep PYTHONDONTWRITEBYTECODE if it is set")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=args.root))
    workers: list[FreshWorker] = []
    try:
        execroot = work / "execroot"
        (execroot / "in").mkdir(parents=True)
        (execroot / "out").mkdir()
        (execroot / "in/a").write_bytes(b"input\n")
        rows: dict[str, Callable[[], object]] = {
            "python3 -c pass": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
            "python3 -S -c pass": lambda: subprocess.run([sys.executable, "-S", "-c", "pass"], check=True),
            "fork+exec touch": lambda: subprocess.run(["touch", "out/x"], cwd=execroot, check=True),
        }
        baselines = [(name, Path(tools)) for name, _, tools in (b.partition("=") for b in args.baseline)]
        modes = [("worker (in-process)", TOOLS, "0", False), ("relay, warm service", TOOLS, "1", False)]
        modes.append(("relay, cold service", TOOLS, "1", True))
        if args.fresh_root:  # (a new root: nothing in its CAS or service/)
            modes += [("worker (in-process), new root", TOOLS, "0", False), ("relay, new root", TOOLS, "1", True)]
        for name, tools in baselines:  # another checkout's in-process worker and its relay starting the service
            modes += [
                (f"{name} worker (in-process)", tools, "0", False),
                (f"{name} relay, cold service", tools, "1", True),
            ]
        programs: dict[str, list[str]] = {}
        if args.bazel_bin:  # what Bazel starts: the py_binary's Python stub, or the rules' shell launcher
            built = args.bazel_bin.resolve() / "tools/treemat"
            launchers = [("py_binary stub", built / "treemat"), ("shell launcher", built / "launcher")]
            launchers.append(("shell launcher with site", launcher_with_site(built / "launcher", work)))
            for label, program in launchers:
                programs[f"{label}, relay, warm service"] = [str(program)]
                modes.append((f"{label}, relay, warm service", TOOLS, "1", False))
            programs["shell launcher, relay, cold service"] = [str(built / "launcher")]
            modes.append(("shell launcher, relay, cold service", TOOLS, "1", True))
            modes.append(("shell launcher, new output base, warm service", TOOLS, "1", False))
            modes.append(("shell launcher, new output base, path-keyed bytecode", TOOLS, "1", False))
        for number, (name, tools, service, cold) in enumerate(modes):
            root = work / f"root-{number}"
            worker = FreshWorker(
                execroot,
                root,
                tools,
                keep_no_bytecode=args.no_bytecode,
                service=service,
                cold=cold,
                fresh_root=name.endswith("new root"),
                program=programs.get(name),
                moving_launcher=built / "launcher" if "new output base" in name else None,
            )
            if name.endswith("path-keyed bytecode"):  # as before bytecode.py: an explicit prefix wins over it
                worker.env["PYTHONPYCACHEPREFIX"] = str(work / "pycache-by-path")
            workers.append(worker)
            rows[name] = workers[-1]
        times: dict[str, list[float]] = {name: [] for name in rows}
        for round_ in range(args.rounds + 1):  # round 0 warms up (the root's first use, compiled modules)
            order = list(rows.items()) if round_ % 2 else list(reversed(rows.items()))
            for name, run in order:
                started = time.perf_counter()
                run()
                if round_:
                    times[name].append((time.perf_counter() - started) * 1000)
            for worker in workers:
                worker.reap()
        report(times, args.rounds)
    finally:
        for worker in workers:
            worker.reap()
            end_services(worker.root)
        remove_tree(work)
    return 0


def report(times: dict[str, list[float]], rounds: int) -> None:
    bare, bare_min = statistics.median(times["python3 -c pass"]), min(times["python3 -c pass"])
    tool, tool_min = statistics.median(times["fork+exec touch"]), min(times["fork+exec touch"])
    print(f"{'spawn -> first reply':<40} {'min ms':>8} {'median ms':>10} {'x bare':>8} {'min x bare min':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<40} {min(values):8.1f} {median:10.1f} {median / bare:8.2f} {min(values) / bare_min:15.2f}")
    for name in (name for name in times if name not in ("python3 -c pass", "fork+exec touch")):
        start_up, start_min = statistics.median(times[name]) - tool, min(times[name]) - tool_min
        print(
            f"{name + ' minus the tool':<40} {'':8} {start_up:10.1f} {start_up / bare:8.2f}",
            f"{start_min / bare_min:15.2f}",
        )
    print(f"({rounds} rounds, alternating order; python {sys.version.split()[0]}, {os.uname().release})")


if __name__ == "__main__":
    sys.exit(main())
