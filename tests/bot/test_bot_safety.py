"""The bot's per-action core (ActionRunner over LocalStager) holds the worker's safety, without a BuildGrid:
the server's CAS is an in-process fake; staging, the sandbox and output collection are the real ones.

- an output dir holding an absolute symlink to a host file is refused, the host file never uploaded;
- a link back to an ancestor directory does not recurse: refused;
- a command that double-forks a daemon leaves no process once the action is over;
- a command exceeding the Action's timeout is killed (daemons included) and reported DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc", reason="needs the bot extra: pip install -e '.[bot]'")
pytest.importorskip("buildgrid", reason="needs the bot extra: pip install -e '.[bot]'")

from google.protobuf.any_pb2 import Any as AnyProto
from treemat.bot.remote_cas import TransferStats, to_digest
from treemat.bot.rpc import code_pb2, re_pb2
from treemat.bot.runner import ActionRunner, Outcome
from treemat.bot.stager import Digest, LocalStager

ENV = {"PATH": "/usr/bin:/bin"}


class FakeRemote:
    """The server's CAS, in memory: what RemoteCas does for the runner (fetch into the local CAS, upload)."""

    def __init__(self, local: LocalStager) -> None:
        self.local = local
        self.blobs: dict[str, bytes] = {}
        self.uploaded: dict[str, bytes] = {}

    def put(self, data: bytes) -> Any:
        self.blobs[hashlib.sha256(data).hexdigest()] = data
        return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))

    def fetch(self, wanted: Iterable[tuple[Digest, bool]], stats: TransferStats) -> None:
        for digest, executable in wanted:
            if not self.local.has_blob(digest, executable):
                self.local.put_bytes(self.blobs[digest.hash], executable=executable)

    def read_messages(self, digests: list[Digest], stats: TransferStats) -> dict[str, bytes]:
        return {digest.hash: self.blobs[digest.hash] for digest in digests}

    def upload(self, blobs: Mapping[str, tuple[Digest, Path | bytes]], stats: TransferStats) -> None:
        for key, (_digest, source) in blobs.items():
            self.uploaded[key] = source if isinstance(source, bytes) else Path(source).read_bytes()


@pytest.fixture
def bot(tmp_path: Path) -> Iterator[tuple[ActionRunner, FakeRemote]]:
    stager = LocalStager(tmp_path / "root")
    remote = FakeRemote(stager)
    try:
        yield ActionRunner(stager, remote, worker_name="test-bot"), remote  # type: ignore[arg-type]
    finally:
        stager.close()


def run_script(
    bot: tuple[ActionRunner, FakeRemote],
    script: str,
    *,
    outputs: Sequence[str] = (),
    output_dirs: Sequence[str] = (),
    timeout_seconds: int = 0,
    inputs: Mapping[str, bytes] | None = None,
) -> Outcome:
    runner, remote = bot
    root = re_pb2.Directory()
    for name, data in sorted({"run.sh": script.encode(), **(inputs or {})}.items()):
        root.files.add(name=name, digest=remote.put(data), is_executable=name == "run.sh")
    command = re_pb2.Command(arguments=["/bin/sh", "run.sh"], output_files=outputs, output_directories=output_dirs)
    for name, value in ENV.items():
        command.environment_variables.add(name=name, value=value)
    action = re_pb2.Action(
        command_digest=remote.put(command.SerializeToString(deterministic=True)),
        input_root_digest=remote.put(root.SerializeToString(deterministic=True)),
    )
    if timeout_seconds:
        action.timeout.FromSeconds(timeout_seconds)
    payload = AnyProto()
    payload.Pack(action)
    return runner.run(payload, threading.Event())


def stderr_of(outcome: Outcome, remote: FakeRemote) -> str:
    return remote.uploaded[to_digest(outcome.result.stderr_digest).hash].decode()


def processes_with(token: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds `token`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if token.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


@pytest.fixture
def token() -> Iterator[str]:
    """A unique `sleep` argument to find a command's processes by; any survivor is killed afterwards."""
    value = f"{1000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"
    yield value
    for pid in processes_with(value):
        os.kill(pid, 9)


def test_an_absolute_symlink_to_a_host_file_in_an_output_dir_is_refused_not_uploaded(bot: Any) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    outcome = run_script(bot, "mkdir out && echo ok > out/ok && ln -s /etc/passwd out/pw\n", output_dirs=["out"])
    assert outcome.code == code_pb2.OK, outcome.message
    assert outcome.result.exit_code != 0
    assert not outcome.result.output_directories
    assert passwd not in bot[1].uploaded.values()
    assert "output 'out/pw' is a symlink to '/etc/passwd', outside the exec dir: refused" in stderr_of(outcome, bot[1])


def test_an_absolute_link_to_an_ancestor_is_refused_without_recursing(bot: Any) -> None:
    script = 'mkdir -p out/d && echo x > out/d/f && ln -s "$PWD/out" out/d/up\n'
    outcome = run_script(bot, script, output_dirs=["out"])
    assert outcome.result.exit_code != 0
    assert not outcome.result.output_directories
    assert "output 'out/d/up' leads back into a directory that contains it (a loop): refused" in stderr_of(
        outcome, bot[1]
    )


def test_a_relative_link_to_an_ancestor_is_refused(bot: Any) -> None:
    """Kept as a link it would be a loop for whoever follows it (Bazel digesting a tree artifact): refused."""
    outcome = run_script(bot, "mkdir -p out/d && echo x > out/d/f && ln -s .. out/d/up\n", output_dirs=["out"])
    assert outcome.result.exit_code != 0
    assert not outcome.result.output_directories
    assert "output 'out/d/up' is a symlink to '..', a directory containing it: refused" in stderr_of(outcome, bot[1])


def test_a_double_forked_daemon_does_not_outlive_the_action(bot: Any, token: str) -> None:
    script = f"setsid sh -c 'touch started; exec sleep {token}' &\nwhile [ ! -e started ]; do :; done\necho ready\n"
    outcome = run_script(bot, script)
    assert outcome.code == code_pb2.OK and outcome.result.exit_code == 0, outcome.message
    assert bot[1].uploaded[to_digest(outcome.result.stdout_digest).hash] == b"ready\n"
    assert processes_with(token) == []


def test_a_command_past_its_timeout_is_killed_and_reported(bot: Any, token: str) -> None:
    script = f"setsid sh -c 'exec sleep {token}' &\nexec sleep 600\n"
    outcome = run_script(bot, script, timeout_seconds=1)
    assert outcome.code == code_pb2.DEADLINE_EXCEEDED
    assert "timed out" in outcome.message
    assert outcome.result.exit_code != 0
    assert processes_with(token) == []


def test_a_write_through_an_input_never_reaches_the_bots_cas(bot: Any) -> None:
    """Inputs may be hardlinked from the CAS (overlay sandbox): a write copies up, the blob stays intact."""
    script = "chmod u+w in.txt 2>/dev/null; echo poisoned > in.txt; cat in.txt\n"
    first = run_script(bot, script, inputs={"in.txt": b"pristine\n"})
    assert first.result.exit_code in (0, 1)
    again = run_script(bot, "cat in.txt\n", inputs={"in.txt": b"pristine\n"})
    assert bot[1].uploaded[to_digest(again.result.stdout_digest).hash] == b"pristine\n"
    stager = bot[0].stager
    digest = Digest(hashlib.sha256(b"pristine\n").hexdigest(), 9)
    assert stager.blob_path(digest, False).read_bytes() == b"pristine\n"
    if stager.sandbox.overlay:
        assert first.record["methods"] == {"hardlink": 2}


def test_the_bot_builds_no_action_executor(tmp_path: Path) -> None:
    """The bot stages and runs commands itself: it used to build an ActionExecutor it never used."""
    stager = LocalStager(tmp_path / "root", isolation="none")
    try:
        assert "executor" not in vars(stager)
        assert stager.stack._executor is None
    finally:
        stager.close()


@pytest.mark.parametrize(
    ("script", "files", "dirs", "refusal"),
    [
        ("mkdir -p out/x && echo hi > out/x/y\n", ["out/x"], [], "output 'out/x' is a directory, declared a file"),
        ("echo hi > out\n", [], ["out"], "output 'out' is a regular file, declared a directory"),
    ],
)
def test_an_output_of_the_wrong_kind_is_refused(
    bot: Any, script: str, files: list[str], dirs: list[str], refusal: str
) -> None:
    """REAPI v2.0: a directory at an output_files path (or a file at an output_directories one) is a failed
    precondition; the bot reported it as what it found, an output_directories entry for a declared file."""
    outcome = run_script(bot, script, outputs=files, output_dirs=dirs)
    assert outcome.result.exit_code != 0
    assert not outcome.result.output_directories and not outcome.result.output_files
    assert refusal in stderr_of(outcome, bot[1])
