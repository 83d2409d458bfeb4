"""A bot's blobs corrupted around a running action (issue 19, item 3): PostgreSQL + BuildGrid + two real bots on
loopback, hand-built REAPI actions. Whatever is damaged, the action finishes with the right bytes (or fails with
a clear error), and the action cache never holds a wrong output.

- An output's blob already in a bot's CAS, damaged (size, mode and mtime kept): the output's ingest keeps the
  copy in place (its stat fingerprint is intact), so the upload read the damaged bytes; BuildGrid refused them
  ("Data does not match hash") and the lease failed and was re-queued again and again. Now every local file is
  hashed as it is uploaded: the damaged blob is quarantined and the outputs ingested again from the command's
  view, by BatchUpdateBlobs (small) and ByteStream (big) alike.
- A process the command left behind, waiting for it to end and then rewriting its output (a change after the tool
  ended, before the bot read the output): the command's pid namespace dies with it, so nothing is left to write.
- An input blob written in a bot's CAS while the command runs (after it was staged: under the overlay sandbox
  the command reads that very inode): the bot's guard sees the write (inotify on the blob), fails the lease
  INTERNAL and quarantines the blob; BuildGrid re-queues, the blob is fetched again, the result is right.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="needs the bot extra: pip install -e '.[bot]'")
pytest.importorskip("buildgrid", reason="needs the bot extra: pip install -e '.[bot]'")

from treemat.bot.rpc import code_pb2  # noqa: E402
from treemat.fsprims import BLOB_MTIME_NS, blob_mode  # noqa: E402

from ..support.client import Client, digest_of  # noqa: E402
from ..support.cluster import Cluster  # noqa: E402
from ..support.markers import requires_postgresql  # noqa: E402
from ..support.waiting import wait_for  # noqa: E402
from .test_remote_slice import _processes_with, _token  # noqa: E402

pytestmark = [
    pytest.mark.remote,
    requires_postgresql,
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster"), bots=2) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[Client]:
    channel = grpc.insecure_channel(cluster.endpoint.removeprefix("grpc://"))
    try:
        yield Client(channel, cluster.instance, timeout=120)
    finally:
        channel.close()


def _blob(root: Path, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    return root / "cas" / digest[:2] / digest


def _damage(path: Path, data: bytes) -> None:
    """Write `data` at `path` as a blob that looks intact: same size, the CAS's mode and sentinel mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.chmod(path, 0o640)
    path.write_bytes(data)
    os.chmod(path, blob_mode(False))
    os.utime(path, ns=(BLOB_MTIME_NS, BLOB_MTIME_NS))


def test_a_damaged_copy_of_an_output_in_a_bots_cas_is_never_uploaded(cluster: Cluster, client: Client) -> None:
    salt = str(time.time_ns()).encode()
    small = b"small output " + salt + b"\n"
    big = os.urandom(1 << 20) + salt  # the output is big + big: > 1 MiB, sent by ByteStream
    for bot in cluster.running_bots:  # whichever bot leases it finds both outputs' blobs damaged in its CAS
        _damage(_blob(bot.root, small), small.upper())
        _damage(_blob(bot.root, big + big), bytes(reversed(big + big)))
    script = b"printf '%s\\n' 'small output " + salt + b"' > small.out\ncat in/big.bin in/big.bin > big.out\n"
    action = client.build_action(  # outputs made by the command, not copies of inputs (those the guard checks)
        {"in/big.bin": big, "run.sh": (script, True)},
        ["/bin/sh", "run.sh"],
        env={"PATH": "/usr/bin:/bin"},
        outputs=["small.out", "big.out"],
        salt=salt,
    )
    done = client.execute(action, skip_cache=True, timeout=90)
    assert done.status_code == code_pb2.OK, done.status_message
    assert done.result.exit_code == 0, client.read(done.result.stderr_digest)
    outputs = {item.path: item.digest for item in done.result.output_files}
    assert outputs["small.out"].hash == digest_of(small).hash
    assert outputs["big.out"].hash == digest_of(big + big).hash
    assert client.read(outputs["small.out"]) == small
    assert client.read(outputs["big.out"]) == big + big
    cached = client.cached(action)
    assert cached is not None and {item.path: item.digest for item in cached.output_files} == outputs
    # the bot that ran it replaced both damaged copies (the other bot's stay quarantine-bound until used)
    worker = done.result.execution_metadata.worker.removeprefix("treemat-")
    (ran,) = [bot for bot in cluster.running_bots if bot.name == worker]
    assert _blob(ran.root, small).read_bytes() == small
    assert _blob(ran.root, big + big).read_bytes() == big + big
    assert len(list((ran.root / "quarantine").glob("*.reason"))) >= 2


def test_a_process_left_by_the_command_cannot_rewrite_its_output_before_upload(client: Client) -> None:
    salt = str(time.time_ns())
    script = (  # the daemon spins until the command's shell is gone, then rewrites the output
        f"printf 'good {salt}\\n' > out.txt\n"
        "setsid sh -c 'while kill -0 '\"$$\"' 2>/dev/null; do :; done; echo corrupted > out.txt' &\n"
    )
    action = client.build_action(
        {"run.sh": (script.encode(), True)}, ["/bin/sh", "run.sh"], env={"PATH": "/usr/bin:/bin"}, outputs=["out.txt"]
    )
    done = client.execute(action, skip_cache=True, timeout=90)
    assert done.status_code == code_pb2.OK, done.status_message
    (out,) = done.result.output_files
    assert client.read(out.digest) == f"good {salt}\n".encode()
    assert client.read(client.cached(action).output_files[0].digest) == f"good {salt}\n".encode()


def test_an_input_blob_written_while_the_command_runs_fails_the_lease_and_is_fetched_again(
    cluster: Cluster, client: Client
) -> None:
    token = _token(300)  # the command waits in `sleep TOKEN` until the test has damaged its input, then kills it
    data = b"pristine input " + token.encode() + b"\n"
    action = client.build_action(
        {"in/data.txt": data, "run.sh": (f"sleep {token}\ncat in/data.txt > out.txt\n".encode(), True)},
        ["/bin/sh", "run.sh"],
        env={"PATH": "/usr/bin:/bin"},
        outputs=["out.txt"],
        salt=token.encode(),
    )
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(client.execute(action, skip_cache=True, timeout=240)))
    thread.start()
    damaged: list[Path] = []
    try:
        wait_for(lambda: bool(_processes_with(token)), 60, "the command to start on a bot")
        for bot in cluster.running_bots:
            blob = _blob(bot.root, data)
            if blob.exists():  # staged for the running command (hardlinked into its view under overlay)
                _damage(blob, data.upper())
                damaged.append(blob)
        assert damaged, "the running bot fetched the input into its CAS"

        def finished() -> bool:  # every run of the command (the first, and the re-queued one) is let go
            for pid in _processes_with(token):
                os.kill(pid, 15)
            return bool(results)

        wait_for(finished, 240, "Execute to finish")
    finally:
        thread.join(240)
    done = results[0]
    assert done.status_code == code_pb2.OK, done.status_message  # type: ignore[attr-defined]
    (out,) = done.result.output_files  # type: ignore[attr-defined]
    assert client.read(out.digest) == data, "the damaged input's bytes must not reach the output"
    assert client.read(client.cached(action).output_files[0].digest) == data
    reasons = [p.read_text() for bot in cluster.running_bots for p in (bot.root / "quarantine").glob("*.reason")]
    assert any("written to while in the store" in reason for reason in reasons), reasons  # the guard caught it
