#!/usr/bin/env python3
"""A real worker process driven as Bazel drives it: the incremental round trip, and its RSS over many requests.

    python3 benchmarks/bench_roundtrip.py [--shapes 635,1978,10000] [--rounds 15] [--profile DIR] [--compare TOOLS]
    python3 benchmarks/bench_roundtrip.py --rss [--requests 10000] [--rss-inputs 64]

Round trip (default): per shape, a fresh `python3 -m treemat --persistent_worker --protocol=proto --root=R`
(Bazel's command line, cwd = the execroot) gets varint-delimited WorkRequest protos with multiplex request ids
on its stdin (real bytes, inputs sorted by path with their hex digests, as Bazel writes them) and answers on
stdout. After a warm-up (the N-input action twice, the 1-input action), each round, in alternating order:

- `N inputs, one changed`: one input's content is edited, then the N-input request's bytes are written and the
  response's bytes read (the timing covers bytes in -> bytes out, nothing else);
- `1 input`: the same tool (`touch out/x`) with one input: the fixed cost of a request.

`incremental` is the first minus the second (minimum minus minimum, median minus median). The issue's goal:
<= 5 ms, flat from 635 to 10,000 inputs. `--profile DIR` runs the worker under `py-spy record` (every thread;
slower: read the profile for what grows, not the timings), writes DIR/worker-N.txt (folded stacks) and prints
the functions with the most samples. `--compare OTHER/tools` (repeatable) runs another tree's worker beside this
one's, on its own copy of the execroot, rounds interleaved: before/after figures from one run.

RSS (`--rss`): one worker, `--requests` requests of `--rss-inputs` inputs each with one input changed every
time, between two recurring contents (`--fresh-blobs`: new content every time, as in a long build where new
blobs keep arriving); prints the worker's VmRSS from /proc after the first request and every 1,000.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from treemat import protos
from treemat.framing import encode_delimited, read_delimited
from treemat.fsprims import remove_tree

TOOLS = Path(__file__).resolve().parents[1] / "tools"


class WorkerProcess:
    """One `treemat --persistent_worker` child speaking the proto protocol; requests get increasing ids."""

    def __init__(self, execroot: Path, root: Path, tools: Path = TOOLS) -> None:
        command = [sys.executable, "-m", "treemat", "--persistent_worker", "--protocol=proto", f"--root={root}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(command, cwd=execroot, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.next_id = 1
        self.profiler: subprocess.Popen[bytes] | None = None

    def start_profiler(self, profile: Path) -> None:
        """Attach `py-spy record` (every thread; cProfile would see only the thread reading stdin)."""
        spy = ["py-spy", "record", "--rate", "1000", "--format", "raw", "-o", str(profile)]
        self.profiler = subprocess.Popen(
            [*spy, "--pid", str(self.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(1.0)  # py-spy's attach: the samples start after it

    def encode(self, inputs: list[tuple[str, str]], output: str = "out/x") -> bytes:
        """A WorkRequest as Bazel writes it: the flagfile contract's arguments, inputs sorted, a multiplex id.

        The output names the action: a pooled exec dir is reused by the next action with the same outputs."""
        message = protos.WorkRequest()
        message.arguments.extend([f"--output={output}", "--", "touch", output])
        message.request_id = self.next_id
        self.next_id += 1
        for path, digest in sorted(inputs):
            entry = message.inputs.add()
            entry.path = path
            entry.digest = digest.encode()
        return encode_delimited(message)

    def round_trip(self, payload: bytes) -> float:
        """Seconds from writing the request's bytes to having read its response's bytes."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        started = time.perf_counter()
        self.proc.stdin.write(payload)
        self.proc.stdin.flush()
        reply = read_delimited(self.proc.stdout, protos.WorkResponse)
        elapsed = time.perf_counter() - started
        if reply is None or reply.exit_code != 0:
            raise SystemExit(f"worker failed: {reply}")
        return elapsed

    def cpu_ns(self) -> int:
        """CPU time run so far by the worker's threads and its children's (the sandbox helper), in ns."""
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids += [int(pid) for pid in children.read_text().split()] if children.exists() else []
        total = 0
        for pid in pids:
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    total += int((task / "schedstat").read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    continue  # a thread that ended meanwhile
        return total

    def settle(self, quiet_ms: float = 20.0, limit_s: float = 5.0) -> None:
        """Wait until the worker's deferred work (removals, ledger writes, a spare namespace) is done: its CPU
        time stays unchanged for `quiet_ms`. Keeps one request's leftovers out of the next one's timing."""
        deadline = time.monotonic() + limit_s
        last = self.cpu_ns()
        while time.monotonic() < deadline:
            time.sleep(quiet_ms / 1000)
            now = self.cpu_ns()
            if now == last:
                return
            last = now

    def rss_kib(self) -> int:
        """The worker's resident set (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        """EOF on stdin: the worker drains and exits (py-spy then writes its profile)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()
        if self.profiler is not None:
            self.profiler.wait()


def make_inputs(execroot: Path, count: int, total_bytes: int = 32 << 20) -> list[tuple[str, str]]:
    """`count` files in about count/6 directories, SwiftCompile-like paths, about `total_bytes` in all."""
    inputs = []
    per_file = max(4, total_bytes // max(count, 1))
    for index in range(count):
        rel = f"bazel-out/k8/bin/mod{index % (count // 50 + 1)}/sub{index % 6}/f{index}.swiftmodule"
        path = execroot / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = index.to_bytes(4, "little") * (per_file // 4)
        path.write_bytes(data)
        inputs.append((rel, hashlib.sha256(data).hexdigest()))
    return inputs


def edit(execroot: Path, inputs: list[tuple[str, str]], index: int, stamp: int) -> None:
    """Give input `index` the content its first bytes plus `stamp` make, and that digest in `inputs`."""
    rel = inputs[index][0]
    path = execroot / rel
    data = path.read_bytes()[:64] + stamp.to_bytes(8, "little")
    path.write_bytes(data)
    inputs[index] = (rel, hashlib.sha256(data).hexdigest())


def ms(values: list[float]) -> str:
    """ "min median" in milliseconds."""
    return f"{min(values) * 1000:8.2f} {statistics.median(values) * 1000:8.2f}"


@dataclass
class Contender:
    """One tree's worker on its own execroot (same files), with its timings."""

    label: str
    execroot: Path
    inputs: list[tuple[str, str]]
    worker: WorkerProcess
    big: list[float] = field(default_factory=list)
    small: list[float] = field(default_factory=list)


SINGLE = [("one/a", hashlib.sha256(b"one input\n").hexdigest())]


def start_contender(work: Path, count: int, label: str, tools: Path) -> Contender:
    """An execroot of `count` inputs (plus the 1-input action's) and a warmed-up worker from `tools`."""
    execroot = work / f"execroot-{count}-{label}"
    inputs = make_inputs(execroot, count)
    (execroot / "one").mkdir()
    (execroot / "one/a").write_bytes(b"one input\n")
    (execroot / "out").mkdir()
    worker = WorkerProcess(execroot, work / f"root-{count}-{label}", tools)
    for _ in range(2):
        worker.round_trip(worker.encode(inputs))
    worker.round_trip(worker.encode(SINGLE, "out/one"))
    return Contender(label, execroot, inputs, worker)


def measure_round_trip(work: Path, count: int, rounds: int, profile_dir: Path | None, trees: list[Path]) -> None:
    """One fresh worker per shape and tree (`--compare`: rounds interleaved); prints the N-input, 1-input and
    incremental rows of each."""
    contenders: list[Contender] = []
    try:
        for index, tools in enumerate(trees):
            contenders.append(start_contender(work, count, "this" if index == 0 else f"compare{index}", tools))
        if profile_dir is not None:
            for contender in contenders:
                contender.worker.start_profiler(profile_dir / f"worker-{count}-{contender.label}.txt")
        for round_ in range(rounds):
            for contender in contenders if round_ % 2 else reversed(contenders):
                edit(contender.execroot, contender.inputs, (round_ * 7919) % count, round_)
                rows = [(contender.big, contender.inputs, "out/x"), (contender.small, SINGLE, "out/one")]
                for times, request, output in rows if round_ % 2 else reversed(rows):
                    payload = contender.worker.encode(request, output)
                    contender.worker.settle()
                    times.append(contender.worker.round_trip(payload))
    finally:
        for contender in contenders:
            contender.worker.close()
    for contender in contenders:
        big, small, name = contender.big, contender.small, f"{count} {contender.label}"
        print(f"{name:>16} {'N inputs, one changed':<24} {ms(big)}")
        print(f"{name:>16} {'1 input':<24} {ms(small)}")
        incremental_min = (min(big) - min(small)) * 1000
        incremental_median = (statistics.median(big) - statistics.median(small)) * 1000
        print(f"{name:>16} {'incremental':<24} {incremental_min:8.2f} {incremental_median:8.2f}")
    sys.stdout.flush()
    if profile_dir is not None:
        for contender in contenders:
            print(f"== {count} inputs, {contender.label}")
            print_hot_frames(profile_dir / f"worker-{count}-{contender.label}.txt")


def print_hot_frames(profile: Path, top: int = 25) -> None:
    """treemat's functions by samples (inclusive: every frame of a stack) in a py-spy raw profile, and by own
    samples (the innermost frame), over the stacks that pass through treemat but not idle waits."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or not any("treemat/" in f for f in frames) or "read_varint" in stack:
            continue
        total += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            if "treemat/" in frame:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
    print(f"  py-spy samples in treemat (busy): {total}")
    for title, table in (("inclusive", inclusive), ("own", own)):
        for frame, samples in sorted(table.items(), key=lambda item: -item[1])[:top]:
            print(f"  {title:>9} {samples * 100 / max(total, 1):5.1f}%  {frame}")


def measure_rss(work: Path, requests: int, count: int, fresh_blobs: bool) -> None:
    """One worker, `requests` requests of `count` inputs with one input changed each time; VmRSS every 1,000.

    The changed input alternates between two contents (the blobs recur: what grows is per request), or with
    `fresh_blobs` gets new content every time (one new blob per request: per-blob state grows too)."""
    execroot = work / "execroot-rss"
    inputs = make_inputs(execroot, count, total_bytes=count * 4096)
    (execroot / "out").mkdir()
    worker = WorkerProcess(execroot, work / "root-rss")
    blobs = "a new blob per request" if fresh_blobs else "two recurring contents"
    print(f"{requests} requests of {count} inputs, one changed each time ({blobs}); row 0: after the first")
    print(f"{'requests':>8} {'VmRSS MiB':>10} {'last 1k ms (median)':>20}")
    try:
        window: list[float] = []
        for index in range(requests + 1):
            if index % 1000 == 0 and index:
                print(f"{index:>8} {worker.rss_kib() / 1024:>10.1f} {statistics.median(window) * 1000:>20.2f}")
                sys.stdout.flush()
                window.clear()
            if index == requests:
                break
            edit(execroot, inputs, index % count, index if fresh_blobs else index % 2)
            window.append(worker.round_trip(worker.encode(inputs)))
            if index == 0:
                print(f"{0:>8} {worker.rss_kib() / 1024:>10.1f} {'-':>20}")
    finally:
        worker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="635,1978,10000")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", type=Path, default=None, help="run the worker under cProfile, write here")
    parser.add_argument("--rss", action="store_true", help="the worker's RSS over --requests requests instead")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rss-inputs", type=int, default=64)
    parser.add_argument("--fresh-blobs", action="store_true", help="--rss: a new blob per request")
    parser.add_argument("--scratch", type=Path, default=None, help="where the execroots and roots go")
    parser.add_argument(
        "--compare", type=Path, action="append", default=[], help="another tree's tools/ dir, run side by side"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-roundtrip-", dir=args.scratch))
    try:
        if args.rss:
            measure_rss(work, args.requests, args.rss_inputs, args.fresh_blobs)
            return 0
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        print(f"{'inputs tree':>16} {'row':<24} {'min ms':>8} {'med ms':>8}")
        for index, tools in enumerate(args.compare, start=1):
            print(f"compare{index} = {tools.resolve()}")
        for count in (int(n) for n in args.shapes.split(",")):
            measure_round_trip(work, count, args.rounds, args.profile, [TOOLS, *args.compare])
        print(f"({args.rounds} rounds, alternating order; fresh worker per shape; python {sys.version.split()[0]})")
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
