"""Running the tool: one process group (optionally inside the overlay sandbox), output kept, cancellable.

When the tool exits, its process group gets a short grace period, then SIGKILL: a background child that keeps
stdout open (or just keeps running) cannot hold the action. A tool killed by signal N exits 128+N.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from treemat.locking import ForkGate

KILL_GRACE_SECONDS = 0.5  # after the tool exits, its process group gets this long before SIGKILL
MAX_OUTPUT_BYTES = 16 << 20  # tool stdout+stderr kept for Bazel; the rest is counted, not stored


@dataclass(slots=True)
class ToolOutcome:
    """How one tool run ended."""

    exit_code: int
    output: str
    seconds: float = 0.0
    cancelled: bool = False


class ToolRunner:
    """Starts tools in their own sessions and cancels them by request id; safe from several threads."""

    def __init__(self, fork_gate: ForkGate | None = None) -> None:
        self.fork_gate = fork_gate if fork_gate is not None else ForkGate()
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen[bytes]] = {}
        self._cancelled: set[int] = set()

    def run(
        self,
        request_id: int,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        preexec: Callable[[], None] | None = None,
    ) -> ToolOutcome:
        """Run `argv` to completion (or cancellation); errors starting it become an outcome, not an exception."""
        started = time.perf_counter()
        with self._lock, self.fork_gate.forking():
            if request_id and request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return ToolOutcome(1, "treemat: cancelled before start\n", cancelled=True)
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=preexec,  # namespaces and mounts are set up in the child
                )
            except subprocess.SubprocessError as exc:
                return ToolOutcome(1, f"treemat: error: cannot set up the tool's sandbox: {exc}\n")
            except OSError as exc:
                code = 126 if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM) else 127
                return ToolOutcome(code, f"treemat: error: cannot run {argv[0]!r}: {exc.strerror}\n")
            if request_id:
                self._running[request_id] = proc
        try:
            output = _drain(proc)
        finally:
            with self._lock:
                self._running.pop(request_id, None)
                cancelled = request_id in self._cancelled
                self._cancelled.discard(request_id)
        return ToolOutcome(_exit_status(proc.returncode), output, time.perf_counter() - started, cancelled)

    def cancel(self, request_id: int) -> bool:
        """Kill the running tool of `request_id` (or make it never start). True if it was in flight."""
        with self._lock:
            self._cancelled.add(request_id)
            proc = self._running.get(request_id)
        if proc is None:
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return True


def _drain(proc: subprocess.Popen[bytes]) -> str:
    """The tool's combined output; once it exits, its process group gets a grace period, then SIGKILL.

    A background child that keeps stdout open (or just keeps running) cannot hold the action.
    """
    chunks: list[bytes] = []
    kept = [0, 0]  # bytes kept, bytes dropped

    def read() -> None:
        assert proc.stdout is not None
        while block := os.read(proc.stdout.fileno(), 1 << 16):
            if kept[0] < MAX_OUTPUT_BYTES:
                chunks.append(block)
                kept[0] += len(block)
            else:
                kept[1] += len(block)

    reader = threading.Thread(target=read, name="treemat-tool-output", daemon=True)
    reader.start()
    proc.wait()
    reader.join(KILL_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    reader.join()
    if proc.stdout is not None:
        proc.stdout.close()
    text = b"".join(chunks).decode("utf-8", "replace")
    if kept[1]:
        text += f"\ntreemat: note: {kept[1]} more bytes of tool output were dropped\n"
    return text


def _exit_status(returncode: int) -> int:
    """Shell convention: a tool killed by signal N exits 128+N (Bazel shows it as such)."""
    return 128 - returncode if returncode < 0 else returncode
