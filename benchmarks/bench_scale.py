#!/usr/bin/env python3
"""Scale figures: a CAS of many blobs (`cas stats`, a gc scan) against find(1), and worker RSS over many requests.

    python3 benchmarks/bench_scale.py [--blobs 100000] [--requests 1000] [--rounds 3] [--dir DIR]

Prints min and median over rounds and the ratio to the floor (`find cas -type f -printf '%s'`, which stats
every blob just as the scan does), then the persistent worker's VmRSS every 100 requests.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from treemat.layout import Root  # noqa: E402 - after the sys.path line
from treemat.stack import open_store  # noqa: E402

if TYPE_CHECKING:
    from treemat.cas import ContentStore


def timed(function: object, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    return samples


def line(name: str, ours: list[float], floor: list[float]) -> str:
    return (
        f"{name:<22} {min(ours) * 1000:8.0f} {statistics.median(ours) * 1000:8.0f} "
        f"{min(floor) * 1000:8.0f} {statistics.median(floor) * 1000:8.0f} "
        f"{statistics.median(ours) / statistics.median(floor):6.2f}"
    )


def cas_scale(base: Path, blobs: int, rounds: int) -> None:
    with open_store(Root(base / "root")) as opened:
        _cas_scale(opened.cas, blobs, rounds)


def _cas_scale(store: ContentStore, blobs: int, rounds: int) -> None:
    started = time.perf_counter()
    for index in range(blobs):
        store.ingest_bytes(f"blob {index}\n".encode(), executable=index % 50 == 0)
    print(f"ingested {blobs} blobs in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    def find_floor() -> None:
        subprocess.run(
            ["find", str(store.cas_dir), "-type", "f", "-printf", "%s\n"], check=True, stdout=subprocess.DEVNULL
        )

    floor = timed(find_floor, rounds)
    stats = timed(store.stats, rounds)
    gc_scan = timed(lambda: store.gc(1 << 62), rounds)  # over budget never: a scan that deletes nothing
    print(f"{'CAS of ' + str(blobs) + ' blobs':<22} {'min ms':>8} {'med ms':>8} {'floor':>8} {'floor':>8} {'ratio':>6}")
    print(line("cas stats", stats, floor))
    print(line("gc scan", gc_scan, floor))


def worker_rss(base: Path, requests: int) -> None:
    execroot = base / "execroot"
    (execroot / "src").mkdir(parents=True)
    inputs = []
    for index in range(200):
        data = f"input {index}\n".encode() * 20
        (execroot / "src" / f"f{index}").write_bytes(data)
        digest = base64.b64encode(hashlib.sha256(data).hexdigest().encode()).decode()
        inputs.append({"path": f"src/f{index}", "digest": digest})
    env = dict(os.environ, PYTHONPATH=str(TOOLS))
    proc = subprocess.Popen(
        [sys.executable, "-m", "treemat", "--persistent_worker", "--protocol=json", f"--root={base / 'wroot'}"],
        cwd=execroot,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    decoder = json.JSONDecoder()
    buffer = ""
    samples = []
    for index in range(requests):
        body = {
            "arguments": [f"--output=out/o{index % 10}", "--", "sh", "-c", f"echo {index} > out/o{index % 10}"],
            "inputs": inputs,
            "requestId": index + 1,
        }
        proc.stdin.write(json.dumps(body).encode())
        proc.stdin.flush()
        while True:
            try:
                _reply, end = decoder.raw_decode(buffer.lstrip())
                buffer = buffer.lstrip()[end:]
                break
            except ValueError:
                buffer += os.read(proc.stdout.fileno(), 65536).decode()
        if index % 100 == 0 or index == requests - 1:
            rss = next(
                int(text.split()[1])
                for text in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if text.startswith("VmRSS:")
            )
            samples.append((index + 1, rss))
    proc.stdin.close()
    proc.wait(30)
    print("worker VmRSS (KiB) after N requests: " + ", ".join(f"{n}: {rss}" for n, rss in samples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="treemat-scale-", dir=args.dir))
    os.chmod(base, 0o700)
    try:
        cas_scale(base, args.blobs, args.rounds)
        worker_rss(base, args.requests)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
