"""The cluster as separate hosts: BuildGrid + PostgreSQL in one network namespace, each bot in its own (its root
on its own ext4 loop image, the server's disk hidden), Bazel in a client namespace; everything crosses a private
bridge (tests/support/netns.py). Needs root and `ip netns` (CI has both); skipped with the reason elsewhere.
Cutting a bot's link for longer than BuildGrid's keepalive loses no action and puts no wrong result in the
action cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc", reason="needs the bot extra: pip install -e '.[bot]'")
pytest.importorskip("buildgrid", reason="needs the bot extra: pip install -e '.[bot]'")

from ..support.cluster import Cluster
from ..support.markers import requires_postgresql
from ..support.netns import CLIENT_HOST, NetnsNetwork, netns_unavailable_reason
from ..support.swift import NO_SWIFTC
from ..support.swift import SWIFTC as SWIFT
from ..support.waiting import wait_for
from .test_remote_slice import _ancestors, _processes_with, _token

WORKSPACE = Path(__file__).resolve().parents[2]
NO_NETNS = netns_unavailable_reason()
pytestmark = [
    pytest.mark.heavy,
    pytest.mark.remote,
    pytest.mark.root,
    pytest.mark.skipif(NO_NETNS is not None, reason=f"netns cluster: {NO_NETNS}"),
    requires_postgresql,
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with NetnsNetwork() as network, Cluster(tmp_path_factory.mktemp("netns"), bots=2, network=network) as running:
        yield running


def _remote_run(cluster: Cluster, spec: dict[str, object]) -> subprocess.Popen[str]:
    """The REAPI client, started in the client namespace (it reaches the server only across the bridge)."""
    proc = subprocess.Popen(
        cluster.on(CLIENT_HOST, [sys.executable, "-m", "tests.support.remote_run", cluster.endpoint]),
        cwd=WORKSPACE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    return proc


def _outcome(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert proc.wait(300) == 0
    outcome: dict[str, object] = json.loads(out)
    return outcome


def test_hosts_see_only_the_network(cluster: Cluster) -> None:
    network = cluster.network
    assert network is not None
    assert cluster.server_address != "127.0.0.1"
    assert not network.can_connect(CLIENT_HOST, "127.0.0.1", cluster.port), "the server is not on the client's lo"
    for bot in cluster.running_bots:
        addresses = _in_bot(bot.proc.pid, "ip", "-4", "-o", "addr")
        assert network.hosts[bot.name].address in addresses and "127.0.0.1" in addresses, addresses
        assert f"inet {cluster.server_address}/" not in addresses
        assert _in_bot(bot.proc.pid, "ls", "-A", str(network.workdir / "server-cas")) == "", "server disk visible"
        other = next(b.root for b in cluster.running_bots if b is not bot)
        assert _in_bot(bot.proc.pid, "ls", "-A", str(other)) == "", "another bot's disk visible"
        assert _in_bot(bot.proc.pid, "findmnt", "-n", "-o", "FSTYPE", "-T", str(bot.root)).strip() == "ext4"
    outcome = _outcome(
        _remote_run(
            cluster,
            {"files": {"run.sh": ["echo across > out.txt\n", True]}, "argv": ["/bin/sh", "run.sh"]}
            | {"outputs": ["out.txt"], "salt": str(time.time_ns())},
        )
    )
    assert outcome["status"] == 0 and outcome["exit_code"] == 0, outcome
    assert outcome["outputs"] == {"out.txt": hashlib.sha256(b"across\n").hexdigest()}


@pytest.mark.slow
def test_a_bot_cut_off_past_the_keepalive_loses_no_action(cluster: Cluster) -> None:
    network = cluster.network
    assert network is not None
    token = _token(4)
    script = f"sleep {token}; echo done > out.txt\n"
    proc = _remote_run(
        cluster,
        {"files": {"run.sh": [script, True]}, "argv": ["/bin/sh", "run.sh"], "outputs": ["out.txt"]}
        | {"salt": str(time.time_ns())},
    )
    wait_for(lambda: bool(_processes_with(token)), 60, "the action to start on a bot")
    bots = {bot.proc.pid: bot for bot in cluster.running_bots}
    victim = next(bots[pid] for pid in _ancestors(_processes_with(token)[0]) if pid in bots)
    network.cut(victim.name)
    try:
        outcome = _outcome(proc)  # BuildGrid reaps the silent session after 15 s; the other bot runs the action
    finally:
        network.restore(victim.name)
    assert outcome["status"] == 0 and outcome["exit_code"] == 0, outcome
    assert outcome["worker"] != f"treemat-{victim.name}", outcome
    assert outcome["cached_outputs"] == outcome["outputs"], "the action cache holds what the client got"
    # the cut bot comes back with a new session and serves again
    wait_for(lambda: victim.log.read_text().count(": session ") >= 2, 120, f"{victim.name} to open a new session")


@pytest.mark.bazel
@pytest.mark.swift
@pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (tools/setup.sh installs it)")
@pytest.mark.skipif(SWIFT is None, reason=NO_SWIFTC)
def test_bazel_in_its_own_namespace_builds_through_the_bridge(cluster: Cluster, tmp_path: Path) -> None:
    output_base = tmp_path / "bazel"
    bazel = [*cluster.on(CLIENT_HOST, ["bazel"]), f"--output_base={output_base}"]
    try:
        local = _build(bazel, "--spawn_strategy=local", "--strategy=SwiftCompile=local")
        remote = _build(bazel, "--config=remote", f"--remote_executor={cluster.endpoint}", "--noremote_accept_cached")
    finally:
        subprocess.run([*bazel, "shutdown"], cwd=WORKSPACE, capture_output=True, check=False, timeout=120)
    assert remote[1] == local[1], "remote outputs differ from the local build"
    assert re.search(r"processes: .*\d+ remote", remote[0]), remote[0][-2000:]
    # each bot's `treemat stats`: its isolation and files per method; on ext4 the overlay sandbox hardlinks
    bots = [entry for bot in cluster.running_bots for entry in _stats(bot.root)["bots"]]
    assert {entry["bot_id"] for entry in bots} >= {"treemat-bot-0", "treemat-bot-1"}, bots
    ran = [entry for entry in bots if entry["actions"]]
    assert ran, bots
    for entry in ran:
        assert entry["isolation"] in ("overlay", "copy-on-write"), entry
        if entry["isolation"] == "overlay":  # ext4 has no reflinks: without overlayfs the bot must copy
            assert entry["methods"]["hardlink"] > 0 and entry["methods"]["copy"] == 0, entry


def _stats(root: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "treemat", "--root", str(root), "stats", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(WORKSPACE / "tools")),
        check=True,
        timeout=60,
    )
    stats: dict[str, Any] = json.loads(done.stdout)
    return stats


def _in_bot(pid: int, *argv: str) -> str:
    """stdout of argv run in the bot's network and mount namespaces."""
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "-n", *argv], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def _build(bazel: list[str], *flags: str) -> tuple[str, dict[str, str]]:
    done = subprocess.run(
        [*bazel, "build", *flags, "//examples/models:Models"],
        cwd=WORKSPACE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    info = subprocess.run([*bazel, "info", "bazel-bin"], cwd=WORKSPACE, capture_output=True, text=True, check=True)
    models = Path(info.stdout.strip()) / "examples" / "models"
    outputs = {
        str(p.relative_to(models)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(models.rglob("*"))
        if p.is_file() and p.suffix in (".o", ".swiftmodule", ".a")
    }
    assert outputs, "no outputs"
    subprocess.run([*bazel, "clean"], cwd=WORKSPACE, capture_output=True, check=True, timeout=300)
    return done.stderr, outputs
