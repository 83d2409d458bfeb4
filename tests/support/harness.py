"""Drives a real `python -m treemat --persistent_worker` process the way Bazel does; every read has a timeout."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

# The directory holding the treemat package the worker subprocesses import: under `bazel test` the runner finds
# it in the runfiles (tests/pytest_runner.py); under plain pytest it is this checkout's.
TOOLS_DIR = Path(os.environ.get("TREEMAT_TOOLS_DIR") or Path(__file__).resolve().parents[2] / "tools")
READ_TIMEOUT = 120.0  # seconds a test waits for one reply before it fails (a hung worker fails, never hangs)


def worker_env() -> dict[str, str]:
    """Environment with the in-tree package importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TOOLS_DIR), env.get("PYTHONPATH", "")])
    return env


def b64_digest(path: Path) -> str:
    """Bazel's JSON digest form: base64 of the hex sha256 text."""
    return base64.b64encode(hashlib.sha256(path.read_bytes()).hexdigest().encode()).decode()


def request(
    execroot: Path, inputs: list[str], outputs: list[str], argv: list[str], request_id: int = 0
) -> dict[str, Any]:
    """A JSON WorkRequest for a tool run through treemat's flagfile contract."""
    body: dict[str, Any] = {
        "arguments": [*(f"--output={o}" for o in outputs), "--", *argv],
        "inputs": [{"path": p, "digest": b64_digest(execroot / p)} for p in inputs],
    }
    if request_id:
        body["requestId"] = request_id
    return body


class Worker:
    """A live worker subprocess with a JSON response reader (started on the first `read`: proto tests read
    `stdout` themselves)."""

    def __init__(self, execroot: Path, root: Path, protocol: str = "json", extra: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "treemat", "--persistent_worker", f"--protocol={protocol}", f"--root={root}"]
            + (extra or []),
            cwd=execroot,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout
        self._stderr: list[bytes] = []
        self._lines: queue.Queue[bytes] | None = None
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode(errors="replace")

    def send_raw(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def send(self, *requests: dict[str, Any]) -> None:
        """Send requests back to back with no separator, as Bazel 4.2.3 does."""
        self.send_raw("".join(json.dumps(r) for r in requests).encode())

    def read(self, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
        """The next JSON reply; AssertionError if none comes within `timeout` seconds or stdout closes."""
        if self._lines is None:
            self._lines = queue.Queue()
            threading.Thread(target=self._read_lines, args=(self._lines,), daemon=True).start()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout:.0f} s; stderr:\n{self.stderr}") from None
        assert line, f"worker closed stdout; stderr:\n{self.stderr}"
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    def _read_lines(self, lines: queue.Queue[bytes]) -> None:
        for line in self.stdout:
            lines.put(line)
        lines.put(b"")  # EOF

    def close(self) -> int:
        self.stdin.close()
        return self.proc.wait(30)
