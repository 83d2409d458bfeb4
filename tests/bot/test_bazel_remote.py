"""Bazel 4.2.3 builds the Swift example workspace on BuildGrid + two treemat bots (real PostgreSQL, BuildGrid,
bots, Bazel and swiftc). Outputs match a local build byte for byte; a clean rebuild comes from the action
cache; killing a bot mid-build loses no action; each bot's `treemat stats` shows what it staged and how.
Select with `-m bazel_remote` (slow: several Bazel builds)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="needs the bot extra: pip install -e '.[bot]'")
pytest.importorskip("buildgrid", reason="needs the bot extra: pip install -e '.[bot]'")

from treemat.fsprims import is_btrfs

from ..support.cluster import Cluster
from ..support.markers import requires_postgresql
from ..support.swift import NO_SWIFTC
from ..support.swift import SWIFTC as SWIFT

WORKSPACE = Path(__file__).resolve().parents[2]
TOOLS = WORKSPACE / "tools"
LOCAL = [
    "--spawn_strategy=local",
    "--strategy=SwiftCompile=local",
    "--strategy=SwiftLink=local",
    "--strategy=TreematRun=local",
]

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.bazel,
    pytest.mark.remote,
    pytest.mark.bazel_remote,
    pytest.mark.swift,
    pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (tools/setup.sh installs it)"),
    pytest.mark.skipif(SWIFT is None, reason=NO_SWIFTC),
    requires_postgresql,
]


def _bazel(output_base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bazel", f"--output_base={output_base}", *args],
        cwd=WORKSPACE,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


def _build(output_base: Path, *flags: str) -> str:
    clean = _bazel(output_base, "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    build = _bazel(output_base, "build", *flags, "//examples/...")
    assert build.returncode == 0, build.stderr[-5000:]
    return build.stderr


def _outputs(output_base: Path) -> dict[str, str]:
    info = _bazel(output_base, "info", "bazel-bin")
    assert info.returncode == 0, info.stderr
    bin_dir = Path(info.stdout.strip()) / "examples"
    return {
        str(path.relative_to(bin_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(bin_dir.rglob("*"))
        if path.is_file() and (path.suffix in (".o", ".swiftmodule") or path.name == "app")
    }


def _processes(stderr: str) -> dict[str, int]:
    """Bazel's summary line, e.g. 'INFO: 2690 processes: 2683 internal, 7 remote.' -> {'internal': 2683, ...}."""
    found = re.findall(r"INFO: \d+ process(?:es)?: (.*)\.", stderr)
    assert found, stderr[-2000:]
    return {kind.strip(): int(count) for count, kind in re.findall(r"(\d+) ([a-z ]+)", found[-1])}


def _stats(root: Path) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-m", "treemat", "--root", str(root), "stats", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(TOOLS)),
        check=True,
        timeout=60,
    )
    totals: dict[str, int] = json.loads(done.stdout)["totals"]
    return totals


def _btrfs_roots(base: Path, count: int) -> tuple[list[Path], list[Path]]:
    """Bot roots on loop-mounted btrfs (whole-subtree snapshots) where root can mount; else plain dirs."""
    roots, mounts = [], []
    for index in range(count):
        root = base / f"bot-{index}"
        root.mkdir()
        if os.geteuid() == 0 and shutil.which("mkfs.btrfs"):
            image = base / f"bot-{index}.img"
            with image.open("wb") as handle:
                handle.truncate(2 << 30)
            made = subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], capture_output=True, check=False)
            if (
                made.returncode == 0
                and subprocess.run(
                    ["mount", "-o", "loop", str(image), str(root)], capture_output=True, check=False
                ).returncode
                == 0
            ):
                mounts.append(root)
        roots.append(root)
    return roots, mounts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("remote")
    roots, mounts = _btrfs_roots(base, 2)
    try:
        with Cluster(base / "cluster", bot_roots=roots) as running:
            yield running
    finally:
        for mount in mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def builds(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A local build, a remote build, then a clean remote rebuild (same output base)."""
    base = tmp_path_factory.mktemp("bazel")
    local_base, remote_base = base / "local", base / "remote"
    remote = ["--config=remote", f"--remote_executor={cluster.endpoint}"]
    try:
        _build(local_base, *LOCAL)
        local = _outputs(local_base)
        first = _build(remote_base, *remote)
        first_outputs = _outputs(remote_base)
        actions_after_first = sum(_stats(bot.root).get("actions", 0) for bot in cluster.running_bots)
        second = _build(remote_base, *remote)
        actions_after_second = sum(_stats(bot.root).get("actions", 0) for bot in cluster.running_bots)
        yield {
            "local": local,
            "remote": first_outputs,
            "remote_base": remote_base,
            "flags": remote,
            "first": first,
            "second": second,
            "actions_after_first": actions_after_first,
            "actions_after_second": actions_after_second,
        }
    finally:
        _bazel(local_base, "shutdown")
        _bazel(remote_base, "shutdown")


def test_remote_outputs_byte_identical_to_local(builds: dict[str, object]) -> None:
    local = builds["local"]
    assert isinstance(local, dict) and len(local) >= 8, local
    assert builds["remote"] == local
    assert _processes(str(builds["first"])).get("remote", 0) >= 7, "SwiftCompile/SwiftLink must run remotely"


def test_clean_rebuild_is_served_from_the_action_cache(builds: dict[str, object]) -> None:
    processes = _processes(str(builds["second"]))
    assert processes.get("remote cache hit", 0) >= 7, processes
    assert processes.get("remote", 0) == 0, processes
    assert builds["actions_after_second"] == builds["actions_after_first"], "no bot may have run anything"


def test_killing_a_bot_mid_build_loses_no_action(cluster: Cluster, builds: dict[str, object]) -> None:
    remote_base = builds["remote_base"]
    assert isinstance(remote_base, Path)
    killed: list[str] = []
    stop = threading.Event()

    def kill_first_busy_bot() -> None:
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:
            for bot in cluster.running_bots:
                exec_dir = bot.root / "exec"
                if (
                    bot.proc.poll() is None
                    and exec_dir.is_dir()
                    and any("-bot" in entry.name for entry in exec_dir.iterdir())
                ):
                    cluster.kill_bot(bot.name)
                    killed.append(bot.name)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_busy_bot)
    killer.start()
    try:
        # every action executed again (no remote cache hits), same input trees
        stderr = _build(remote_base, *builds["flags"], "--noremote_accept_cached")  # type: ignore[misc]
    finally:
        stop.set()
        killer.join(30)
    assert killed, "no bot was seen running an action"
    assert _processes(stderr).get("remote", 0) >= 7
    assert _outputs(remote_base) == builds["local"]
    survivors = [bot for bot in cluster.running_bots if bot.name not in killed]
    assert sum(_stats(bot.root).get("actions", 0) for bot in survivors) > 0


def test_stats_show_per_bot_backends_and_subtree_hits(cluster: Cluster, builds: dict[str, object]) -> None:
    per_bot = {bot.name: _stats(bot.root) for bot in cluster.running_bots}
    placed = {
        name: {k: t.get(k, 0) for k in ("snapshot", "clonefile", "reflink", "hardlink", "copy") if t.get(k, 0)}
        for name, t in per_bot.items()
    }
    assert sum(sum(p.values()) for p in placed.values()) >= 700, placed  # the 635-input module alone
    assert all(t.get("copy", 0) == 0 for t in per_bot.values()), "CAS and exec dirs share a filesystem"
    hardlinking = any(t.get("hardlink", 0) for t in per_bot.values())  # overlay sandbox: no directory cache
    if not hardlinking and any((bot.root / "dircache").is_dir() and is_btrfs(bot.root) for bot in cluster.running_bots):
        assert sum(t.get("subtree_hits", 0) + t.get("subtree_misses", 0) for t in per_bot.values()) > 0


def test_dynamic_execution_local_worker_races_remote_bots(
    cluster: Cluster, builds: dict[str, object], tmp_path: Path
) -> None:
    """Bazel 4.2.3: `--internal_spawn_scheduler` registers `dynamic`; local leg = treemat worker, remote = bots."""
    remote_base = builds["remote_base"]
    assert isinstance(remote_base, Path)
    stderr = _build(
        remote_base,
        *builds["flags"],  # type: ignore[arg-type]
        "--internal_spawn_scheduler",
        "--experimental_worker_allow_json_protocol",
        "--strategy=SwiftCompile=dynamic",
        "--strategy=SwiftLink=dynamic",
        "--strategy=TreematRun=dynamic",
        "--dynamic_local_strategy=worker",
        "--dynamic_remote_strategy=remote",
        *[
            f"--worker_extra_flag={m}=--root={tmp_path / 'worker-root'}"
            for m in ("SwiftCompile", "SwiftLink", "TreematRun")
        ],
        "--noremote_accept_cached",
    )
    processes = _processes(stderr)
    assert processes.get("worker", 0) + processes.get("remote", 0) >= 7, processes
    assert _outputs(remote_base) == builds["local"]
