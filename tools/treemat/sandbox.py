"""Every tool runs sandboxed: the client of the sandbox helper (sandboxd.py), and the probe that picks the mode.

One helper process per treemat process is started once (sandboxstart.py: a user namespace and a mount namespace,
prepared); each tool then runs in fresh mount + pid + IPC namespaces, cloned ahead of it. What the tool sees
(sandboxd.py has the details):
its exec dir at the fixed path EXEC_ROOT (an overlay over the staged hardlinks, or a bind of a copy-on-write
tree), its tool cache at TOOL_CACHE, a private /tmp and /dev/shm, everything else read-only, TREEMAT_ROOT
hidden. Nothing it starts outlives it.

Modes, probed for real at start-up (`open_sandbox`):
- `overlay`: namespaces + overlayfs; inputs may be hardlinks to CAS blobs (a write copies up), exec dirs are reused;
- `copy-on-write`: namespaces without overlayfs; inputs are separate inodes (reflink / clone / copy);
- `none`: only when asked for (`--isolation=none`): the tool runs unsandboxed in its exec dir.
Where namespaces are impossible and `none` was not asked for, no tool runs: each action fails with the reason.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from treemat import sandbox_darwin
from treemat.errors import ExecutionError
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.sandboxstart import SandboxUnavailable as SandboxUnavailable
from treemat.sandboxstart import hidden_paths, start_helper

EXEC_ROOT = "/tmp/treemat/exec"  # = sandboxd.EXEC_ROOT (not imported: sandboxd is a program of its own)
TOOL_CACHE = "/tmp/treemat/cache"
ISOLATION_OVERLAY = "overlay"
ISOLATION_COW = "copy-on-write"  # namespaces, no overlayfs: inputs are separate inodes (reflink, clone, copy)
ISOLATION_NONE = "none"
ISOLATION_DARWIN = "sandbox-exec"  # macOS: a Seatbelt profile (sandbox_darwin.py), the tool at its real exec dir
ISOLATION_UNAVAILABLE = "unavailable"  # no sandbox works and `none` was not asked for: every action fails
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RunDir(NamedTuple):
    """The scratch beside an exec dir of a tool that runs in place (`none`, macOS): its /tmp and its cache.

    (A tool in a mount namespace gets both in a tmpfs of its own: nothing on disk.)
    """

    path: Path

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def cache(self) -> Path:
        """The tool's private, empty cache."""
        return self.path / "cache"

    def create(self) -> None:
        """mkdir what this run needs."""
        os.mkdir(self.path, 0o700)
        os.mkdir(self.tmp, 0o700)
        os.mkdir(self.cache, 0o700)

    def remove(self) -> None:
        remove_tree(self.path)


class CacheView(NamedTuple):
    """What the tool sees at TOOL_CACHE: a trusted seed through a private overlay, or the seed itself, writable."""

    seed: Path
    writable: bool = False  # only for the run that builds the seed (toolcache.py), never for a user's action


class ToolPlan:
    """One tool run: what to exec, where, and the filesystem it sees."""

    __slots__ = ("argv", "cache", "cwd", "env", "exec_dir", "masks", "overlay", "run_dir", "stderr", "stdout")

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        exec_dir: Path,
        run_dir: RunDir | None,
        overlay: bool,
        cache: CacheView | None = None,
        cwd: str = "",
        masks: Sequence[str] = (),
        stdout: int = -1,
        stderr: int = -1,
    ) -> None:
        self.argv = argv
        self.env = env
        self.exec_dir = exec_dir
        self.run_dir = run_dir  # only for a tool that runs in place (Sandbox.in_place)
        self.overlay = overlay
        self.cache = cache  # None: a private empty cache
        self.cwd = cwd  # relative to the exec dir (REAPI working_directory)
        self.masks = masks
        self.stdout = stdout  # a descriptor of the caller's (a file) for the tool's stdout; -1: the output pipe
        self.stderr = stderr  # likewise for stderr; -1: wherever stdout goes


class SandboxProcess:
    """A started tool: its output pipe, the descriptor of its exec view, and its exit status once reaped."""

    def __init__(self, status: socket.socket, output_fd: int, view_fd: int, kill: Callable[[], None]) -> None:
        self.status = status
        self.output_fd = output_fd
        self.view_fd = view_fd
        self._kill = kill

    def kill(self) -> None:
        """End the tool and everything it started (its pid namespace)."""
        self._kill()

    def wait(self) -> int:
        """The exit status (128+N for signal N), after the helper reaped the tool's namespace."""
        try:
            message = self.status.recv(4096)
        finally:
            self.status.close()
        if not message:
            raise ExecutionError("the sandbox helper died while the tool ran")
        reply = marshal.loads(message)
        if "exit" not in reply:
            raise ExecutionError(f"the tool's sandbox failed: {reply.get('error', reply)}")
        return int(reply["exit"])


class Sandbox:
    """The sandbox helper of this process; `run` is safe from several threads."""

    def __init__(
        self,
        mode: str,
        helper: subprocess.Popen[bytes] | None,
        control: socket.socket | None,
        masks: Sequence[str],
        *,
        reason: str = "",
    ) -> None:
        self.mode = mode
        self.reason = reason
        self.masks = tuple(masks)
        self._helper = helper
        self._control = control
        self._lock = threading.Lock()
        self._next_id = 0

    @property
    def overlay(self) -> bool:
        """True where inputs may be hardlinks to CAS blobs (a write copies up into the run's upper dir)."""
        return self.mode == ISOLATION_OVERLAY

    @property
    def in_place(self) -> bool:
        """True where the tool sees its exec dir at its real path (no mount namespace: none, macOS)."""
        return self.mode in (ISOLATION_NONE, ISOLATION_DARWIN)

    def command(self, plan: ToolPlan) -> list[str]:
        """An in-place tool's command line: under `sandbox-exec` on macOS (its profile written into the run dir)."""
        if self.mode != ISOLATION_DARWIN:
            return list(plan.argv)
        if plan.run_dir is None:
            raise ExecutionError("a tool that runs in place needs a run dir (a wiring bug)")
        path = plan.run_dir.path / "sandbox.sb"
        writable = [str(plan.exec_dir), str(plan.run_dir.tmp), str(plan.run_dir.cache)]
        path.write_text(sandbox_darwin.profile(writable, self.masks))
        return sandbox_darwin.wrap(str(path), plan.argv)

    def start(self, plan: ToolPlan) -> SandboxProcess:
        """Start the tool in fresh namespaces; ExecutionError (one line) if the sandbox cannot be set up."""
        if self._control is None:
            raise ExecutionError(self.reason or "the sandbox is not running")
        cache_mode, cache_dir = self._cache_mount(plan)
        dirs = self._directories(plan, cache_dir)
        status_here, status_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        read_end, write_end = os.pipe()
        try:
            with self._lock:
                self._next_id += 1
                request_id = self._next_id
                request = {
                    "op": "run",
                    "id": request_id,
                    "argv": plan.argv,
                    "env": plan.env,
                    "cwd": plan.cwd,
                    "exec": "overlay" if plan.overlay else "bind",
                    "cache": cache_mode,
                    "mask": list(plan.masks or self.masks),
                    "dirs": dirs,
                    "fds": ["status", "stdout", "stderr"] if plan.stderr >= 0 else ["status", "stdout"],
                }
                fds = [status_there.fileno(), plan.stdout if plan.stdout >= 0 else write_end]
                if plan.stderr >= 0:
                    fds.append(plan.stderr)
                socket.send_fds(self._control, [marshal.dumps(request)], fds)
        except OSError as exc:
            os.close(read_end)
            status_here.close()
            raise ExecutionError(f"the sandbox helper is gone ({exc.strerror or exc})") from None
        finally:
            os.close(write_end)
            status_there.close()
        try:
            message, received, _flags, _addr = socket.recv_fds(status_here, 65536, 1)
        except OSError as exc:
            message, received = marshal.dumps({"error": str(exc)}), []
        reply = marshal.loads(message) if message else {"error": "the sandbox helper died"}
        if "error" in reply or not received:
            for fd in received:
                os.close(fd)
            os.close(read_end)
            with contextlib.suppress(OSError):
                status_here.recv(4096)  # the helper's exit report of the failed setup
            status_here.close()
            raise ExecutionError(f"cannot set up the tool's sandbox: {reply.get('error', 'no view')}")
        return SandboxProcess(status_here, read_end, received[0], lambda: self._kill(request_id))

    def _cache_mount(self, plan: ToolPlan) -> tuple[str, Path | None]:
        """How TOOL_CACHE is mounted: a seed under a private overlay, a seed being built, or private and empty."""
        if plan.cache is None:
            return "private", None
        if plan.cache.writable:
            return "bind", plan.cache.seed
        if self.overlay:
            return "overlay", plan.cache.seed
        return "private", None  # no overlayfs: the seed cannot be seen privately; start empty

    def _directories(self, plan: ToolPlan, cache_dir: Path | None) -> dict[str, tuple[str, int, int]]:
        """{name: (path, device, inode)} of the directories the tool's view is made of (checked again there)."""
        wanted = [("lower", plan.exec_dir)] + ([("cache_lower", cache_dir)] if cache_dir is not None else [])
        dirs: dict[str, tuple[str, int, int]] = {}
        for name, path in wanted:
            try:
                info = os.lstat(path)
            except OSError as exc:
                raise ExecutionError(f"cannot use {path} for the sandbox: {exc.strerror}") from None
            dirs[name] = (str(path), info.st_dev, info.st_ino)
        return dirs

    def _kill(self, request_id: int) -> None:
        if self._control is None:
            return
        with self._lock, contextlib.suppress(OSError):
            self._control.send(marshal.dumps({"op": "kill", "id": request_id}))

    def close(self) -> None:
        """Stop the helper (it kills any tool still running)."""
        control, self._control = self._control, None
        if control is not None:
            control.close()
        if self._helper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._helper.wait(5)
            if self._helper.poll() is None:
                self._helper.kill()
                self._helper.wait()


@contextlib.contextmanager
def probe_run(sandbox: Sandbox, scratch: Path, *, overlay: bool) -> Iterator[tuple[int, bytes, bool]]:
    """One real run of the whole path on a scratch tree: (exit, output, input untouched)."""
    exec_dir = scratch / "exec"
    exec_dir.mkdir()
    (exec_dir / "input").write_bytes(b"pristine\n")
    os.chmod(exec_dir / "input", 0o444)
    script = "chmod u+w input 2>/dev/null; echo changed > input && echo out > output && cat input"
    plan = ToolPlan(["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, exec_dir, None, overlay)
    process = sandbox.start(plan)
    try:
        output = b""
        while chunk := os.read(process.output_fd, 65536):
            output += chunk
        code = process.wait()
        pristine = (exec_dir / "input").read_bytes() == b"pristine\n" if overlay else True
        yield code, output, pristine
    finally:
        os.close(process.output_fd)
        os.close(process.view_fd)


def refusing_sandbox(reason: str) -> Sandbox:
    """The sandbox of a machine where none works: every tool start fails with `reason` (the worker keeps serving)."""
    return Sandbox(
        ISOLATION_UNAVAILABLE,
        None,
        None,
        (),
        reason=f"no tool runs unsandboxed: {reason} (`--isolation=none` runs tools without a sandbox, at your risk)",
    )


_early: dict[tuple[str, str], tuple[threading.Thread, list[Sandbox | BaseException]]] = {}


def open_early(root: Path, want: str) -> None:
    """Open the sandbox for (root, want) in a thread, now (a worker's first step: the helper boots and the probe
    runs while the worker imports); open_sandbox(Root(root), want) takes it. Call prestart_helper first, from the
    thread that outlives the helper (its parent-death signal follows the thread that started it)."""
    outcome: list[Sandbox | BaseException] = []

    def run() -> None:
        try:  # Root checks the root first: never a probe in a root the stack would refuse (it checks it again)
            outcome.append(_open_sandbox(Root(root), want))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="treemat-sandbox-open", daemon=True)
    thread.start()
    _early[(str(root), want)] = (thread, outcome)


def open_sandbox(layout: Root, want: str = "auto") -> Sandbox:
    """The sandbox for `want` in auto | overlay | copy-on-write | none, tried for real; SandboxUnavailable if not.

    `auto` takes overlay where overlayfs works in a user namespace, else copy-on-write.
    """
    early = _early.pop((str(layout.path), want), None)
    if early is not None:
        early[0].join()
        outcome = early[1][0] if early[1] else None
        if isinstance(outcome, SandboxUnavailable):
            raise outcome
        if isinstance(outcome, Sandbox):
            return outcome
    return _open_sandbox(layout, want)


def _open_sandbox(layout: Root, want: str) -> Sandbox:
    if want == ISOLATION_NONE:
        return Sandbox(ISOLATION_NONE, None, None, ())
    if sys.platform == "darwin":
        if not os.access(sandbox_darwin.SANDBOX_EXEC, os.X_OK):
            raise SandboxUnavailable(f"{sandbox_darwin.SANDBOX_EXEC} is missing")
        hidden = [str(path) for path in layout.hidden]
        return Sandbox(ISOLATION_DARWIN, None, None, hidden)
    if sys.platform != "linux":
        raise SandboxUnavailable(f"no sandbox for {sys.platform} in this process (see docs/hermeticity.md)")
    helper, control = start_helper()
    sandbox = Sandbox(ISOLATION_COW, helper, control, hidden_paths(layout.path))
    scratch = layout.tmp / f".sandbox-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        scratch.mkdir(parents=True)
        modes = [True, False] if want in ("auto", ISOLATION_OVERLAY) else [False]
        failure = ""
        for overlay in modes:
            sub = scratch / ("overlay" if overlay else "bind")
            sub.mkdir()
            try:
                with probe_run(sandbox, sub, overlay=overlay) as (code, output, pristine):
                    if code == 0 and pristine and output == b"changed\n":
                        sandbox.mode = ISOLATION_OVERLAY if overlay else ISOLATION_COW
                        break
                    failure = f"the probe tool exited {code}: {output.decode(errors='replace').strip()[-200:]}"
            except ExecutionError as exc:
                failure = str(exc)
            if overlay and want == ISOLATION_OVERLAY:
                raise SandboxUnavailable(f"overlay isolation was asked for but does not work here: {failure}")
        else:
            raise SandboxUnavailable(f"the sandbox does not work here: {failure}")
    except BaseException:
        sandbox.close()
        raise
    finally:
        remove_tree(scratch)
    return sandbox


def environment(
    base: Mapping[str, str], extra: Mapping[str, str], *, exec_root: str = EXEC_ROOT, tmp: str = "/tmp"
) -> dict[str, str]:
    """The tool's environment: `base` + `extra`, with PWD and TMPDIR of its view."""
    env = dict(base)
    env.update(extra)
    env["PWD"] = exec_root
    env["TMPDIR"] = tmp
    return env
