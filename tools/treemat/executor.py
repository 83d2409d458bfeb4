"""One action end to end: inputs into the CAS, stage a private exec dir, run the tool, move outputs back.

Bazel's digests are trusted for lookups (hashing happens only when a blob is first ingested, and then the
content is verified against Bazel's digest). After the tool ran, every hardlinked input is re-checked by
its stat fingerprint, so a tool that chmods and writes through an input cannot poison later actions.
"""

from __future__ import annotations

import collections
import contextlib
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

from treemat.backends import remove_tree
from treemat.cas import ContentStore, pid_alive
from treemat.counters import Counters
from treemat.digest import Digest, check_hash
from treemat.dircache import DirectoryCache, StageReport
from treemat.errors import ExecutionError, MissingBlobError, TreematError
from treemat.flagfile import ActionSpec
from treemat.tree import FileNode, InputTree, check_symlinks, normalize_path


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
    """Deletes finished exec dirs on a background thread, off the response path."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="treemat-trash", daemon=True)
        self._thread.start()

    def put(self, path: Path) -> None:
        self._queue.put(path)

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            with contextlib.suppress(OSError):
                remove_tree(path)


class ActionExecutor:
    """Runs actions in private exec dirs under `<root>/exec`; safe to call from several threads."""

    def __init__(
        self,
        root: Path,
        cas: ContentStore,
        dircache: DirectoryCache,
        *,
        counters: Counters | None = None,
        keep_exec_dirs: bool = False,
        background_cleanup: bool = True,
    ) -> None:
        self.root = Path(root)
        self.cas = cas
        self.dircache = dircache
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
        self._trash = _Trash() if background_cleanup else None
        self._sweep_stale_exec_dirs()

    # ----------------------------------------------------------------------------- public

    def execute(self, request: ActionRequest) -> ActionResult:
        """Run one action; errors a user can cause come back as a failed ActionResult, never an exception."""
        started = time.perf_counter()
        exec_dir = self.exec_base / f"{os.getpid()}-{request.request_id}-{secrets.token_hex(4)}"
        result: ActionResult
        try:
            tree = self.build_tree(request)
            with self.cas.in_use():
                try:
                    stage = self.dircache.stage(tree, exec_dir)
                except MissingBlobError:
                    # our in-memory view was stale (blob GC'd or quarantined elsewhere): forget it, retry once
                    with self._lock:
                        self._known.clear()
                        self._meta.clear()
                    tree = self.build_tree(request)
                    stage = self.dircache.stage(tree, exec_dir)
            stage_seconds = time.perf_counter() - started
            self._prepare_outputs(request.spec, exec_dir)
            result = self._run_tool(request, exec_dir)
            result.stage, result.stage_seconds = stage, stage_seconds
            if result.exit_code == 0 and not result.cancelled:
                self._collect_outputs(request, exec_dir, result)
            self._check_integrity(stage, result)
        except TreematError as exc:
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc}\n")
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            result = ActionResult(exit_code=1, output=f"treemat: error: {exc.strerror or exc}{where}\n")
        finally:
            self._dispose(exec_dir)
        self.counters.add("actions")
        if result.exit_code != 0:
            self.counters.add("action_failures")
        self.recent.append(result.summary(request.spec.argv[0] if request.spec.argv else "?", len(request.inputs)))
        return result

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

    def build_tree(self, request: ActionRequest) -> InputTree:
        """Validate input paths, make sure every blob is in the CAS, and return the input tree."""
        tree = InputTree()
        for item in request.inputs:
            path = normalize_path(item.path)
            expected = check_hash(item.hash) if item.hash else None
            meta = self._meta.get((path, expected)) if expected else None
            full = request.execroot / path
            if meta is None:
                info = _stat_input(full, path)
                if stat.S_ISDIR(info.st_mode):
                    self._add_directory(tree, request.execroot, path)
                    continue
                executable = bool(info.st_mode & 0o111)
                digest = self._ensure_blob(full, expected, executable)
                meta = (digest, executable)
                if expected:
                    self._meta[(path, expected)] = meta
            tree.add_file(path, FileNode(meta[0], meta[1], source=full))
        check_symlinks(tree)
        return tree

    def _add_directory(self, tree: InputTree, execroot: Path, path: str) -> None:
        """A directory input (source directory / tree artifact): add its files, hashing them on ingest."""
        for dirpath, dirnames, filenames in os.walk(execroot / path):
            rel_dir = os.path.relpath(dirpath, execroot)
            if not filenames and not dirnames:
                tree.add_directory(rel_dir)
            for name in filenames:
                full = Path(dirpath) / name
                info = _stat_input(full, f"{rel_dir}/{name}")
                executable = bool(info.st_mode & 0o111)
                digest = self._ensure_blob(full, None, executable)
                tree.add_file(f"{rel_dir}/{name}", FileNode(digest, executable, source=full))

    def _ensure_blob(self, full: Path, expected: str | None, executable: bool) -> Digest:
        """The blob's digest, ingesting (and verifying) the execroot file if the CAS lacks it."""
        if expected is not None:
            size = self._known.get((expected, executable))
            if size is not None:
                self.cas.touch(expected, executable)  # LRU recency for `cas gc` (throttled to once an hour)
                return Digest(expected, size)
            found = self.cas.lookup(expected, executable)
            if found is not None:
                self.cas.touch(expected, executable)
                self._known[(expected, executable)] = found.size
                return found
        digest = self.cas.ingest_file(full, executable=executable, expected=expected)
        self._known[(digest.hash, executable)] = digest.size
        return digest

    # ----------------------------------------------------------------------------- running

    def _prepare_outputs(self, spec: ActionSpec, exec_dir: Path) -> None:
        for output in spec.outputs:
            (exec_dir / normalize_path(output)).parent.mkdir(parents=True, exist_ok=True)
        for output_dir in spec.output_dirs:
            (exec_dir / normalize_path(output_dir)).mkdir(parents=True, exist_ok=True)

    def _run_tool(self, request: ActionRequest, exec_dir: Path) -> ActionResult:
        spec = request.spec
        env = dict(os.environ)
        env.update(spec.env)
        env["PWD"] = str(exec_dir)
        argv = spec.argv_in(str(exec_dir), str(self.tool_cache))
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
                )
            except OSError as exc:
                return ActionResult(exit_code=127, output=f"treemat: error: cannot run {argv[0]!r}: {exc.strerror}\n")
            if request.request_id:
                self._running[request.request_id] = proc
        try:
            out, _ = proc.communicate()
        finally:
            with self._lock:
                self._running.pop(request.request_id, None)
                cancelled = request.request_id in self._cancelled
                self._cancelled.discard(request.request_id)
        return ActionResult(
            exit_code=proc.returncode,
            output=out.decode("utf-8", "replace"),
            tool_seconds=time.perf_counter() - started,
            cancelled=cancelled,
        )

    # ----------------------------------------------------------------------------- outputs

    def _collect_outputs(self, request: ActionRequest, exec_dir: Path, result: ActionResult) -> None:
        missing: list[str] = []
        for output in [*request.spec.outputs, *request.spec.output_dirs]:
            rel = normalize_path(output)
            src, dst = exec_dir / rel, request.execroot / rel
            if not src.exists() and not src.is_symlink():
                missing.append(rel)
                continue
            _move_output(src, dst, exec_dir)
        if missing:
            result.exit_code = 1
            result.output += f"treemat: error: the tool did not create declared output(s): {', '.join(missing)}\n"

    def _check_integrity(self, stage: StageReport, result: ActionResult) -> None:
        for hash_hex, executable in set(stage.hardlinked):
            if not self.cas.check_fingerprint(hash_hex, executable):
                self.cas.quarantine(hash_hex, executable, "modified through a hardlinked input by an action")
                with self._lock:
                    self._known.pop((hash_hex, executable), None)
                result.quarantined.append(hash_hex)
        if result.quarantined:
            result.output += (
                f"treemat: warning: the action modified {len(result.quarantined)} of its read-only inputs "
                "(chmod + write through a hardlink); the affected CAS blobs were quarantined\n"
            )

    def _dispose(self, exec_dir: Path) -> None:
        if self.keep_exec_dirs or not (exec_dir.exists() or exec_dir.is_symlink()):
            return
        if self._trash is None:
            remove_tree(exec_dir)
            return
        graveyard = self.exec_base / f".trash-{exec_dir.name}"
        try:
            os.rename(exec_dir, graveyard)
        except OSError:
            remove_tree(exec_dir)
            return
        self._trash.put(graveyard)

    def _sweep_stale_exec_dirs(self) -> None:
        """Remove exec dirs left by processes that no longer exist (killed workers)."""
        for entry in self.exec_base.iterdir():
            pid_text = entry.name.removeprefix(".trash-").split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
                with contextlib.suppress(OSError):
                    remove_tree(entry)


def _stat_input(full: Path, path: str) -> os.stat_result:
    try:
        return os.stat(full)
    except FileNotFoundError:
        raise ExecutionError(f"input {path!r} does not exist in the execroot") from None
    except OSError as exc:
        raise ExecutionError(f"input {path!r}: {exc.strerror}") from None


def _move_output(src: Path, dst: Path, exec_dir: Path) -> None:
    """Move one output to the execroot: absolute symlinks resolved to content, relative ones kept."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        shutil.rmtree(dst)
    if src.is_symlink():
        target = os.readlink(src)
        if not os.path.isabs(target):
            os.symlink(target, dst)
            return
        resolved = src.resolve()
        if resolved.is_dir():
            shutil.copytree(resolved, dst, symlinks=False)
        else:
            shutil.copyfile(resolved, dst)
            shutil.copymode(resolved, dst)
        return
    if src.is_file() and src.stat().st_nlink > 1:
        # a tool hardlinked an input into its output: moving that link would hand Bazel the CAS blob's inode
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o755 if src.stat().st_mode & 0o111 else 0o644)
        return
    try:
        os.replace(src, dst)
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst)
