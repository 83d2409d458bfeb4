#!/usr/bin/env python3
"""Whole-request staging through the executor vs a C program doing the same syscalls, first and incremental.

    sudo python3 benchmarks/bench_staging.py [--fs ext4,xfs,btrfs] [--shapes 635,1978,10000] [--rounds 5]

For each filesystem (a fresh loop-mounted image, so the root disk's noise stays out) and each tree shape
(SwiftCompile-like: files spread over ~1 directory per 6 files), it measures in one run, side by side:

- first: a warm worker stages a tree layout it has not seen (no pooled exec dir), runs `true`, and cleans up:
  the request minus the tool, against `floor`, a C program that stats every input, mkdirs, links every file
  from the CAS, re-stats it, then removes the tree;
- incremental: the same action again with one input edited: the exec dir is reused and patched; the
  request minus the tool, and (`staging`) just decoding the request and patching the exec dir;

Every timing starts from the WorkRequest's bytes, as the worker gets them: decoding is part of the request.
- fresh: a new worker process's first request: blobs whose state another process recorded in the verified
  ledger are trusted, the others hashed once; against the floor doing, per blob, the first-use syscalls the
  blob guard needs in a new process (open, fstat, inotify watch, fstat, close) before linking.
- fresh relay: a new `treemat --persistent_worker --protocol=proto` process with the stager service on (the
  root's service warm: started in a warm-up), once it waits on stdin: its first request's bytes in -> response
  bytes out (the tool, `true`, included), against the same fresh floor.

Prints min and median over rounds, and ratios to the floor. Needs root (loop mounts) and a C compiler.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from treemat import protos
from treemat.executor import ActionExecutor, ActionRequest, RequestInput
from treemat.flagfile import ActionSpec
from treemat.framing import encode_delimited, parse_message, read_delimited
from treemat.layout import Root
from treemat.manifest import InputManifest
from treemat.stack import open_stack

TOOLS = Path(__file__).resolve().parents[1] / "tools"

C_FLOOR = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>
/* usage: floor LIST [fresh]; lines: "S path" stat an input, "D dir" mkdir, "F src dst" link; then re-stat,
   remove. With "fresh", each blob is first checked as a new process must (the blob guard's first use): open it,
   fstat, an inotify write watch through /proc/self/fd, fstat again, close. */
#define MAX 200000
static char *dsts[MAX], *dirs[MAX];
int main(int argc, char **argv) {
  FILE *list = fopen(argv[1], "r");
  int fresh = argc > 2 && strcmp(argv[2], "fresh") == 0;
  int watcher = fresh ? inotify_init1(IN_NONBLOCK | IN_CLOEXEC) : -1;
  char line[8192], a[4096], b[4096], proc[64];
  int nf = 0, nd = 0;
  struct stat st;
  while (fgets(line, sizeof line, list)) {
    line[strcspn(line, "\n")] = 0;
    if (line[0] == 'S') { if (stat(line + 2, &st)) { perror(line + 2); return 1; } }
    else if (line[0] == 'D') {
      if (mkdir(line + 2, 0755)) { perror(line + 2); return 1; }
      dirs[nd++] = strdup(line + 2);
    }
    else if (sscanf(line, "F %4095s %4095s", a, b) == 2) {
      if (lstat(a, &st)) { perror(a); return 1; }
      if (fresh) {
        int fd = open(a, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st)) { perror(a); return 1; }
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        if (inotify_add_watch(watcher, proc, IN_MODIFY | IN_CLOSE_WRITE) < 0) { perror(proc); return 1; }
        fstat(fd, &st);
        close(fd);
      }
      if (link(a, b)) { perror(b); return 1; }
      dsts[nf++] = strdup(b);
    }
  }
  for (int i = 0; i < nf; i++) if (lstat(dsts[i], &st)) return 1;
  for (int i = 0; i < nf; i++) unlink(dsts[i]);
  for (int i = nd - 1; i >= 0; i--) rmdir(dirs[i]);
  return 0;
}
"""


def mount_image(work: Path, fs: str, size_gb: int = 2) -> Path | None:
    """A fresh loop-mounted filesystem of type `fs`, or None where that is impossible."""
    mkfs = shutil.which(f"mkfs.{fs}")
    if os.geteuid() != 0 or mkfs is None:
        return None
    image, mountpoint = work / f"{fs}.img", work / fs
    mountpoint.mkdir()
    with image.open("wb") as handle:
        handle.truncate(size_gb << 30)
    args = {"xfs": [mkfs, "-q", "-m", "reflink=1"], "btrfs": [mkfs, "-q"], "ext4": [mkfs, "-q", "-F"]}[fs]
    if subprocess.run([*args, str(image)], capture_output=True).returncode:
        return None
    if subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True).returncode:
        return None
    os.chmod(mountpoint, 0o700)
    return mountpoint


def make_inputs(execroot: Path, count: int, total_bytes: int) -> list[RequestInput]:
    """`count` files in ~count/6 directories, SwiftCompile-like paths, sizes summing to about `total_bytes`."""
    inputs = []
    per_file = max(1, total_bytes // count)
    for index in range(count):
        rel = f"bazel-out/k8/bin/mod{index % (count // 50 + 1)}/sub{index % 6}/f{index}.swiftmodule"
        path = execroot / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = index.to_bytes(4, "little") * (per_file // 4 + 1)
        path.write_bytes(data)
        inputs.append(RequestInput(rel, hashlib.sha256(data).hexdigest()))
    return inputs


def wire_payload(inputs: list[RequestInput]) -> bytes:
    """The inputs as Bazel sends them to a worker: a serialized WorkRequest (inputs sorted by path)."""
    request = protos.WorkRequest(arguments=["@bazel-out/k8/bin/action.params"], request_id=1)
    for path, digest in sorted(inputs):
        request.inputs.add(path=path, digest=(digest or "").encode())
    return bytes(request.SerializeToString())


def request_minus_tool(executor: ActionExecutor, execroot: Path, inputs: list[RequestInput], out: str) -> float:
    """One action as the worker runs it, from the request's bytes (decoded here, timed) to the response."""
    return timed_request(executor, execroot, inputs, out)[0]


def timed_request(
    executor: ActionExecutor, execroot: Path, inputs: list[RequestInput], out: str
) -> tuple[float, float]:
    """(the request minus the tool, its staging: decoding plus the executor's stage time), in seconds."""
    spec = ActionSpec(argv=["true"], outputs=[])
    spec.output_dirs.append(out)
    payload = wire_payload(inputs)
    started = time.perf_counter()
    message = parse_message(payload, protos.WorkRequest)
    manifest = InputManifest.from_proto(message, payload)
    decoded = time.perf_counter() - started
    result = executor.execute(ActionRequest(spec, manifest, execroot))
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"action failed: {result.output}")
    return elapsed - result.tool_seconds, decoded + result.stage_seconds


def c_floor(
    binary: Path,
    work: Path,
    execroot: Path,
    inputs: list[RequestInput],
    cas_dir: Path,
    dest: Path,
    *,
    fresh: bool = False,
) -> float:
    lines = [f"S {execroot / item.path}" for item in inputs]
    made: set[str] = set()
    lines.append(f"D {dest}")
    for item in inputs:
        parent = os.path.dirname(item.path)
        chain = []
        while parent and parent not in made:
            made.add(parent)
            chain.append(parent)
            parent = os.path.dirname(parent)
        lines += [f"D {dest / d}" for d in reversed(chain)]
        lines.append(f"F {cas_dir / (item.hash or '')[:2] / (item.hash or '')} {dest / item.path}")
    listing = work / "floor.list"
    listing.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    subprocess.run([str(binary), str(listing), *(["fresh"] if fresh else [])], check=True)
    return time.perf_counter() - started


def relay_first_request(root: Path, execroot: Path, inputs: list[RequestInput], out: str) -> float:
    """A fresh relay's first request, from its bytes in to the response's bytes out (seconds)."""
    env = {**os.environ, "PYTHONPATH": str(TOOLS), "TREEMAT_SERVICE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-m", "treemat", "--persistent_worker", "--protocol=proto", f"--root={root}"]
    proc = subprocess.Popen(command, cwd=execroot, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    request = protos.WorkRequest(arguments=[f"--output-dir={out}", "--", "true"], request_id=1)
    for path, digest in sorted(inputs):
        request.inputs.add(path=path, digest=(digest or "").encode())
    payload = encode_delimited(request)
    syscall = Path(f"/proc/{proc.pid}/syscall")
    while not syscall.read_text().startswith("0 0x0 "):  # connected to the service, reading stdin
        time.sleep(0.002)
    started = time.perf_counter()
    proc.stdin.write(payload)
    proc.stdin.flush()
    reply = read_delimited(proc.stdout, protos.WorkResponse)
    elapsed = time.perf_counter() - started
    proc.stdin.close()
    proc.wait()
    if reply is None or reply.exit_code != 0:
        raise SystemExit(f"the relay's request failed: {reply}")
    return elapsed


def end_services(root: Path) -> None:
    """Kill the stager services of `root` (the benchmark's scratch goes with it)."""
    for pid_file in (root / "service").glob("*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def release(mounts: list[Path], work: Path) -> None:
    """Unmount the loop images (lazily: a busy one goes once idle) and remove the work directory."""
    for mountpoint in mounts:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    shutil.rmtree(work, ignore_errors=True)


def build_c_program(work: Path, source: str, name: str, *link_flags: str) -> Path | None:
    """Compile `source` with cc -O2 into work/name (the C floors of the benchmarks); None without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    binary, source_file = work / name, work / f"{name}.c"
    source_file.write_text(source)
    if cc is None or subprocess.run([cc, "-O2", "-o", str(binary), str(source_file), *link_flags]).returncode:
        return None
    return binary


def time_alternating(rows: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each row's callable per round, the rows run in turn (order reversed every other round)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(rounds):
        order = list(rows.items())
        if round_ % 2:
            order.reverse()
        for name, run in order:
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def min_median(values: list[float], width: int = 7, digits: int = 1) -> str:
    """ "min median" of timings in seconds, as milliseconds (the benchmarks' one format)."""
    return f"{min(values) * 1000:{width}.{digits}f} {statistics.median(values) * 1000:{width}.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fs", default="ext4,xfs,btrfs")
    parser.add_argument("--shapes", default="635,1978,10000")
    parser.add_argument("--mb", type=int, default=64, help="total input bytes per shape (hashing cost scales)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--relay", action="store_true", help="also a fresh relay's first request (the service)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="treemat-staging-", dir="/var/tmp"))
    binary = build_c_program(work, C_FLOOR, "floor")
    if binary is None:
        print("no C compiler: cannot measure the floor", file=sys.stderr)
        return 1
    print(
        f"{'fs':<6} {'files':>6} {'phase':<12} {'min ms':>7} {'med ms':>7} {'floor min':>9} {'floor med':>9} "
        f"{'ratio(med)':>10}"
    )
    mounts: list[Path] = []
    try:
        for fs in args.fs.split(","):
            base = mount_image(work, fs)
            if base is None:
                print(f"{fs:<6} skipped: cannot mount a {fs} image here (needs root and mkfs.{fs})")
                continue
            mounts.append(base)
            for count in (int(n) for n in args.shapes.split(",")):
                execroot = base / f"execroot-{count}"
                inputs = make_inputs(execroot, count, args.mb << 20)
                root = base / f"root-{count}"
                stack = open_stack(Root(root))
                executor = stack.executor
                request_minus_tool(executor, execroot, inputs, "out/warmup")
                if args.relay:
                    relay_first_request(root, execroot, inputs, "out/relay-warmup")  # starts the service
                first, floor, incremental, patching, fresh, fresh_floor, relayed = [], [], [], [], [], [], []
                for round_ in range(args.rounds):
                    first.append(request_minus_tool(executor, execroot, inputs, f"out/first{round_}"))
                    stack.housekeeper.flush()  # the background removal finishes before the next timing
                    floor.append(c_floor(binary, work, execroot, inputs, stack.cas.cas_dir, base / "floor-dest"))
                    edited = execroot / inputs[round_ % count].path
                    edited.write_bytes(edited.read_bytes() + b"!")
                    digest = hashlib.sha256(edited.read_bytes()).hexdigest()
                    inputs[round_ % count] = RequestInput(inputs[round_ % count].path, digest)
                    whole, staging = timed_request(executor, execroot, inputs, "out/first0")
                    incremental.append(whole)
                    patching.append(staging)
                    other = open_stack(Root(root))  # a new worker process's stack, as Bazel would start it
                    fresh.append(request_minus_tool(other.executor, execroot, inputs, f"out/fresh{round_}"))
                    other.close()  # lets its background removals finish
                    fresh_floor.append(
                        c_floor(binary, work, execroot, inputs, stack.cas.cas_dir, base / "floor-dest", fresh=True)
                    )
                    if args.relay:
                        relayed.append(relay_first_request(root, execroot, inputs, f"out/relay{round_}"))
                stack.close()
                end_services(root)
                floor_med = statistics.median(floor)
                print(
                    f"{fs:<6} {count:>6} {'first':<12} {min_median(first)} {min_median(floor)} "
                    f"{statistics.median(first) / floor_med:>10.2f}"
                )
                print(
                    f"{fs:<6} {count:>6} {'incremental':<12} {min_median(incremental)} {'':>9} {'':>9} "
                    f"{statistics.median(incremental) / floor_med:>10.2f}"
                )
                print(
                    f"{fs:<6} {count:>6} {'  staging':<12} {min_median(patching)} {'':>9} {'':>9} "
                    f"{statistics.median(patching) / floor_med:>10.2f}"
                )
                print(
                    f"{fs:<6} {count:>6} {'fresh worker':<12} {min_median(fresh)} {min_median(fresh_floor)} "
                    f"{statistics.median(fresh) / statistics.median(fresh_floor):>10.2f}"
                )
                if relayed:
                    print(
                        f"{fs:<6} {count:>6} {'fresh relay':<12} {min_median(relayed)} {min_median(fresh_floor)} "
                        f"{statistics.median(relayed) / statistics.median(fresh_floor):>10.2f}"
                    )
                sys.stdout.flush()
        return 0
    finally:
        release(mounts, work)


if __name__ == "__main__":
    sys.exit(main())
