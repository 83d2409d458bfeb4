"""One action end to end: inputs into the CAS, stage a private exec dir, run the tool, move outputs back.

Bazel's digests are trusted for lookups (hashing happens when a blob is ingested, verified against Bazel's
digest, and once per process per blob in the guard). Every blob is admitted by the guard right before it is
staged. Hardlinked inputs are only ever handed to a tool inside the overlay sandbox, so the tool cannot write
the CAS inode; a write from anywhere else is caught by the guard, and every action that had that blob staged
fails instead of reporting success.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from treemat.backends import remove_tree
from treemat.blobguard import BlobGuard, BlobIdentity
from treemat.budget import StoreBudget
from treemat.cas import ContentStore, file_kind, pid_alive
from treemat.counters import Counters
from treemat.digest import Digest, check_hash
from treemat.dircache import DirectoryCache, StageReport
from treemat.errors import ExecutionError, MissingBlobError, TreematError
from treemat.execpool import DEFAULT_POOL_SIZE, NO_BLOB, ExecDirPool, PooledDir, StagedFile, directories_for
from treemat.flagfile import ActionSpec
from treemat.sandbox import OverlayPlan, OverlaySandbox, upper_dir, work_dir
from treemat.tree import FileNode, InputTree, check_symlinks, normalize_path

KILL_GRACE_SECONDS = 0.5  # after the tool exits, its process group gets this long before SIGKILL
MAX_OUTPUT_BYTES = 16 << 20  # tool stdout+stderr kept for Bazel; the rest is counted, not stored
_SYMLINK_HOPS = 40


@dataclass(frozen=True, slots=True)
class RequestInput:
    """One input as Bazel lists it: execroot-relative path and (usually) its sha256 hex."""

    path: str
    hash: str | None = None


@dataclass(slots=True)
class ActionRequest:
    """Everything needed to run one action."""

    spec: ActionSpec
    inputs: list[RequestInput]
    execroot: Path
    request_id: int = 0


@dataclass(slots=True)
class ActionResult:
    """Exit status and combined output to hand back to Bazel, plus what staging did."""

    exit_code: int
    output: str
    stage: StageReport | None = None
    stage_seconds: float = 0.0
    tool_seconds: float = 0.0
    cancelled: bool = False
    quarantined: list[str] = field(default_factory=list)

    def summary(self, tool: str, inputs: int) -> dict[str, object]:
        """A small JSON-able record for `treemat stats`."""
        record: dict[str, object] = {
            "tool": os.path.basename(tool),
            "inputs": inputs,
            "exit_code": self.exit_code,
            "stage_ms": round(self.stage_seconds * 1000, 2),
            "tool_ms": round(self.tool_seconds * 1000, 2),
        }
        if self.stage is not None:
            record.update(methods=dict(self.stage.methods), subtree_hits=self.stage.subtree_hits)
        if self.quarantined:
            record["quarantined"] = len(self.quarantined)
        return record


class _Trash:
    """Deletes finished exec dirs (and writes LRU atimes) on a background thread, off the response path."""

    def __init__(self, cas: ContentStore, budget: StoreBudget | None) -> None:
        self.cas = cas
        self.budget = budget
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="treemat-trash", daemon=True)
        self._thread.start()

    def put(self, path: Path | None) -> None:
        """Queue a tree for removal (None: only flush the CAS's pending atime updates)."""
        self._queue.put(path)

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            with contextlib.suppress(OSError):
                if path is not None:
                    remove_tree(path)
                self.cas.flush_touches()
            with contextlib.suppress(TreematError, OSError):
                if path is None and self.budget is not None:
                    self.budget.maybe_collect()


class ActionExecutor:
    """Runs actions in private exec dirs under `<root>/exec`; safe to call from several threads."""

    def __init__(
        self,
        root: Path,
        cas: ContentStore,
        dircache: DirectoryCache,
        *,
        guard: BlobGuard | None = None,
        sandbox: OverlaySandbox | None = None,
        budget: StoreBudget | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        counters: Counters | None = None,
        keep_exec_dirs: bool = False,
        background_cleanup: bool = True,
    ) -> None:
        self.root = Path(root)
        self.cas = cas
        self.dircache = dircache
        self.guard = guard if guard is not None else BlobGuard(cas, counters=counters)
        self.sandbox = sandbox
        # exec-dir reuse needs the overlay: there the staged tree is untouched by the tool
        self.pool = ExecDirPool(cas, self.guard, size=pool_size) if sandbox is not None and pool_size > 0 else None
        self._normalized: dict[str, str] = {}
        self.counters = counters if counters is not None else cas.counters
        self.keep_exec_dirs = keep_exec_dirs
        self.exec_base = self.root / "exec"
        self.exec_base.mkdir(parents=True, exist_ok=True)
        self.tool_cache = self.root / "tool-cache"  # tools' own caches (swiftc module cache), kept across actions
        self.recent: collections.deque[dict[str, object]] = collections.deque(maxlen=20)
        self._meta: dict[tuple[str, str], tuple[Digest, bool]] = {}
        self._known: dict[tuple[str, bool], int] = {}  # (hash, executable) -> size, known to be in the CAS
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen[bytes]] = {}
        self._cancelled: set[int] = set()
        self.budget = budget
        self._trash = _Trash(cas, budget) if background_cleanup else None
        self._sweep_stale_exec_dirs()

    # ----------------------------------------------------------------------------- public

    def execute(self, request: ActionRequest) -> ActionResult:
        """Run one action; errors a user can cause come back as a failed ActionResult, never an exception."""
        started = time.perf_counter()
        exec_dir = self.exec_base / f"{os.getpid()}-{request.request_id}-{secrets.token_hex(4)}"
        result: ActionResult
        pooled: PooledDir | None = None
        try:
            self.guard.poll()
            generation = self.guard.taint_generation
            with self.cas.in_use():
                pooled, stage = self._stage_reused(request)
                if pooled is not None:
                    exec_dir = pooled.path
                    staged: dict[BlobIdentity, str] | None = None
                else:
                    staged, stage = self._stage_fresh(request, exec_dir)
            stage_seconds = time.perf_counter() - started
            self._prepare_outputs(request.spec, exec_dir)
            plan = self._isolation_plan(stage, exec_dir)
            if pooled is None and plan is not None and self.pool is not None and staged is not None:
                pooled = self._pooled_from_fresh(request, exec_dir, stage, staged)
            result = self._run_tool(request, exec_dir, plan)
            result.stage, result.stage_seconds = stage, stage_seconds
            self._check_integrity(staged, pooled, generation, result)
            if result.exit_code == 0 and not result.cancelled:
                self._collect_outputs(request, exec_dir, result)
        except TreematError as exc:
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc}\n")
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc.strerror or exc}{where}\n")
        finally:
            self._finish(exec_dir, pooled)
        self.counters.add("actions")
        if result.exit_code != 0:
            self.counters.add("action_failures")
        self.recent.append(result.summary(request.spec.argv[0] if request.spec.argv else "?", len(request.inputs)))
        return result

    def close(self) -> None:
        """Remove the pooled exec dirs (they pin their blobs against gc while kept)."""
        if self.pool is not None:
            for entry in self.pool.drain():
                self.pool.forget(entry)
                remove_tree(entry.path)

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

    # ----------------------------------------------------------------------------- inputs

    def _stage_fresh(self, request: ActionRequest, exec_dir: Path) -> tuple[dict[BlobIdentity, str], StageReport]:
        """Build the tree and stage it into a new exec dir (retrying once if our in-memory view was stale)."""
        try:
            tree, staged = self.build_tree(request)
            return staged, self.dircache.stage(tree, exec_dir)
        except MissingBlobError:
            # a blob was GC'd or quarantined elsewhere: forget what we knew, retry once
            with self._lock:
                self._known.clear()
                self._meta.clear()
            remove_tree(exec_dir)
            tree, staged = self.build_tree(request)
            return staged, self.dircache.stage(tree, exec_dir)

    def _stage_reused(self, request: ActionRequest) -> tuple[PooledDir | None, StageReport]:
        """Patch the pooled exec dir of a similar earlier action into this one's inputs, if there is one."""
        empty = StageReport()
        if self.pool is None or not request.inputs:
            return None, empty
        listed = {item.path: item.hash for item in request.inputs}
        if None in listed.values() or "" in listed.values():
            return None, empty  # a directory input: its contents are not in the request, stage afresh
        current = cast("dict[str, str]", listed)
        entry = self.pool.acquire(_pool_key(request.spec))
        for discarded in self.pool.take_discarded():
            self._dispose_path(discarded)
        if entry is None:
            return None, empty
        started = time.perf_counter()
        previous = entry.request
        changed_raw = current.items() - previous.items()
        removed_raw = previous.keys() - current.keys()
        normalize = self._normalize
        try:
            if len(current) != len(request.inputs):
                raise ExecutionError("an input is listed twice")  # let fresh staging give the real answer
            changes: dict[str, tuple[str, bool]] = {}
            for raw, hash_text in changed_raw:
                path = normalize(raw)
                hash_hex = check_hash(hash_text)
                meta = self._meta.get((path, hash_hex))
                if meta is None:
                    info = _stat_input(request.execroot / path, path)
                    if not stat.S_ISREG(info.st_mode):
                        raise ExecutionError(f"input {path!r} is a {file_kind(info.st_mode)}: refused")
                    executable = bool(info.st_mode & 0o111)
                else:
                    executable = meta[1]
                changes[path] = (hash_hex, executable)

            def admit(path: str, hash_hex: str, executable: bool) -> BlobIdentity | None:
                found: dict[BlobIdentity, str] = {}
                digest = self._ensure_blob(request.execroot / path, hash_hex, executable, found, path)
                self._meta[(path, hash_hex)] = (digest, executable)
                return next(iter(found), None)

            removed = [normalize(raw) for raw in removed_raw]
            report = self.pool.patch(entry, changes, removed, _output_dirs(request.spec), admit)
            entry.request = current
        except (OSError, TreematError):
            self.counters.add("execpool_patch_failed")
            self._dispose_path(entry.path)
            return None, empty
        report.unchanged = len(current) - report.linked
        self.counters.add("execpool_reused")
        self.counters.add("hardlink", report.linked)
        stage = StageReport(files=len(current), methods={"reused": report.unchanged, "hardlink": report.linked})
        stage.hardlinked = [("reused", False)]  # CAS inodes are in the tree: the tool runs under the overlay
        stage.seconds = time.perf_counter() - started
        return entry, stage

    def _pooled_from_fresh(
        self, request: ActionRequest, exec_dir: Path, stage: StageReport, staged: dict[BlobIdentity, str]
    ) -> PooledDir | None:
        """Describe a freshly staged exec dir for the pool (only plain hardlink trees of hashed inputs)."""
        if (
            self.pool is None
            or stage.subtree_hits
            or not request.inputs
            or any(not item.hash for item in request.inputs)
            or any(method not in ("hardlink", "zero_byte") for method in stage.methods)
        ):
            return None
        identity_of = {path: identity for identity, path in staged.items()}
        entry = PooledDir(path=exec_dir, key=_pool_key(request.spec))
        for item in request.inputs:
            path = self._normalize(item.path)
            meta = self._meta.get((path, check_hash(item.hash or "")))
            if meta is None:
                return None
            entry.files[path] = StagedFile(meta[0].hash, meta[1], identity_of.get(path, NO_BLOB))
        entry.pinned = set(_output_dirs(request.spec))
        for rel in directories_for(entry.files.keys(), entry.pinned):
            entry.dirs[rel] = (0, 0, 0)
        entry.count_children()
        entry.request = {item.path: item.hash for item in request.inputs if item.hash}
        self.pool.start(entry)
        return entry

    def _normalize(self, raw: str) -> str:
        """normalize_path, memoized (the same execroot paths come back in every request)."""
        path = self._normalized.get(raw)
        if path is None:
            path = normalize_path(raw)
            if len(self._normalized) > 1_000_000:
                self._normalized.clear()
            self._normalized[raw] = path
        return path

    def build_tree(self, request: ActionRequest) -> tuple[InputTree, dict[BlobIdentity, str]]:
        """Validate input paths, admit every blob (ingesting what the CAS lacks); the tree and its blob inodes."""
        tree = InputTree()
        staged: dict[BlobIdentity, str] = {}
        execroot = str(request.execroot)
        for item in request.inputs:
            path = self._normalize(item.path)
            expected = check_hash(item.hash) if item.hash else None
            meta = self._meta.get((path, expected)) if expected else None
            full = f"{execroot}/{path}"
            if meta is None:
                info = _stat_input(full, path)
                if stat.S_ISDIR(info.st_mode):
                    self._add_directory(tree, request.execroot, path, staged)
                    continue
                if not stat.S_ISREG(info.st_mode):
                    raise ExecutionError(f"input {path!r} is a {file_kind(info.st_mode)}: refused (not a regular file)")
                executable = bool(info.st_mode & 0o111)
                meta = (self._ensure_blob(full, expected, executable, staged, path), executable)
                if expected:
                    self._meta[(path, expected)] = meta
            else:
                self._ensure_blob(full, expected, meta[1], staged, path)
            tree.add_file(path, FileNode(meta[0], meta[1], source=full), normalized=True)
        check_symlinks(tree)
        return tree, staged

    def _add_directory(self, tree: InputTree, execroot: Path, path: str, staged: dict[BlobIdentity, str]) -> None:
        """A directory input (source directory / tree artifact): files, empty dirs and in-tree symlinks.

        Every entry has a defined answer: regular files are ingested (hashed), symlinks that stay inside the
        directory are kept as symlinks, and anything else (a symlink leaving it, a FIFO, socket or device) is
        refused with an error naming it. Nothing is silently dropped.
        """
        top = os.path.join(execroot, path)
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, execroot)
            if not filenames and not dirnames:
                tree.add_directory(rel_dir)
            for name in [*dirnames, *filenames]:
                full = os.path.join(dirpath, name)
                rel = f"{rel_dir}/{name}"
                info = os.lstat(full)
                if stat.S_ISDIR(info.st_mode):
                    continue  # walked into
                if stat.S_ISLNK(info.st_mode):
                    tree.add_symlink(rel, _inner_symlink_target(full, rel, path))
                elif stat.S_ISREG(info.st_mode):
                    executable = bool(info.st_mode & 0o111)
                    digest = self._ensure_blob(full, None, executable, staged, rel)
                    tree.add_file(rel, FileNode(digest, executable, source=full))
                else:
                    raise ExecutionError(
                        f"input {rel!r} (inside directory input {path!r}) is a {file_kind(info.st_mode)}: refused"
                    )

    def _ensure_blob(
        self, full: str | Path, expected: str | None, executable: bool, staged: dict[BlobIdentity, str], path: str
    ) -> Digest:
        """The blob's digest, admitted by the guard; ingests (and verifies) the execroot file if needed."""
        if expected is not None:
            key = (expected, executable)
            size = self._known.get(key)
            if size is None:
                found = self.cas.lookup(expected, executable)
                size = found.size if found is not None else None
            if size is not None:
                if size == 0:
                    return Digest(expected, 0)
                identity = self.guard.admit(expected, executable, size)
                if identity is not None:
                    self.cas.touch(expected, executable)  # LRU recency for `cas gc` (throttled to once an hour)
                    self._known[key] = size
                    staged.setdefault(identity, path)
                    return Digest(expected, size)
                self._known.pop(key, None)
        digest = self.cas.ingest_file(full, executable=executable, expected=expected)
        if digest.size:
            identity = self.guard.admit_ingested(digest.hash, executable, digest.size)
            if identity is None:
                raise ExecutionError(f"input {path!r}: its blob vanished or was rejected right after ingest")
            staged.setdefault(identity, path)
        self._known[(digest.hash, executable)] = digest.size
        return digest

    # ----------------------------------------------------------------------------- running

    def _prepare_outputs(self, spec: ActionSpec, exec_dir: Path) -> None:
        for output in spec.outputs:
            (exec_dir / normalize_path(output)).parent.mkdir(parents=True, exist_ok=True)
        for output_dir in spec.output_dirs:
            (exec_dir / normalize_path(output_dir)).mkdir(parents=True, exist_ok=True)

    def _isolation_plan(self, stage: StageReport, exec_dir: Path) -> OverlayPlan | None:
        """The overlay plan when any input is a hardlink (the CAS inode itself); None when all are copies/clones."""
        if not stage.hardlinked:
            self.counters.add("actions_isolation_cow")
            return None
        if self.sandbox is None:
            raise ExecutionError(
                f"{len(stage.hardlinked)} input(s) were hardlinked but no overlay sandbox is available: refusing to "
                "let the tool reach CAS inodes (this is a wiring bug: use treemat.stack.open_stack)"
            )
        self.tool_cache.mkdir(mode=0o700, exist_ok=True)
        self.counters.add("actions_isolation_overlay")
        return self.sandbox.plan(exec_dir, [self.tool_cache])

    def _run_tool(self, request: ActionRequest, exec_dir: Path, plan: OverlayPlan | None) -> ActionResult:
        spec = request.spec
        env = dict(os.environ)
        env.update(spec.env)
        env["PWD"] = str(exec_dir)
        argv = spec.argv_in(str(exec_dir), str(self.tool_cache))
        preexec = None
        if plan is not None and self.sandbox is not None:
            argv = self.sandbox.wrap(argv)
            preexec = self.sandbox.preexec(plan)
        started = time.perf_counter()
        with self._lock:
            if request.request_id and request.request_id in self._cancelled:
                self._cancelled.discard(request.request_id)
                return ActionResult(exit_code=1, output="treemat: cancelled before start\n", cancelled=True)
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=exec_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=preexec,  # namespaces and mounts are set up in the child
                )
            except subprocess.SubprocessError as exc:
                return ActionResult(exit_code=1, output=f"treemat: error: cannot set up the tool's sandbox: {exc}\n")
            except OSError as exc:
                code = 126 if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM) else 127
                return ActionResult(exit_code=code, output=f"treemat: error: cannot run {argv[0]!r}: {exc.strerror}\n")
            if request.request_id:
                self._running[request.request_id] = proc
        try:
            output = _drain(proc)
        finally:
            with self._lock:
                self._running.pop(request.request_id, None)
                cancelled = request.request_id in self._cancelled
                self._cancelled.discard(request.request_id)
        return ActionResult(
            exit_code=_exit_status(proc.returncode),
            output=output,
            tool_seconds=time.perf_counter() - started,
            cancelled=cancelled,
        )

    # ----------------------------------------------------------------------------- outputs

    def _collect_outputs(self, request: ActionRequest, exec_dir: Path, result: ActionResult) -> None:
        view = _ExecView(exec_dir, upper_dir(exec_dir) if self.sandbox is not None else None)
        missing: list[str] = []
        for output in [*request.spec.outputs, *request.spec.output_dirs]:
            rel = normalize_path(output)
            src = view.find(rel)
            if src is None:
                missing.append(rel)
                continue
            if view.in_lower(src):
                # untouched by the tool (an empty output dir treemat prepared): the staged tree keeps it
                _copy_out_of_lower(src, request.execroot / rel, rel, view)
                continue
            _move_output(src, request.execroot / rel, rel, view)
        if missing:
            result.exit_code = 1
            result.output += f"treemat: error: the tool did not create declared output(s): {', '.join(missing)}\n"

    def _check_integrity(
        self, staged: dict[BlobIdentity, str] | None, pooled: PooledDir | None, generation: int, result: ActionResult
    ) -> None:
        """Fail the action if any blob it had staged was written to (from anywhere) while it ran."""
        hit = self.guard.poll()
        if hit:
            with self._lock:
                for key in hit:
                    self._known.pop(key, None)
                self._meta.clear()
        if self.guard.taint_generation == generation:
            return  # nothing was tainted while the action ran (blobs tainted before were never staged)
        if staged is None:
            staged = {}
        if pooled is not None:
            staged.update((file.identity, path) for path, file in pooled.files.items())
        if not staged or not self.guard.tainted(set(staged)):
            return
        names = sorted(path for identity, path in staged.items() if self.guard.tainted({identity}))
        result.quarantined.extend(names)
        result.exit_code = result.exit_code or 1
        result.output += (
            f"treemat: error: input(s) {', '.join(repr(name) for name in names[:5])} were modified in the CAS while "
            "the action ran; the blobs were quarantined and the action failed rather than return a result built "
            "from unknown bytes (rerun the build)\n"
        )

    def _finish(self, exec_dir: Path, pooled: PooledDir | None) -> None:
        """After an action: return a reusable exec dir to the pool (dropping the tool's writes), else remove it."""
        if self._trash is not None:
            self._trash.put(None)  # LRU atimes and the size budget, in the background
        else:
            self.cas.flush_touches()
            if self.budget is not None:
                self.budget.maybe_collect()
        if self.keep_exec_dirs:
            return
        for path in (upper_dir(exec_dir), work_dir(exec_dir)):
            self._dispose_path(path)
        if pooled is None or self.pool is None:
            self._dispose_path(exec_dir)
            return
        if pooled.dirty:  # changed behind our back during the action: not worth keeping
            self.pool.forget(pooled)
            self._dispose_path(exec_dir)
            return
        for evicted in self.pool.release(pooled):
            self.pool.forget(evicted)
            self._dispose_path(evicted.path)

    def _dispose_path(self, path: Path) -> None:
        """Remove a directory tree, in the background when a trash thread runs."""
        if not (path.exists() or path.is_symlink()):
            return
        if self._trash is None:
            remove_tree(path)
            return
        graveyard = self.exec_base / f".trash-{path.name}-{secrets.token_hex(3)}"
        try:
            os.rename(path, graveyard)
        except OSError:
            remove_tree(path)
            return
        self._trash.put(graveyard)

    def _sweep_stale_exec_dirs(self) -> None:
        """Remove exec dirs left by processes that no longer exist (killed workers)."""
        for entry in self.exec_base.iterdir():
            pid_text = entry.name.removeprefix(".trash-").split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
                with contextlib.suppress(OSError):
                    remove_tree(entry)


def _pool_key(spec: ActionSpec) -> str:
    """Actions with the same declared outputs (the same target, rebuilt) share a pooled exec dir."""
    return "\0".join([*spec.outputs, "\1", *spec.output_dirs])


def _output_dirs(spec: ActionSpec) -> list[str]:
    """Directories the exec dir holds for outputs: each output's parent and each declared output directory."""
    parents = [normalize_path(output).rpartition("/")[0] for output in spec.outputs]
    return [parent for parent in parents if parent] + [normalize_path(d) for d in spec.output_dirs]


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


def _stat_input(full: str | Path, path: str) -> os.stat_result:
    try:
        return os.stat(full)
    except FileNotFoundError:
        raise ExecutionError(f"input {path!r} does not exist in the execroot") from None
    except OSError as exc:
        raise ExecutionError(f"input {path!r}: {exc.strerror}") from None


def _inner_symlink_target(full: str, rel: str, top: str) -> str:
    """A symlink inside a directory input is kept only if it is relative and stays inside that directory."""
    target = os.readlink(full)
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    if os.path.isabs(target) or not (resolved == top or resolved.startswith(top.rstrip("/") + "/")):
        raise ExecutionError(
            f"input {rel!r} is a symlink to {target!r}, outside directory input {top!r}: refused "
            "(only relative symlinks that stay inside a directory input are staged)"
        )
    return target


class _ExecView:
    """The tool's view of its exec dir after it ran: the overlay's upper dir over the staged tree, if any."""

    def __init__(self, exec_dir: Path, upper: Path | None) -> None:
        self.exec_dir = exec_dir
        self.upper = upper if upper is not None and upper.is_dir() else None

    def find(self, rel: str) -> Path | None:
        """Where `rel` is now, or None if it does not exist (a whiteout counts as deleted)."""
        if self.upper is not None:
            candidate = self.upper / rel
            try:
                info = os.lstat(candidate)
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                return None
            else:
                return None if _is_whiteout(info) else candidate
        candidate = self.exec_dir / rel
        return candidate if os.path.lexists(candidate) else None

    def in_lower(self, path: Path) -> bool:
        """True if `path` is in the staged tree under an overlay (which must stay as staged)."""
        return self.upper is not None and not path.is_relative_to(self.upper)

    def check_relative(self, link_dir: str, target: str, what: str) -> None:
        """A relative symlink output is kept as is, but only if it stays inside the exec dir."""
        inside = os.path.normpath(os.path.join(link_dir, target))
        if inside == ".." or inside.startswith("../"):
            raise ExecutionError(f"output {what!r} is a symlink to {target!r}, outside the exec dir: refused")

    def resolve(self, rel: str, link_dir: str, target: str, what: str) -> Path:
        """Follow a symlink (chain) inside the exec dir to a regular file or directory; refuse anything else."""
        for _hop in range(_SYMLINK_HOPS):
            if os.path.isabs(target):
                inside = os.path.relpath(os.path.normpath(target), self.exec_dir)
            else:
                inside = os.path.normpath(os.path.join(link_dir, target))
            if inside == ".." or inside.startswith("../") or os.path.isabs(inside):
                raise ExecutionError(f"output {what!r} is a symlink to {target!r}, outside the exec dir: refused")
            found = self.find(inside) if inside != "." else self.exec_dir
            if found is None:
                raise ExecutionError(f"output {what!r} is a dangling symlink ({target!r})")
            info = os.lstat(found)
            if stat.S_ISLNK(info.st_mode):
                link_dir, target = os.path.dirname(inside), os.readlink(found)
                continue
            if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                return found
            raise ExecutionError(f"output {what!r} leads to a {file_kind(info.st_mode)}: refused")
        raise ExecutionError(f"output {what!r}: too many levels of symlinks")


def _is_whiteout(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


def _move_output(src: Path, dst: Path, rel: str, view: _ExecView) -> None:
    """Move one output to the execroot.

    Relative symlinks that stay inside the exec dir are kept; absolute ones into it are resolved to content;
    a symlink leaving the exec dir, or to a device, FIFO or socket, is refused, and so is such a file itself.
    Inside output directories the same rules apply to every entry.
    """
    info = os.lstat(src)
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(src)
        if not os.path.isabs(target):
            view.check_relative(os.path.dirname(rel), target, rel)
            _clear(dst)
            os.symlink(target, dst)
            return
        resolved = view.resolve(rel, os.path.dirname(rel), target, rel)
        _clear(dst)
        if resolved.is_dir():
            _copy_tree(resolved, dst, rel, view)
        else:
            _copy_file(resolved, dst)
        return
    if stat.S_ISDIR(info.st_mode):
        _check_output_tree(src, rel, view)
    elif not stat.S_ISREG(info.st_mode):
        raise ExecutionError(f"output {rel!r} is a {file_kind(info.st_mode)}: refused")
    _clear(dst)
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        # a tool hardlinked an input into its output: moving that link would hand Bazel the CAS blob's inode
        _copy_file(src, dst)
        return
    try:
        os.replace(src, dst)
    except OSError:
        if src.is_dir():
            _copy_tree(src, dst, rel, view)
        else:
            _copy_file(src, dst)


def _copy_out_of_lower(src: Path, dst: Path, rel: str, view: _ExecView) -> None:
    """An output found in the overlay's lower layer is copied out, never moved (the staged tree is reused)."""
    info = os.lstat(src)
    _clear(dst)
    if stat.S_ISDIR(info.st_mode):
        _copy_tree(src, dst, rel, view)
    elif stat.S_ISREG(info.st_mode):
        _copy_file(src, dst)
    else:
        raise ExecutionError(f"output {rel!r} is a {file_kind(info.st_mode)}: refused")


def _check_output_tree(top: Path, rel: str, view: _ExecView) -> None:
    """Inside an output directory: resolve absolute symlinks into the exec dir, refuse escapes and devices."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            inner = os.path.join(rel, os.path.relpath(full, top))
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(full)
                if not os.path.isabs(target):
                    view.check_relative(os.path.dirname(inner), target, inner)
                else:
                    resolved = view.resolve(inner, os.path.dirname(inner), target, inner)
                    os.unlink(full)
                    if resolved.is_dir():
                        _copy_tree(resolved, Path(full), inner, view)
                    else:
                        _copy_file(resolved, Path(full))
            elif _is_whiteout(info):
                os.unlink(full)
            elif not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise ExecutionError(f"output {inner!r} is a {file_kind(info.st_mode)}: refused")


def _clear(dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        shutil.rmtree(dst)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a regular file (checked through the open descriptor: never a device), mode 0o755/0o644."""
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ExecutionError(f"output {src.name!r} is a {file_kind(info.st_mode)}: refused")
        mode = 0o755 if info.st_mode & 0o111 else 0o644
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            offset, size = 0, info.st_size  # bounded by the size the file had when opened
            while offset < size:
                try:
                    copied = os.copy_file_range(fd, out, min(size - offset, 1 << 30), offset, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    os.lseek(out, offset, os.SEEK_SET)
                    copied = os.sendfile(out, fd, offset, min(size - offset, 1 << 30))  # across filesystems
                if copied == 0:
                    break
                offset += copied
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _copy_tree(src: Path, dst: Path, rel: str, view: _ExecView) -> None:
    shutil.copytree(src, dst, symlinks=True)
    _check_output_tree(dst, rel, view)
