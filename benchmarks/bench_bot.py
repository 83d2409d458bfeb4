"""Throughput of one treemat bot behind BuildGrid: N distinct hand-built actions (same 600-file input tree, a
new salt each) submitted from `--clients` threads; prints actions/s and the bot's per-action staging time.

    PYTHONPATH=tools python3 benchmarks/bench_bot.py --actions 40 --rounds 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import grpc
from treemat.counters import StatsStore
from treemat.layout import Root

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/support is dev tooling
from tests.support.client import Client, Entry
from tests.support.cluster import Cluster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--actions", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--files", type=int, default=600)
    options = parser.parse_args()
    files: dict[str, Entry] = {
        f"sdk/m{i // 100}/f{i:04d}.swift": f"// file {i}\n".encode() * 20 for i in range(options.files)
    }
    files["run.sh"] = (b"ls -R sdk | wc -l > out.txt\n", True)
    with tempfile.TemporaryDirectory(prefix="treemat-bench-bot-") as work, Cluster(Path(work), bots=1) as cluster:
        channel = grpc.insecure_channel(cluster.endpoint.removeprefix("grpc://"))
        client = Client(channel, timeout=300)
        rates = []
        for round_index in range(options.rounds):
            digests = [
                client.build_action(
                    files,
                    ["/bin/sh", "run.sh"],
                    env={"PATH": "/usr/bin:/bin"},
                    outputs=["out.txt"],
                    salt=f"{round_index}-{i}-{time.time_ns()}".encode(),
                )
                for i in range(options.actions)
            ]
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(options.clients) as pool:
                results = list(pool.map(lambda d: client.execute(d, skip_cache=True), digests))
            elapsed = time.perf_counter() - started
            assert all(r.result.exit_code == 0 for r in results)
            rates.append(options.actions / elapsed)
        records = StatsStore(Root(cluster.running_bots[0].root).stats).load_all()
        recent = [a for r in records for a in cast("list[dict[str, float]]", r.get("recent_actions", []))]
        stage = [float(a["stage_ms"]) for a in recent if "stage_ms" in a]
        fetch = [float(a["fetch_ms"]) for a in recent if "fetch_ms" in a]
        channel.close()
    print(
        json.dumps(
            {
                "actions_per_s": {"min": round(min(rates), 2), "median": round(statistics.median(rates), 2)},
                "stage_ms_last20": {"min": min(stage), "median": statistics.median(stage)},
                "fetch_ms_last20": {"min": min(fetch), "median": statistics.median(fetch)},
                "files_per_action": options.files + 1,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
