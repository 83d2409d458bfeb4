#!/usr/bin/env python3
"""Memory of the stager service with several output bases and relays, against as many in-process workers.

    python3 benchmarks/bench_service.py [--bases 3] [--relays 8] [--inputs 635] [--requests 40]

`--bases` execroots (as many Bazel output bases, each with its own copy of the inputs) share one treemat root.
`--relays` relays (`treemat --persistent_worker --protocol=proto`, TREEMAT_SERVICE=1), spread round-robin over
the execroots, each send `--requests` requests of `--inputs` inputs, one input edited before each, all at once
(one thread per relay); then the same with TREEMAT_SERVICE=0: as many in-process workers. Prints VmRSS (from
/proc, MiB) of the service after the first request and at the end, the relays', and the in-process workers'.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from treemat import protos
from treemat.framing import encode_delimited, read_delimited
from treemat.fsprims import remove_tree

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def rss_mib(pid: int) -> float:
    """VmRSS of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_execroot(path: Path, count: int) -> None:
    """`count` inputs of a few KB, ~6 per directory."""
    for index in range(count):
        file = path / f"src/d{index // 6}/f{index}.swift"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(f"// {index}\n".encode() * 200)
    (path / "out").mkdir()


class Client:
    """One worker process (relay or in-process) on one execroot."""

    def __init__(self, execroot: Path, root: Path, service: str, number: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(TOOLS), "TREEMAT_SERVICE": service}
        command = [sys.executable, "-m", "treemat", "--persistent_worker", "--protocol=proto", f"--root={root}"]
        self.proc = subprocess.Popen(command, cwd=execroot, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.execroot = execroot
        self.number = number
        self.lock = threading.Lock()

    def request(self, count: int, round_: int, edit_lock: threading.Lock) -> None:
        """Edit one input (under the execroot's lock), send the request, wait for its response."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        out = f"out/c{self.number}"
        message = protos.WorkRequest(arguments=[f"--output={out}", "--", "touch", out], request_id=round_ + 1)
        with edit_lock:
            edited = self.execroot / f"src/d{round_ % count // 6}/f{round_ % count}.swift"
            edited.write_bytes(edited.read_bytes()[:4000] + f"// {self.number} {round_}\n".encode())
            for index in range(count):
                path = f"src/d{index // 6}/f{index}.swift"
                digest = hashlib.sha256((self.execroot / path).read_bytes()).hexdigest()
                message.inputs.add(path=path, digest=digest.encode())
            self.proc.stdin.write(encode_delimited(message))
            self.proc.stdin.flush()
            reply = read_delimited(self.proc.stdout, protos.WorkResponse)
        if reply is None or reply.exit_code:
            raise SystemExit(f"request failed: {reply}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def run(work: Path, bases: list[Path], service: str, relays: int, inputs: int, requests: int) -> list[Client]:
    """Start the clients, run every request (a thread per client); the clients, still running."""
    root = work / f"root-{service}"
    locks = {base: threading.Lock() for base in bases}
    clients = [Client(bases[n % len(bases)], root, service, n) for n in range(relays)]

    def drive(client: Client) -> None:
        for round_ in range(requests):
            client.request(inputs, round_, locks[client.execroot])

    threads = [threading.Thread(target=drive, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients


def service_pids(root: Path) -> list[int]:
    return [int(p.read_text()) for p in (root / "service").glob("*.pid")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", type=int, default=3)
    parser.add_argument("--relays", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=635)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-service-", dir="/var/tmp"))
    try:
        bases = [work / f"output_base-{n}/execroot" for n in range(args.bases)]
        for base in bases:
            make_execroot(base, args.inputs)
        probe = Client(bases[0], work / "root-1", "1", 99)
        probe.request(args.inputs, 0, threading.Lock())
        (pid,) = service_pids(work / "root-1")
        first = rss_mib(pid)
        probe.close()
        relayed = run(work, bases, "1", args.relays, args.inputs, args.requests)
        service_end = rss_mib(pid)
        relay_rss = [rss_mib(c.proc.pid) for c in relayed]
        for client in relayed:
            client.close()
        in_process = run(work, bases, "0", args.relays, args.inputs, args.requests)
        worker_rss = [rss_mib(c.proc.pid) for c in in_process]
        for client in in_process:
            client.close()
        print(
            f"{args.bases} output bases, {args.relays} clients, {args.requests} requests of {args.inputs} inputs each"
        )
        print(f"service: {first:.1f} MiB after its first request, {service_end:.1f} MiB at the end")
        print(f"relays: {sum(relay_rss):.1f} MiB in all ({min(relay_rss):.1f}-{max(relay_rss):.1f} each)")
        print(f"service + relays: {service_end + sum(relay_rss):.1f} MiB")
        print(
            f"in-process workers: {sum(worker_rss):.1f} MiB in all ({min(worker_rss):.1f}-{max(worker_rss):.1f} each)"
        )
    finally:
        for pid in service_pids(work / "root-1"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
