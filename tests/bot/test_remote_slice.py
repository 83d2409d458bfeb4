"""Fast slice through real components: PostgreSQL + BuildGrid 0.4.4 + two treemat bots on loopback, with
hand-built REAPI actions (no Bazel). Select with `-m "remote and not slow"`; the bot-kill test is `slow`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc", reason="needs the bot extra: pip install -e '.[bot]'")
pytest.importorskip("buildgrid", reason="needs the bot extra: pip install -e '.[bot]'")

from treemat.bot.rpc import code_pb2, re_pb2  # noqa: E402

from ..support.client import Client, digest_of  # noqa: E402
from ..support.cluster import Cluster  # noqa: E402
from ..support.markers import requires_postgresql  # noqa: E402
from ..support.waiting import wait_for  # noqa: E402

TOOLS = Path(__file__).resolve().parents[2] / "tools"
LEAK = "TREEMAT_BOT_ONLY_VARIABLE"

pytestmark = [
    pytest.mark.remote,
    requires_postgresql,
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    with Cluster(work, bots=2, bot_env={LEAK: "leaked"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[Client]:
    channel = grpc.insecure_channel(cluster.endpoint.removeprefix("grpc://"))
    try:
        yield Client(channel, cluster.instance, timeout=120)
    finally:
        channel.close()


SCRIPT = b"""\
set -u
cat ../src/greeting.txt
echo "env:${GREETING:-missing}:${%s:-unset}"
echo "cwd:$(basename "$PWD")"
if ( echo poisoned > ../src/greeting.txt ) 2>/dev/null; then echo "input:writable"; else echo "input:read-only"; fi
mkdir -p out
printf '%%s' "$GREETING" > out/file.txt
printf '#!/bin/sh\\n' > out/tool && chmod +x out/tool
mkdir -p tree/sub
echo nested > tree/sub/leaf.txt
ln -s sub/leaf.txt tree/link
echo to-stderr >&2
exit "${EXIT_WITH:-0}"
""" % LEAK.encode()


def _files(extra: dict[str, bytes] | None = None) -> dict[str, object]:
    files: dict[str, object] = {
        "src/greeting.txt": b"hello from the input root\n",
        "src/run.sh": (SCRIPT, True),
        "src/empty": None,
        "src/alias": "greeting.txt",
    }
    for index in range(40):  # a subtree big enough for the directory cache (min 32 files)
        files[f"sdk/lib/f{index:02d}.txt"] = f"sdk file {index}\n".encode()
    files.update(extra or {})
    return files


def _action(client: Client, *, env: dict[str, str] | None = None, salt: bytes = b"") -> object:
    return client.build_action(
        _files(),  # type: ignore[arg-type]
        ["/bin/sh", "../src/run.sh"],
        env={"GREETING": "hi", "PATH": "/usr/bin:/bin", **(env or {})},
        outputs=["out/file.txt", "out/tool"],
        output_dirs=["tree"],
        workdir="work",
        salt=salt,
    )


def test_action_runs_hermetically_and_outputs_come_back(client: Client) -> None:
    done = client.execute(_action(client, salt=str(time.time_ns()).encode()), skip_cache=True)
    assert done.status_code == code_pb2.OK, done.status_message
    result = done.result
    assert result.exit_code == 0
    stdout = client.read(result.stdout_digest).decode()
    assert stdout.splitlines() == [
        "hello from the input root",
        "env:hi:unset",  # the Command's environment only: the bot's own variables do not leak in
        "cwd:work",
        "input:read-only",  # the sandbox drops every capability: even root cannot write a 0o444 input ...
    ]
    stderr = client.read(result.stderr_digest).decode()
    assert stderr.startswith("to-stderr\n")
    # ... and a write that got through (chmod first) would copy up into the run's private layer: the next
    # action reads the pristine bytes.
    again = client.execute(_action(client, salt=b"again" + str(time.time_ns()).encode()), skip_cache=True)
    assert client.read(again.result.stdout_digest).decode().splitlines()[0] == "hello from the input root"
    files = {f.path: f for f in result.output_files}
    assert set(files) == {"out/file.txt", "out/tool"}
    assert client.read(files["out/file.txt"].digest) == b"hi"
    assert files["out/tool"].is_executable and not files["out/file.txt"].is_executable
    (tree_out,) = result.output_directories
    assert tree_out.path == "tree"
    tree = re_pb2.Tree()
    tree.ParseFromString(client.read(tree_out.tree_digest))
    assert [s.name for s in tree.root.symlinks] == ["link"] and tree.root.symlinks[0].target == "sub/leaf.txt"
    (sub,) = tree.root.directories
    assert sub.name == "sub"
    children = {digest_of(c.SerializeToString(deterministic=True)).hash: c for c in tree.children}
    leaf = children[sub.digest.hash].files[0]
    assert leaf.name == "leaf.txt" and client.read(leaf.digest) == b"nested\n"
    assert result.execution_metadata.worker.startswith("treemat-bot-")


def test_rerun_is_served_from_the_action_cache(client: Client) -> None:
    action = _action(client, salt=b"cache-" + str(time.time_ns()).encode())
    first = client.execute(action)
    assert first.status_code == code_pb2.OK and not first.cached
    second = client.execute(action)
    assert second.cached, "BuildGrid should answer from the action cache the bot's result went into"
    assert second.result.output_files == first.result.output_files
    assert client.cached(action) is not None


def test_nonzero_exit_is_reported_not_an_error(client: Client) -> None:
    done = client.execute(_action(client, env={"EXIT_WITH": "3"}, salt=str(time.time_ns()).encode()), skip_cache=True)
    assert done.status_code == code_pb2.OK
    assert done.result.exit_code == 3
    assert client.read(done.result.stderr_digest).startswith(b"to-stderr\n")
    # earlier actions wrote through their inputs (as root): no bot may serve the poisoned bytes
    assert client.read(done.result.stdout_digest).decode().splitlines()[0] == "hello from the input root"


def test_big_blobs_travel_by_bytestream_and_are_verified(client: Client) -> None:
    big = os.urandom(3 << 20)
    action = client.build_action(
        {"in/big.bin": big, "run.sh": (b"cat in/big.bin in/big.bin > out.bin\n", True)},
        ["/bin/sh", "run.sh"],
        env={"PATH": "/usr/bin:/bin"},
        outputs=["out.bin"],
        salt=str(time.time_ns()).encode(),
    )
    done = client.execute(action, skip_cache=True)
    assert done.status_code == code_pb2.OK, done.status_message
    (out,) = done.result.output_files
    assert out.digest.hash == digest_of(big + big).hash and out.digest.size_bytes == 2 * len(big)


def test_cancelling_the_operation_kills_the_command(client: Client) -> None:
    from buildgrid._protos.google.longrunning import operations_pb2, operations_pb2_grpc

    token = _token(300)  # the command runs sandboxed (its own pid namespace, a private /tmp): found by argv
    action = client.build_action(
        {"run.sh": (f"exec sleep {token}\n".encode(), True)},
        ["/bin/sh", "run.sh"],
        env={"PATH": "/usr/bin:/bin"},
        salt=str(time.time_ns()).encode(),
    )
    stream = client.operations(action)
    try:
        first = next(iter(stream))
        wait_for(lambda: bool(_processes_with(token)), 60, "the command to start on a bot")
        operations = operations_pb2_grpc.OperationsStub(client.channel)
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=first.name), timeout=30)
        wait_for(lambda: not _processes_with(token), 60, "the cancelled command to be killed")
    finally:
        stream.cancel()


def test_a_blob_corrupted_in_a_bots_cas_is_never_served(cluster: Cluster, client: Client) -> None:
    """Same size, mode and mtime kept: the bot's guard rejects it and the blob is fetched again."""
    greeting = hashlib.sha256(b"hello from the input root\n").hexdigest()
    corrupted = 0
    for bot in cluster.running_bots:
        blob = bot.root / "cas" / greeting[:2] / greeting
        if not blob.exists():
            continue
        info = blob.stat()
        os.chmod(blob, 0o640)
        fd = os.open(blob, os.O_WRONLY | os.O_TRUNC)  # by descriptor: the bot's guard may quarantine it at the write
        try:
            os.write(fd, b"HELLO FROM THE INPUT ROOT\n")
            os.fchmod(fd, info.st_mode & 0o777)
            os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(fd)
        corrupted += 1
    assert corrupted, "an earlier test ran the action on some bot"
    for round_ in range(2):  # whichever bot leases it
        done = client.execute(_action(client, salt=f"corrupt{round_}{time.time_ns()}".encode()), skip_cache=True)
        assert done.status_code == code_pb2.OK, done.status_message
        first_line = client.read(done.result.stdout_digest).decode().splitlines()[0]
        assert first_line == "hello from the input root"


def test_stats_show_bot_work_per_root(cluster: Cluster, client: Client) -> None:
    # both bots publish counters under their own roots; at least one has run actions by now
    totals = {}
    for bot in cluster.running_bots:
        wait_for(lambda b=bot: (b.root / "stats").is_dir(), 30, f"{bot.name} to publish stats")
        stats = subprocess.run(
            [sys.executable, "-m", "treemat", "--root", str(bot.root), "stats", "--json"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(TOOLS)),
            check=True,
            timeout=60,
        )
        totals[bot.name] = json.loads(stats.stdout)["totals"]
    assert sum(t.get("actions", 0) for t in totals.values()) >= 4
    placed = sum(t.get(k, 0) for t in totals.values() for k in ("hardlink", "reflink", "clonefile", "snapshot", "copy"))
    assert placed >= 40, totals
    assert sum(t.get("remote_blobs_read", 0) for t in totals.values()) > 0


def test_stats_show_each_bots_staging_methods_and_isolation(cluster: Cluster, client: Client) -> None:
    done = client.execute(_action(client, salt=b"per-bot" + str(time.time_ns()).encode()), skip_cache=True)
    assert done.status_code == code_pb2.OK, done.status_message
    worker = done.result.execution_metadata.worker
    bot = next(b for b in cluster.running_bots if f"treemat-{b.name}" == worker)
    command = [sys.executable, "-m", "treemat", "--root", str(bot.root), "stats"]
    env = dict(os.environ, PYTHONPATH=str(TOOLS))
    # the bot publishes after each action: the record it wrote after this one has it
    wait_for(lambda: _bot_entry(command, env, worker)["actions"] >= 1, 30, f"{worker} to publish its stats")
    entry = _bot_entry(command, env, worker)
    assert entry["isolation"] in ("overlay", "copy-on-write"), entry
    methods = entry["methods"]
    assert set(methods) >= {"hardlink", "reflink", "copy"}
    assert sum(methods.values()) >= 40, entry  # the 40-file sdk subtree at least
    text = subprocess.run(command, capture_output=True, text=True, env=env, check=True, timeout=60).stdout
    line = next(line for line in text.splitlines() if line.strip().startswith(worker))
    assert f"hardlink {methods['hardlink']}" in line and entry["isolation"] in line, line


def _bot_entry(command: list[str], env: dict[str, str], bot_id: str) -> dict[str, Any]:
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, check=True, timeout=60)
    entries = [e for e in json.loads(done.stdout)["bots"] if e["bot_id"] == bot_id]
    assert entries, done.stdout[-2000:]
    entry: dict[str, Any] = max(entries, key=lambda e: int(e["actions"]))
    return entry


@pytest.mark.slow
@pytest.mark.heavy
def test_killed_bot_loses_no_action(cluster: Cluster, client: Client, tmp_path: Path) -> None:
    token = _token(3)
    action = client.build_action(
        {"run.sh": (f"sleep {token}; echo done > out.txt\n".encode(), True)},
        ["/bin/sh", "run.sh"],
        env={"PATH": "/usr/bin:/bin"},
        outputs=["out.txt"],
        salt=str(time.time_ns()).encode(),
    )
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(client.execute(action, skip_cache=True, timeout=180)))
    thread.start()
    victim = None
    try:
        wait_for(lambda: bool(_processes_with(token)), 60, "the action to start on a bot")
        bots = {bot.proc.pid: bot for bot in cluster.running_bots}
        victim = next(bots[pid] for pid in _ancestors(_processes_with(token)[0]) if pid in bots)
        cluster.kill_bot(victim.name)
        thread.join(180)
        assert results, "Execute did not finish"
        done = results[0]
        assert done.status_code == code_pb2.OK, done.status_message  # type: ignore[attr-defined]
        assert done.result.exit_code == 0  # type: ignore[attr-defined]
        assert done.result.execution_metadata.worker != f"treemat-{victim.name}"  # type: ignore[attr-defined]
    finally:
        thread.join(1)
        if victim is not None:  # later tests keep two bots
            cluster.start_bot(f"{victim.name}-restarted", tmp_path / "restarted-root")


def _token(seconds: int) -> str:
    """A `sleep` argument of about `seconds` that no other process has: the command is found by it."""
    return f"{seconds}.{time.time_ns() % 10**9:09d}"


def _processes_with(token: str) -> list[int]:
    """Live processes whose command line holds `token`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes() and _alive(int(entry)):
                    found.append(int(entry))
    return found


def _ancestors(pid: int) -> list[int]:
    """`pid`'s parent, its parent, ... (host pids)."""
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        chain.append(pid)
    return chain


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:  # a zombie counts as dead
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
