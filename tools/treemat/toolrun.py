"""Running the tool: in the sandbox (sandbox.py), output kept and bounded, cancellable by request id.

A sandboxed tool is pid 1 of its own pid namespace: when it exits, everything it started is killed by the kernel,
so no daemon can keep stdout open or touch an output after the reply. Only with `--isolation=none` (asked for)
does the tool run as a plain child in its own session, whose process group is killed after a grace period.
A tool killed by signal N exits 128+N.
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

from treemat.errors import ExecutionError
from treemat.locking import ForkGate
from treemat.sandbox import Sandbox, SandboxProcess, ToolPlan

KILL_GRACE_SECONDS = 0.5  # unsandboxed only: after the tool exits, its process group gets this long before SIGKILL
MAX_OUTPUT_BYTES = 16 << 20  # tool stdout+stderr kept for Bazel; the rest is counted, not stored


class ToolOutcome:
    """How one tool run ended; `view_fd` (the tool's view of its exec dir) is the caller's to close."""

    __slots__ = ("cancelled", "exit_code", "output", "seconds", "view_fd")

    def __init__(
        self, exit_code: int, output: str, seconds: float = 0.0, cancelled: bool = False, view_fd: int = -1
    ) -> None:
        self.exit_code = exit_code
        self.output = output
        self.seconds = seconds
        self.cancelled = cancelled
        self.view_fd = view_fd


class ToolRunner:
    """Starts tools in `sandbox` and cancels them by request id; safe from several threads."""

    def __init__(self, sandbox: Sandbox, fork_gate: ForkGate) -> None:
        self.sandbox = sandbox
        self.fork_gate = fork_gate
        self._lock = threading.Lock()
        self._running: dict[int, Callable[[], None]] = {}
        self._cancelled: set[int] = set()

    def run(self, request_id: int, plan: ToolPlan) -> ToolOutcome:
        """Run the plan to completion (or cancellation); a tool that cannot start becomes an outcome."""
        started = time.perf_counter()
        with self._lock:
            if request_id and request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return ToolOutcome(1, "treemat: cancelled before start\n", cancelled=True)
        refused = _nul_in(plan)
        if refused:  # (exec would fail with no word in the sandbox, with a ValueError in place)
            return ToolOutcome(1, f"treemat: error: {refused} contains a NUL byte: refused\n")
        if self.sandbox.in_place:
            return self._run_in_place(request_id, plan, started)
        try:
            process = self.sandbox.start(plan)
        except ExecutionError as exc:
            return ToolOutcome(1, f"treemat: error: {exc}\n")
        self._register(request_id, process.kill)
        try:
            output = read_bounded(process.output_fd)
            code = process.wait()
        except BaseException:
            process.kill()
            os.close(process.view_fd)
            raise
        finally:
            os.close(process.output_fd)
        cancelled = self._unregister(request_id)
        return ToolOutcome(code, output, time.perf_counter() - started, cancelled, process.view_fd)

    def cancel(self, request_id: int) -> bool:
        """Kill the running tool of `request_id` (or make it never start). True if it was in flight."""
        with self._lock:
            self._cancelled.add(request_id)
            kill = self._running.get(request_id)
        if kill is None:
            return False
        kill()
        return True

    def _register(self, request_id: int, kill: Callable[[], None]) -> None:
        with self._lock:
            self._running[request_id] = kill
            late = request_id in self._cancelled  # cancelled while it was being started
        if late:
            kill()

    def _unregister(self, request_id: int) -> bool:
        with self._lock:
            self._running.pop(request_id, None)
            cancelled = request_id in self._cancelled
            self._cancelled.discard(request_id)
        return cancelled

    def _run_in_place(self, request_id: int, plan: ToolPlan, started: float) -> ToolOutcome:
        """The tool in its own session at its real exec dir: `--isolation=none`, or macOS under its profile."""
        cwd = plan.exec_dir / plan.cwd if plan.cwd else plan.exec_dir
        argv = self.sandbox.command(plan)
        stdout = plan.stdout if plan.stdout >= 0 else subprocess.PIPE
        stderr = plan.stderr if plan.stderr >= 0 else subprocess.STDOUT
        with self.fork_gate.forking():
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=plan.env,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                )
            except OSError as exc:
                code = 126 if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM) else 127
                return ToolOutcome(code, f"treemat: error: cannot run {plan.argv[0]!r}: {exc.strerror}\n")
        self._register(request_id, lambda: _kill_group(proc.pid))
        try:
            output = _drain_group(proc)
        finally:
            cancelled = self._unregister(request_id)
        view_fd = os.open(plan.exec_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return ToolOutcome(_exit_status(proc.returncode), output, time.perf_counter() - started, cancelled, view_fd)


def read_bounded(fd: int) -> str:
    """Everything written to `fd` until EOF: the first MAX_OUTPUT_BYTES kept, the rest counted."""
    chunks: list[bytes] = []
    kept = dropped = 0
    while block := os.read(fd, 1 << 16):
        if kept < MAX_OUTPUT_BYTES:
            chunks.append(block)
            kept += len(block)
        else:
            dropped += len(block)
    text = b"".join(chunks).decode("utf-8", "replace")
    if dropped:
        text += f"\ntreemat: note: {dropped} more bytes of tool output were dropped\n"
    return text


def _drain_group(proc: subprocess.Popen[bytes]) -> str:
    """Unsandboxed: the output; once the tool exits its process group gets a grace period, then SIGKILL."""
    result: list[str] = []
    if proc.stdout is None:  # the caller's files take the output
        proc.wait()
        time.sleep(KILL_GRACE_SECONDS)
        _kill_group(proc.pid)
        return ""
    stdout = proc.stdout.fileno()
    reader = threading.Thread(target=lambda: result.append(read_bounded(stdout)), daemon=True)
    reader.start()
    proc.wait()
    reader.join(KILL_GRACE_SECONDS)
    _kill_group(proc.pid)
    reader.join()
    proc.stdout.close()
    return result[0] if result else ""


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _exit_status(returncode: int) -> int:
    """Shell convention: a tool killed by signal N exits 128+N (Bazel shows it as such)."""
    return 128 - returncode if returncode < 0 else returncode


__all__ = ["MAX_OUTPUT_BYTES", "SandboxProcess", "ToolOutcome", "ToolRunner", "read_bounded"]


def _nul_in(plan: ToolPlan) -> str:
    """What of the tool's argv, environment or working directory holds a NUL byte (no exec takes one); ''."""
    for index, arg in enumerate(plan.argv):
        if "\0" in arg:
            return f"argument {index}"
    for name, value in plan.env.items():
        if "\0" in name or "\0" in value:
            return f"environment variable {name.split(chr(0))[0]!r}"
    return "the working directory" if "\0" in plan.cwd else ""
