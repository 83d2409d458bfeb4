"""An action's inputs into an exec dir: admitted blobs, staged afresh or patched into a reused exec dir.

Bazel's digests are trusted for lookups; every blob is admitted by the guard right before it is staged (and
ingested, verified against Bazel's digest, when the CAS lacks it). A directory input is walked: regular files
are ingested, in-tree relative symlinks kept, anything else refused by name. Under overlay isolation a finished
exec dir with the same outputs is reused: only the delta between the two requests is linked and unlinked.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from treemat.action import ActionRequest
from treemat.blobguard import BlobGuard, BlobIdentity
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import Digest, check_hash
from treemat.dircache import DirectoryCache
from treemat.errors import ExecutionError, MissingBlobError, TreematError
from treemat.execpool import NO_BLOB, ExecDirPool, PooledDir, StagedFile, directories_for
from treemat.flagfile import ActionSpec
from treemat.fsprims import file_kind, remove_tree
from treemat.staging import StageReport
from treemat.tree import FileNode, InputTree, check_symlinks, normalize_path


class InputStager:
    """Stages request inputs; keeps what it learnt (blob sizes, exec bits, normalized paths) across requests."""

    def __init__(
        self,
        cas: ContentStore,
        guard: BlobGuard,
        dircache: DirectoryCache,
        pool: ExecDirPool | None,
        *,
        counters: Counters,
        dispose: Callable[[Path], None],
    ) -> None:
        self.cas = cas
        self.guard = guard
        self.dircache = dircache
        self.pool = pool
        self.counters = counters
        self._dispose = dispose
        self._lock = threading.Lock()
        self._normalized: dict[str, str] = {}
        self._meta: dict[tuple[str, str], tuple[Digest, bool]] = {}
        self._known: dict[tuple[str, bool], int] = {}  # (hash, executable) -> size, known to be in the CAS

    def forget(self, blobs: list[tuple[str, bool]]) -> None:
        """Blobs that were just rejected: drop what we knew about them (and every cached path meta)."""
        with self._lock:
            for key in blobs:
                self._known.pop(key, None)
            self._meta.clear()

    def stage_fresh(self, request: ActionRequest, exec_dir: Path) -> tuple[dict[BlobIdentity, str], StageReport]:
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

    def stage_reused(self, request: ActionRequest) -> tuple[PooledDir | None, StageReport]:
        """Patch the pooled exec dir of a similar earlier action into this one's inputs, if there is one."""
        empty = StageReport()
        if self.pool is None or not request.inputs:
            return None, empty
        entry = self.pool.acquire(pool_key(request.spec))
        for discarded in self.pool.take_discarded():
            self._dispose(discarded)
        if entry is None:
            return None, empty
        started = time.perf_counter()
        try:
            changes, removed = self._delta(request, entry)

            def admit(path: str, hash_hex: str, executable: bool) -> BlobIdentity | None:
                found: dict[BlobIdentity, str] = {}
                digest = self._ensure_blob(request.execroot / path, hash_hex, executable, found, path)
                self._meta[(path, hash_hex)] = (digest, executable)
                return next(iter(found), None)

            report = self.pool.patch(entry, changes, removed, output_dirs(request.spec), admit)
            entry.manifest = request.inputs
        except (OSError, TreematError):
            self.counters.add("execpool_patch_failed")
            self._dispose(entry.path)
            return None, empty
        report.unchanged = len(request.inputs) - report.linked
        self.counters.add("execpool_reused")
        self.counters.add("hardlink", report.linked)
        stage = StageReport(files=len(request.inputs), methods={"reused": report.unchanged, "hardlink": report.linked})
        stage.hardlinked = report.relinked
        stage.seconds = time.perf_counter() - started
        return entry, stage

    def _delta(self, request: ActionRequest, entry: PooledDir) -> tuple[dict[str, tuple[str, bool]], set[str]]:
        """What to (re)link ({path: (hash, executable)}) and what to remove to turn `entry` into this request.

        Costs O(changed inputs): the manifests find the run of inputs that differs (manifest.py).
        ExecutionError where this request cannot be patched in (fresh staging then gives the real answer).
        """
        if entry.manifest is None:
            raise ExecutionError("the pooled dir has no manifest")
        delta = request.inputs.delta(entry.manifest)
        normalize = self._normalize
        earlier = {normalize(raw) for raw, _hash in delta.earlier}
        changes: dict[str, tuple[str, bool]] = {}
        for raw, hash_text in delta.later:
            if not hash_text:
                raise ExecutionError("a directory input: its contents are not in the request")
            path = normalize(raw)
            if path in changes or (path in entry.files and path not in earlier):
                raise ExecutionError(f"input {path!r} is listed twice")
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
        return changes, earlier - changes.keys()

    def pooled_from_fresh(
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
        entry = PooledDir(path=exec_dir, key=pool_key(request.spec))
        for item in request.inputs:
            path = self._normalize(item.path)
            meta = self._meta.get((path, check_hash(item.hash or "")))
            if meta is None:
                return None
            entry.files[path] = StagedFile(meta[0].hash, meta[1], identity_of.get(path, NO_BLOB))
        entry.pinned = set(output_dirs(request.spec))
        for rel in directories_for(entry.files.keys(), entry.pinned):
            entry.dirs[rel] = (0, 0, 0)
        entry.count_children()
        entry.manifest = request.inputs
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


def pool_key(spec: ActionSpec) -> str:
    """Actions with the same declared outputs (the same target, rebuilt) share a pooled exec dir."""
    return "\0".join([*spec.outputs, "\1", *spec.output_dirs])


def output_dirs(spec: ActionSpec) -> list[str]:
    """Directories the exec dir holds for outputs: each output's parent and each declared output directory."""
    parents = [normalize_path(output).rpartition("/")[0] for output in spec.outputs]
    return [parent for parent in parents if parent] + [normalize_path(d) for d in spec.output_dirs]


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


