"""The bot's one seam into treemat's core: the worker's stack (CAS, guard, staging, sandbox, executor) for a bot.

Everything the bot needs from the core goes through this module: blobs (is one here, store one, where does it
live), one action (`LocalStager.action`: stage an input tree into a private exec dir, run the command in the
worker's sandbox, walk its outputs by the worker's rules), and counters for `treemat stats`. Other bot modules
import no core module but this one (an import-linter contract in pyproject.toml holds them to it).

The bot runs commands exactly as the worker runs tools: `open_stack` picks the sandbox (overlay where it works:
inputs are then hardlinked from the CAS, a write copies up; copy-on-write otherwise), the command is one clone
into fresh namespaces (no process outlives it), and outputs are read from its view by descriptor
(treemat.outputs), never by a path it could have redirected.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from treemat.blobstate import BlobIdentity
from treemat.counters import StatsStore
from treemat.digest import EMPTY_DIGEST, Digest, digest_bytes
from treemat.errors import ExecutionError, TreematError
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.outputs import H, OutputSink, OutputView, find_output, walk_entry
from treemat.sandbox import EXEC_ROOT, RunDir, ToolPlan
from treemat.stack import DEFAULT_DIRCACHE_MIN_FILES, favour_syscall_threads, open_stack
from treemat.staging import StageReport
from treemat.toolrun import ToolOutcome
from treemat.tree import FileNode, InputTree, check_symlinks, normalize_path

__all__ = [
    "Digest",
    "ExecutionError",
    "FileNode",
    "InputTree",
    "LocalStager",
    "OutputSink",
    "StageReport",
    "StagedAction",
    "ToolRun",
    "TreematError",
    "check_symlinks",
    "digest_bytes",
    "normalize_path",
]

KILL_POLL_SECONDS = 0.05  # how often a running command's watcher looks at the lease's cancel event
_REQUEST_IDS_FROM = 1 << 40  # the bot's ids for the shared ToolRunner (Bazel's request ids are far below)


@dataclass(slots=True)
class ToolRun:
    """How the command ended, with its two streams (raw bytes; treemat's own messages appended to stderr)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    seconds: float
    cancelled: bool = False
    timed_out: bool = False


@dataclass(slots=True)
class StagedAction:
    """One action's staged exec dir: run its command once, then walk its outputs out of the command's view."""

    stager: LocalStager
    exec_dir: Path
    run_dir: RunDir
    report: StageReport
    stage_seconds: float
    identities: set[BlobIdentity]
    generation: int
    view: OutputView | None = None
    _ran: bool = field(default=False)

    def run(
        self, argv: list[str], env: dict[str, str], cwd: str, timeout: float | None, cancel: threading.Event
    ) -> ToolRun:
        """Run argv in the sandbox (cwd relative to the input root, exactly `env`); killed on `cancel` or timeout.

        Raises TreematError if an input blob was written to (from anywhere) while the command ran.
        """
        if self._ran:
            raise TreematError("an action's command runs once")
        self._ran = True
        stager = self.stager
        self.run_dir.create()
        out_path, err_path = self.run_dir.path / "stdout", self.run_dir.path / "stderr"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out_fd = os.open(out_path, flags, 0o600)
        try:
            err_fd = os.open(err_path, flags, 0o600)
            try:
                plan = ToolPlan(
                    argv,
                    env,
                    self.exec_dir,
                    self.run_dir,
                    stager.sandbox.overlay,
                    cwd=cwd,
                    stdout=out_fd,
                    stderr=err_fd,
                )
                outcome, fired = stager.run_watched(plan, timeout, cancel)
                stdout, stderr = _read_all(out_fd), _read_all(err_fd)
            finally:
                os.close(err_fd)
        finally:
            os.close(out_fd)
        if outcome.view_fd >= 0:
            sandboxed = stager.sandbox.mode != "none"
            prefixes = [EXEC_ROOT, str(self.exec_dir)] if sandboxed else [str(self.exec_dir)]
            self.view = OutputView(outcome.view_fd, prefixes)
        stager.check_inputs(self.identities, self.generation)
        cancelled = outcome.cancelled and fired == "cancelled"
        timed_out = outcome.cancelled and fired == "timeout"
        return ToolRun(
            outcome.exit_code, stdout, stderr + outcome.output.encode(), outcome.seconds, cancelled, timed_out
        )

    def walk_output(self, path: str, sink: OutputSink[H], into: H, name: str) -> bool:
        """Deliver the output at `path` (relative to the input root) to `sink` by the worker's rules; False if the
        command did not create it. ExecutionError (one line, as the worker's) for an entry that is refused."""
        if self.view is None:
            return False
        rel = normalize_path(path)
        found = find_output(self.view, rel)
        if found is None:
            return False
        parent, entry, info = found
        try:
            walk_entry(self.view, parent, entry, info, sink, into, name, rel)
        finally:
            os.close(parent)
        return True

    def close(self) -> None:
        if self.view is not None:
            os.close(self.view.fd)
            self.view = None


class LocalStager:
    """treemat's stack under one root (the worker's: CAS, guard, staging, sandbox, executor), wired for a bot."""

    def __init__(
        self, root: Path, *, concurrency: int | None = None, dircache: bool = True, isolation: str = "auto"
    ) -> None:
        favour_syscall_threads()  # the bot's process serves its leases' commands concurrently
        stack = open_stack(
            Root(root),
            isolation=isolation,
            concurrency=concurrency,
            dircache_min_files=DEFAULT_DIRCACHE_MIN_FILES if dircache else None,
        )
        self.stack = stack
        self.root = stack.root
        self.counters = stack.counters
        self.cas = stack.cas
        self.guard = stack.guard
        self.dircache = stack.dircache
        self.sandbox = stack.sandbox
        self.runner = stack.runner
        self.housekeeper = stack.housekeeper
        self.exec_base = stack.layout.exec
        self._stats = StatsStore(stack.layout.stats)
        self._stats_lock = threading.Lock()
        self._request_ids = itertools.count(_REQUEST_IDS_FROM)
        self._ids_lock = threading.Lock()

    def close(self) -> None:
        """Stop the sandbox helper, flush the ledger."""
        self.stack.close()

    # --------------------------------------------------------------------------- blobs

    def has_blob(self, digest: Digest, executable: bool) -> bool:
        """True if the blob is in the local CAS with that exec bit, admitted by the guard as for the worker.

        (lstat identity, size and mode; hashed once per process unless the verified ledger vouches for it;
        watched for writes.) A blob that fails is quarantined, so it is fetched again from the server.
        """
        return digest.is_empty or self.guard.admit(digest.hash, executable, digest.size) is not None

    def blob_path(self, digest: Digest, executable: bool) -> Path:
        """Where the local blob lives (check `has_blob` first)."""
        return self.cas.blob_path(digest.hash, executable)

    def put_bytes(self, data: bytes, *, executable: bool) -> Digest:
        """Store an in-memory blob; returns its digest."""
        return self.cas.ingest_bytes(data, executable=executable)

    def put_file(self, path: Path, *, executable: bool, expected: Digest | None = None) -> Digest:
        """Copy a file into the CAS (verified against `expected` when given); returns its digest."""
        return self.cas.ingest_file(path, executable=executable, expected=expected)

    def put_fd(self, fd: int, *, executable: bool, what: str) -> Digest:
        """Copy the regular file open at `fd` into the CAS; returns its digest."""
        return self.cas.ingest_fd(fd, executable=executable, what=what)

    def discard_blob(self, digest: Digest, path: Path, reason: str) -> None:
        """Quarantine the local blob at `path` (found not to hold `digest`'s bytes): the next ingest replaces it."""
        executable = path == self.cas.blob_path(digest.hash, True)
        self.cas.quarantine(digest.hash, executable, reason)

    def read_blob(self, digest: Digest) -> bytes | None:
        """A small blob's bytes, either exec bit, or None if absent."""
        if digest.is_empty:
            return b""
        for executable in (False, True):
            if self.has_blob(digest, executable):
                with contextlib.suppress(FileNotFoundError):
                    return self.cas.blob_path(digest.hash, executable).read_bytes()
        return None

    def temp_dir(self) -> Path:
        """The CAS's temp directory (same filesystem as the blobs)."""
        return self.cas.tmp_dir

    # --------------------------------------------------------------------------- one action

    def begin(self) -> None:
        """Before an action: take in every write event, so a blob written since it was verified is not trusted."""
        self.guard.poll()

    @contextlib.contextmanager
    def action(self, tree: InputTree, tag: str, *, workdirs: list[str]) -> Iterator[StagedAction]:
        """Stage `tree` into a fresh private exec dir (with the directories `workdirs` made), removed afterwards.

        Inputs are placed by the stack's methods (hardlinks only under the overlay sandbox). A blob written while
        it was staged, or while the command ran, fails the action (the blob is quarantined: fetched again).
        """
        exec_dir = self.exec_base / f"{os.getpid()}-{tag}-{secrets.token_hex(4)}"
        run_dir = RunDir(self.exec_base / f"{exec_dir.name}.run")
        generation = self.guard.taint_generation
        identities: set[BlobIdentity] = set()
        for _path, node in tree.iter_files():
            if node.digest.is_empty:
                continue
            identity = self.guard.admit(node.digest.hash, node.executable, node.digest.size)
            if identity is None:
                raise TreematError(f"input blob {node.digest} left the local CAS before it was staged (retry)")
            identities.add(identity)
        report = StageReport()
        staged: StagedAction | None = None
        try:
            started = time.perf_counter()
            report = self._stage(tree, exec_dir)
            seconds = time.perf_counter() - started
            if report.hardlinked and not self.sandbox.overlay:
                raise ExecutionError("inputs were hardlinked but the sandbox has no overlay: refused (a wiring bug)")
            self.check_inputs(identities, generation)
            for rel in workdirs:
                (exec_dir / normalize_path(rel) if rel else exec_dir).mkdir(parents=True, exist_ok=True)
            self.counters.add(f"actions_isolation_{self.sandbox.mode}")
            staged = StagedAction(self, exec_dir, run_dir, report, seconds, identities, generation)
            yield staged
        finally:
            if staged is not None:
                staged.close()
            self.housekeeper.dispose(run_dir.path)
            self.housekeeper.dispose(exec_dir, report.hardlinked)

    def _stage(self, tree: InputTree, exec_dir: Path) -> StageReport:
        """Stage `tree` into `exec_dir`; once more if a user deleted part of the root under us."""
        try:
            with self.cas.in_use():
                return self.dircache.stage(tree, exec_dir)
        except (TreematError, OSError):
            if not self.stack.layout.repair():
                raise
        remove_tree(exec_dir)
        with self.cas.in_use():
            return self.dircache.stage(tree, exec_dir)

    def check_inputs(self, identities: set[BlobIdentity], generation: int) -> None:
        """TreematError if any of these blobs was written to since `generation` (they are quarantined)."""
        self.guard.poll()
        if self.guard.taint_generation != generation and self.guard.tainted(identities):
            raise TreematError("an input blob was written to while the action used it; it was quarantined (retry)")

    def run_watched(self, plan: ToolPlan, timeout: float | None, cancel: threading.Event) -> tuple[ToolOutcome, str]:
        """Run `plan` on the stack's ToolRunner; a watcher kills it on `cancel` or after `timeout` seconds.

        Returns the outcome and what fired ("cancelled", "timeout" or "").
        """
        runner = self.runner
        with self._ids_lock:
            request_id = next(self._request_ids)
        done = threading.Event()
        fired: list[str] = []
        deadline = time.monotonic() + timeout if timeout else None

        def watch() -> None:
            while not done.is_set():
                left = KILL_POLL_SECONDS if deadline is None else deadline - time.monotonic()
                if cancel.wait(max(0.0, min(left, KILL_POLL_SECONDS))):
                    fired.append("cancelled")
                elif deadline is not None and time.monotonic() >= deadline:
                    fired.append("timeout")
                else:
                    continue
                runner.cancel(request_id)
                return

        watcher = threading.Thread(target=watch, name=f"treemat-watch-{request_id}", daemon=True)
        watcher.start()
        try:
            outcome = runner.run(request_id, plan)
        finally:
            done.set()
            watcher.join()
        return outcome, fired[0] if fired else ""

    # --------------------------------------------------------------------------- stats

    def publish_stats(self, *, role: str, extra: Mapping[str, object] | None = None) -> None:
        """Write this process's counters where `treemat stats` sums them."""
        with self._stats_lock, contextlib.suppress(OSError):
            self._stats.publish(self.counters, role=role, extra={**self.stack.describe(), **(extra or {})})


def _read_all(fd: int) -> bytes:
    """A whole output file, from its start."""
    chunks: list[bytes] = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


EMPTY = EMPTY_DIGEST
