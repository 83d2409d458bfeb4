"""Throughput of treemat bots behind BuildGrid 0.4.4 (real PostgreSQL, BuildGrid, bots on loopback).

1. BuildGrid's scheduler settings, side by side with 2 bots: N distinct hand-built actions (the same 600-file
   input root, a new salt each) from `--clients` threads, actions/s per round (min/median), then single actions
   one after another on the idle cluster (seconds from Execute to result). Variants of
   tests/support/buildgrid.yml: `poll-interval` (the operations notifier's LISTEN select timeout) and
   `bot-poll-interval` (the bots notifier's), `proactive-fetch-to-capacity`, and a `!priority-age-assigner`
   thread (without either, a job reaches a bot only when a bot completes a lease or opens a session).
2. The chosen settings with 1, 2 and 3 bots: actions/s, and each bot's staging and fetch time per action.
3. Bazel 4.2.3 `//examples/...` (several Swift modules, C modules, a generated package) clean builds: wall time
   local vs remote on 3 bots, alternated run by run (`--bazel-runs`, 0 to skip). `--chain` builds the
   multi-module package //tests/bot/chain instead (31 Swift modules in 16 levels on a C library);
   `--bazel-only` skips 1 and 2.

    PYTHONPATH=tools python3 benchmarks/bench_bot.py --actions 20 --rounds 3 --bazel-runs 3
    PYTHONPATH=tools python3 benchmarks/bench_bot.py --bazel-only --chain --bazel-runs 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import subprocess
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
from tests.support.cluster import CONFIG, Cluster

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ["//examples/..."]
CHAIN = ["//tests/bot/chain:RemoteChain", "//tests/bot/chain:CChainBase"]  # manual targets: named

ASSIGNER = """    assigners:
      - !priority-age-assigner
        count: 1
        interval: 0.05
        jitter-factor: 0
"""
PROACTIVE = "    proactive-fetch-to-capacity: true\n"
# Edits of tests/support/buildgrid.yml (old text -> new text); the file itself is the last variant.
BARE = {ASSIGNER: "", PROACTIVE: ""}
VARIANTS: dict[str, dict[str, str]] = {
    "no assigner, no proactive fetch (poll 0.5 s, bot-poll 0.5 s)": BARE,
    "no assigner, no proactive fetch, poll 0.1 s, bot-poll 0.1 s": {
        **BARE,
        "    poll-interval: 0.5\n": "    poll-interval: 0.1\n",
        "    bot-poll-interval: 0.5\n": "    bot-poll-interval: 0.1\n",
    },
    "no assigner, no proactive fetch, poll 1.0 s, bot-poll 1.0 s (BuildGrid's defaults)": {
        **BARE,
        "    poll-interval: 0.5\n": "    poll-interval: 1.0\n",
        "    bot-poll-interval: 0.5\n": "    bot-poll-interval: 1.0\n",
    },
    "proactive fetch only": {ASSIGNER: ""},
    "priority-age assigner every 0.05 s only": {PROACTIVE: ""},
    "proactive fetch + assigner every 0.05 s (tests/support/buildgrid.yml)": {},
}


def variant_config(directory: Path, name: str, edits: dict[str, str]) -> Path:
    """tests/support/buildgrid.yml with one variant's edits."""
    text = CONFIG.read_text()
    for old, new in edits.items():
        assert old in text, f"{CONFIG} changed: no {old.strip()!r}"
        text = text.replace(old, new, 1)
    path = directory / f"buildgrid-{abs(hash(name))}.yml"
    path.write_text(text)
    return path


def action_rates(cluster: Cluster, files: dict[str, Entry], actions: int, rounds: int, clients: int) -> list[float]:
    """actions/s of each round of `actions` distinct actions."""
    channel = grpc.insecure_channel(cluster.endpoint.removeprefix("grpc://"))
    client = Client(channel, timeout=300)
    rates = []
    try:
        for round_index in range(rounds):
            digests = [
                client.build_action(
                    files,
                    ["/bin/sh", "run.sh"],
                    env={"PATH": "/usr/bin:/bin"},
                    outputs=["out.txt"],
                    salt=f"{round_index}-{i}-{time.time_ns()}".encode(),
                )
                for i in range(actions)
            ]
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(lambda d: client.execute(d, skip_cache=True), digests))
            elapsed = time.perf_counter() - started
            assert all(r.result.exit_code == 0 for r in results)
            rates.append(actions / elapsed)
    finally:
        channel.close()
    return rates


def summary(values: list[float]) -> dict[str, float]:
    """min and median, rounded."""
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "runs": len(values)}


def bot_times(cluster: Cluster) -> dict[str, dict[str, float]]:
    """Each bot's staging and input-fetch ms per action (its last 20 actions)."""
    times = {}
    for bot in cluster.running_bots:
        records = StatsStore(Root(bot.root).stats).load_all()
        recent = [a for r in records for a in cast("list[dict[str, float]]", r.get("recent_actions", []))]
        stage = [float(a["stage_ms"]) for a in recent if "stage_ms" in a]
        fetch = [float(a["fetch_ms"]) for a in recent if "fetch_ms" in a]
        if stage and fetch:
            times[bot.name] = {"stage_ms_median": statistics.median(stage), "fetch_ms_median": statistics.median(fetch)}
    return times


def bazel_wall_times(work: Path, config: Path, runs: int, targets: list[str]) -> dict[str, object]:
    """Clean builds of `targets`, local and remote (3 bots) alternated: wall seconds each."""
    local, remote = work / "bazel-local", work / "bazel-remote"
    flags = {
        "local": [f"--output_base={local}", "build", "--spawn_strategy=local"]
        + [f"--strategy={m}=local" for m in ("SwiftCompile", "SwiftLink", "TreematRun")],
        "remote": [f"--output_base={remote}", "build", "--config=remote", "--noremote_accept_cached"],
    }
    times: dict[str, list[float]] = {"local": [], "remote": []}
    with Cluster(work / "bazel-cluster", bots=3, config=config) as cluster:
        flags["remote"].append(f"--remote_executor={cluster.endpoint}")
        try:
            for _ in range(runs):
                for mode in ("local", "remote"):
                    base = flags[mode][0]
                    subprocess.run(["bazel", base, "clean"], cwd=REPO, capture_output=True, check=True)
                    started = time.perf_counter()
                    subprocess.run(["bazel", *flags[mode], *targets], cwd=REPO, capture_output=True, check=True)
                    times[mode].append(time.perf_counter() - started)
        finally:
            for output_base in (local, remote):
                subprocess.run(["bazel", f"--output_base={output_base}", "shutdown"], cwd=REPO, capture_output=True)
    ratio = [r / loc for r, loc in zip(times["remote"], times["local"], strict=True)]
    return {"local_s": summary(times["local"]), "remote_3_bots_s": summary(times["remote"]), "ratio": summary(ratio)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--actions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--bazel-runs", type=int, default=3)
    parser.add_argument("--latency-actions", type=int, default=5, help="sequential single actions per variant")
    parser.add_argument("--variants", default="all", help="'all', or 'none' to measure only the chosen settings")
    parser.add_argument("--choose", default="", help="the variant for the 1/2/3-bot figures (default: the fastest)")
    parser.add_argument("--chain", action="store_true", help="Bazel builds //tests/bot/chain, not //examples/...")
    parser.add_argument("--bazel-only", action="store_true", help="only the Bazel wall times (3)")
    options = parser.parse_args()
    files: dict[str, Entry] = {
        f"sdk/m{i // 100}/f{i:04d}.swift": f"// file {i}\n".encode() * 20 for i in range(options.files)
    }
    files["run.sh"] = (b"ls -R sdk | wc -l > out.txt\n", True)
    report: dict[str, object] = {"files_per_action": options.files + 1, "clients": options.clients}
    with tempfile.TemporaryDirectory(prefix="treemat-bench-bot-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        configs = {name: variant_config(work, name, settings) for name, settings in VARIANTS.items()}
        medians = {}
        if options.variants == "all" and not options.bazel_only:
            by_variant = {}
            for index, (name, config) in enumerate(configs.items()):
                with Cluster(work / f"variant-{index}", bots=2, config=config) as cluster:
                    rates = action_rates(cluster, files, options.actions, options.rounds, options.clients)
                    # one action at a time on an idle cluster: the assignment path's latency, seconds per action
                    latency = [1 / rate for rate in action_rates(cluster, files, 1, options.latency_actions, 1)]
                by_variant[name] = {"actions_per_s": summary(rates), "idle_latency_s": summary(latency)}
                medians[name] = statistics.median(rates)
                print(f"{name}: {by_variant[name]}", file=sys.stderr, flush=True)
            report["settings_2_bots_actions_per_s"] = by_variant
        chosen = options.choose or (max(medians, key=lambda n: medians[n]) if medians else list(VARIANTS)[-1])
        report["chosen"] = chosen
        by_bots = {}
        for bots in () if options.bazel_only else (1, 2, 3):
            with Cluster(work / f"bots-{bots}", bots=bots, config=configs[chosen]) as cluster:
                rates = action_rates(cluster, files, options.actions, options.rounds, options.clients)
                by_bots[str(bots)] = {"actions_per_s": summary(rates), "per_bot": bot_times(cluster)}
            print(f"{bots} bot(s): {by_bots[str(bots)]['actions_per_s']}", file=sys.stderr, flush=True)
        report["bots_actions_per_s"] = by_bots
        if options.bazel_runs and shutil.which("bazel"):
            targets = CHAIN if options.chain else EXAMPLES
            key = "bazel_chain_clean_build" if options.chain else "bazel_examples_clean_build"
            report[key] = bazel_wall_times(work, configs[chosen], options.bazel_runs, targets)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
