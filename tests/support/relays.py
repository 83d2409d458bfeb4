"""Relays of the stager service driven as Bazel drives a worker (`python3 -m treemat --persistent_worker
--protocol=proto`, cwd = the execroot), with WorkRequest protos; the fixtures of the service suites."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat import protos
from treemat.framing import encode_delimited, read_delimited

from .harness import worker_env
from .services import services_of
from .waiting import wait_for

READ_TIMEOUT = 60.0


def services(root: Path) -> list[int]:
    """Pids of the live (not zombie) service processes of `root`."""
    return services_of(root)


def tool_running(marker: str) -> bool:
    """True while a process whose argv holds `marker` runs (the tools run in the service's sandbox)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    return True
            except OSError:
                continue
    return False


class RelayProcess:
    """`treemat --persistent_worker --protocol=proto` with the service on, driven with WorkRequest protos."""

    def __init__(
        self,
        execroot: Path,
        root: Path,
        *,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
        wrapper: list[str] | None = None,
        python_flags: tuple[str, ...] = (),
    ):
        worker = ["-m", "treemat", "--persistent_worker", "--protocol=proto", f"--root={root}"]
        command = [*(wrapper or []), sys.executable, *python_flags, *worker]
        environment = {**worker_env(), "TREEMAT_SERVICE": "1", **(env or {})}
        self.execroot = execroot
        self.proc = subprocess.Popen(
            [*command, *extra],
            cwd=execroot,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._stderr: list[bytes] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode()

    def send(self, argv: list[str], outputs: list[str], inputs: list[str], request_id: int = 0) -> None:
        message = protos.WorkRequest()
        message.arguments.extend([*(f"--output={o}" for o in outputs), "--", *argv])
        message.request_id = request_id
        for path in inputs:
            entry = message.inputs.add()
            entry.path = path
            entry.digest = hashlib.sha256((self.execroot / path).read_bytes()).hexdigest().encode()
        self.send_message(message)

    def send_message(self, message: protos.WorkRequest) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_delimited(message))
        self.proc.stdin.flush()

    def cancel(self, request_id: int) -> None:
        self.send_message(protos.WorkRequest(request_id=request_id, cancel=True))

    def read(self) -> protos.WorkResponse:
        assert self.proc.stdout is not None
        reply = read_delimited(self.proc.stdout, protos.WorkResponse)
        assert reply is not None, f"the relay closed stdout; stderr: {self.stderr}"
        return reply

    def touch(self, output: str = "out/x", request_id: int = 0) -> protos.WorkResponse:
        self.send(["touch", output], [output], ["in/a"], request_id)
        return self.read()

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=READ_TIMEOUT)


@pytest.fixture()
def execroot(tmp_path: Path) -> Path:
    directory = tmp_path / "execroot"
    (directory / "in").mkdir(parents=True)
    (directory / "out").mkdir()
    (directory / "in/a").write_text("input a\n")
    return directory


@pytest.fixture()
def root(tmp_path: Path) -> Iterator[Path]:
    """A treemat root; every service started on it is ended after the test."""
    path = tmp_path / "root"
    yield path
    for pid in services(path):
        os.kill(pid, signal.SIGKILL)


def answered_within(relay: RelayProcess, seconds: float) -> protos.WorkResponse:
    """The relay's next reply, which must come within `seconds` (read in a thread: a hung relay fails the test)."""
    replies: list[protos.WorkResponse] = []
    threading.Thread(target=lambda: replies.append(relay.read()), daemon=True).start()
    return wait_for(lambda: replies[0] if replies else None, timeout=seconds, what="the relay's answer")


def the_service(root: Path) -> int:
    """The one live service of `root` (asserts there is exactly one)."""
    pids = services(root)
    assert len(pids) == 1, pids
    return pids[0]
