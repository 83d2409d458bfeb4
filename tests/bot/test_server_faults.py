"""The server side failing mid-build (real PostgreSQL, BuildGrid and bots on loopback): BuildGrid restarted while
a bot runs an action, PostgreSQL restarted while a bot runs an action. The client retries Execute on UNAVAILABLE
as Bazel does; the action finishes with the right bytes, or fails with a clear error, and the action cache never
holds anything but the right bytes. (A bot killed mid-action: test_remote_slice; a bot cut off past the keepalive:
test_netns_cluster; a corrupted blob in a bot's CAS: test_remote_slice.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("grpc", reason="needs the bot extra: pip install -e '.[bot]'")
pytest.importorskip("buildgrid", reason="needs the bot extra: pip install -e '.[bot]'")

from ..support.cluster import Cluster
from ..support.markers import requires_postgresql
from ..support.waiting import wait_for
from .test_remote_slice import _processes_with, _token

WORKSPACE = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.heavy,
    pytest.mark.remote,
    requires_postgresql,
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("faults"), bots=2) as running:
        yield running


def _run_through(cluster: Cluster, fault: Callable[[], None]) -> dict[str, object]:
    """Execute a ~3 s action; apply `fault` once the command runs on a bot; the client's outcome."""
    token = _token(3)
    spec = {
        "files": {"run.sh": [f"sleep {token}; echo survived > out.txt\n", True]},
        "argv": ["/bin/sh", "run.sh"],
        "outputs": ["out.txt"],
        "salt": str(time.time_ns()),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.remote_run", cluster.endpoint],
        cwd=WORKSPACE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    try:
        wait_for(lambda: bool(_processes_with(token)), 60, "the action to start on a bot")
        fault()
        out = proc.stdout.read()
        assert proc.wait(300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcome: dict[str, object] = json.loads(out)
    return outcome


def _assert_right_bytes_or_clear_error(outcome: dict[str, object]) -> None:
    want = {"out.txt": hashlib.sha256(b"survived\n").hexdigest()}
    assert outcome["status"] == 0, f"the build must finish: {outcome}"
    assert outcome["exit_code"] == 0, outcome
    assert outcome["outputs"] == want, outcome
    assert outcome["cached_outputs"] == want, "the action cache must hold the right bytes"


def _cluster_still_serves(cluster: Cluster) -> None:
    """A fresh action after the fault runs to completion too (assignment works again)."""
    outcome = _run_through(cluster, lambda: None)
    _assert_right_bytes_or_clear_error(outcome)


def test_buildgrid_restarted_mid_action(cluster: Cluster) -> None:
    outcome = _run_through(cluster, cluster.restart_server)
    _assert_right_bytes_or_clear_error(outcome)
    assert outcome["attempts"] > 1, "the Execute stream was cut by the restart: the client had to retry"
    _cluster_still_serves(cluster)
    assert all(bot.proc.poll() is None for bot in cluster.running_bots), "bots must ride out the restart"


def test_postgresql_restarted_mid_action(cluster: Cluster) -> None:
    outcome = _run_through(cluster, cluster.restart_postgres)
    _assert_right_bytes_or_clear_error(outcome)
    _cluster_still_serves(cluster)
    assert all(bot.proc.poll() is None for bot in cluster.running_bots)
