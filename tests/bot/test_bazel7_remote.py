"""Bazel 7.7.1 (tools/bazel7.sh's Debian sid chroot, WORKSPACE mode) builds //examples/... and a multi-module
package (//tests/bot/chain: 31 Swift modules in 16 levels on a C library) on BuildGrid + three treemat bots:
outputs byte-identical to a local Bazel 7 build, and a clean rebuild served from the action cache.

The bots run in the same chroot as Bazel (`tools/bazel7.sh run`): an execution platform must be the client's
image, since C actions name the toolchain's absolute include paths (sid's gcc 14 here; a bookworm bot would
compile against gcc 12's headers and Bazel rejects the action). Their buildgrid/grpc come from
`tools/bazel7.sh bot-extra` (pip --target, apart from the chroot's site-packages). The chroot shares the host's
network namespace, so Bazel and the bots reach BuildGrid on loopback.
Skipped unless the chroot exists (`sudo tools/bazel7.sh setup`); slow (three Bazel 7 builds per test)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="needs the bot extra: pip install -e '.[bot]'")
pytest.importorskip("buildgrid", reason="needs the bot extra: pip install -e '.[bot]'")

from ..e2e.test_adoption_bazel7 import SCRIPT, SKIP
from ..support.cluster import Cluster
from ..support.markers import requires_postgresql

REPO = Path(__file__).resolve().parents[2]
LOCAL_STRATEGIES = ["--strategy=SwiftCompile=local", "--strategy=SwiftLink=local", "--strategy=TreematRun=local"]
EXAMPLES = ("//examples/...",)
CHAIN = ("//tests/bot/chain:RemoteChain", "//tests/bot/chain:CChainBase")  # manual targets: named
CHAIN_SWIFT_MODULES = 31
PACKAGE = "tests/bot/chain"
pytestmark = [
    pytest.mark.heavy,
    pytest.mark.bazel,
    pytest.mark.bazel7,
    pytest.mark.bazel_remote,
    pytest.mark.remote,
    pytest.mark.swift,
    pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
    requires_postgresql,
]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Bound into the chroot at the same path (bot roots, output bases); under /var/tmp, never /tmp."""
    path = Path(tempfile.mkdtemp(prefix="treemat-bazel7-remote-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(scratch: Path) -> Iterator[Cluster]:
    extra = subprocess.run([str(SCRIPT), "bot-extra"], capture_output=True, text=True, timeout=900, check=False)
    assert extra.returncode == 0, extra.stderr[-3000:]
    in_chroot = [str(SCRIPT), "run", "--bind", str(scratch), "--", "env"]
    python = [*in_chroot, f"PYTHONPATH={extra.stdout.strip()}:{REPO / 'tools'}", "python3"]
    roots = [scratch / f"bot-{index}" for index in range(3)]
    with Cluster(scratch / "cluster", bots=3, bot_roots=roots, bot_python=python) as running:
        yield running


def _bazel(scratch: Path, output_base: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "run", "--bind", str(scratch), "--", "bazel", f"--output_base={scratch / output_base}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def _build(
    scratch: Path, output_base: str, *flags: str, targets: tuple[str, ...] = EXAMPLES, package: str = "examples"
) -> tuple[str, dict[str, str]]:
    """Clean, build `targets`; Bazel's stderr and the sha256 of every .o/.swiftmodule/.a/app under `package`."""
    for command in (["clean"], ["build", "--noenable_bzlmod", *flags, *targets]):
        done = _bazel(scratch, output_base, *command)
        assert done.returncode == 0, done.stderr[-5000:]
    info = _bazel(scratch, output_base, "info", "--noenable_bzlmod", "bazel-bin")
    assert info.returncode == 0, info.stderr[-2000:]
    bin_dir = Path(info.stdout.strip().splitlines()[-1]) / package
    outputs = {
        str(path.relative_to(bin_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(bin_dir.rglob("*"))
        if path.is_file() and (path.suffix in (".o", ".swiftmodule", ".a") or path.name == "app")
    }
    return done.stderr, outputs


def _processes(stderr: str) -> dict[str, int]:
    found = re.findall(r"INFO: \d+ process(?:es)?: (.*)\.", stderr)
    assert found, stderr[-2000:]
    return {kind.strip(): int(count) for count, kind in re.findall(r"(\d+) ([a-z ]+)", found[-1])}


def _bot_actions(cluster: Cluster) -> dict[str, int]:
    from treemat.counters import StatsStore
    from treemat.layout import Root

    return {
        bot.name: sum(
            int(record.get("counters", {}).get("actions", 0))  # type: ignore[union-attr]
            for record in StatsStore(Root(bot.root).stats).load_all()
        )
        for bot in cluster.running_bots
    }


def test_bazel7_remote_on_three_bots_matches_local_and_rebuilds_from_the_cache(cluster: Cluster, scratch: Path) -> None:
    # Bazel 7 defaults to --remote_download_outputs=toplevel: fetch every output, to compare them all
    remote = ["--config=remote", f"--remote_executor={cluster.endpoint}", "--remote_download_outputs=all"]
    try:
        local_log, local = _build(scratch, "local", "--spawn_strategy=local", *LOCAL_STRATEGIES)
        first_log, first = _build(scratch, "remote", *remote)
        after_first = _bot_actions(cluster)
        second_log, second = _build(scratch, "remote", *remote)
        after_second = _bot_actions(cluster)
    finally:
        for base in ("local", "remote"):
            _bazel(scratch, base, "shutdown")
    assert len(local) >= 8, local
    assert first == local, "remote outputs differ from the local Bazel 7 build"
    assert second == local
    ran = _processes(first_log).get("remote", 0)
    assert ran >= 7, _processes(first_log)
    assert sum(after_first.values()) >= ran, after_first
    assert sum(1 for count in after_first.values() if count) >= 2, f"the work spread over the bots: {after_first}"
    hits = _processes(second_log)
    assert hits.get("remote cache hit", 0) >= ran and hits.get("remote", 0) == 0, hits
    assert after_second == after_first, "no bot may have run anything on the clean rebuild"
    print(json.dumps({"local": _processes(local_log), "remote": _processes(first_log), "bots": after_first}))


def test_bazel7_builds_a_31_module_chain_on_c_remotely_byte_identical_and_rebuilds_from_the_cache(
    cluster: Cluster, scratch: Path
) -> None:
    """Item 4's multi-module package: every Swift module and the C library compiled on the bots, spread over them."""
    remote = ["--config=remote", f"--remote_executor={cluster.endpoint}", "--remote_download_outputs=all"]
    before = _bot_actions(cluster)
    try:
        local_log, local = _build(
            scratch, "chain-local", "--spawn_strategy=local", *LOCAL_STRATEGIES, targets=CHAIN, package=PACKAGE
        )
        first_log, first = _build(scratch, "chain-remote", *remote, targets=CHAIN, package=PACKAGE)
        after_first = _bot_actions(cluster)
        second_log, second = _build(scratch, "chain-remote", *remote, targets=CHAIN, package=PACKAGE)
        after_second = _bot_actions(cluster)
    finally:
        for base in ("chain-local", "chain-remote"):
            _bazel(scratch, base, "shutdown")
    modules = [name for name in local if name.endswith(".swiftmodule")]
    assert len(modules) == CHAIN_SWIFT_MODULES, sorted(local)
    assert any(name.endswith(".a") for name in local), "the C library was built"
    assert first == local, "remote outputs differ from the local Bazel 7 build"
    assert second == local
    ran = _processes(first_log).get("remote", 0)
    assert ran >= CHAIN_SWIFT_MODULES + 1, _processes(first_log)  # every Swift compile and the C compile
    spread = {name: after_first[name] - before.get(name, 0) for name in after_first}
    assert sum(spread.values()) >= ran, spread
    assert sum(1 for count in spread.values() if count) >= 2, f"the work spread over the bots: {spread}"
    hits = _processes(second_log)
    assert hits.get("remote cache hit", 0) >= ran and hits.get("remote", 0) == 0, hits
    assert after_second == after_first, "no bot may have run anything on the clean rebuild"
    print(json.dumps({"local": _processes(local_log), "remote": _processes(first_log), "bots": spread}))
