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
from dataclasses import dataclass
from pathlib import Path

from treemat.action import ActionRequest, RequestInput
from treemat.blobguard import BlobGuard, BlobIdentity, StagedBlobs
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import EMPTY_DIGEST, Digest, check_hash
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
        self._known: dict[tuple[str, bool], int] = {}  # (hash, executable) -> size, known to be in the CAS
        # (raw path, raw hash) as listed -> (path, node, size, execroot path): what a warm worker needs per input
        self._hot: dict[tuple[str, str | None], tuple[str, FileNode, int, str]] = {}
        self._hot_root = ""  # the execroot the nodes' `source` paths are under

    def forget(self, blobs: list[tuple[str, bool]] | None = None) -> None:
        """Blobs that were just rejected (None: every blob): drop what we knew of them, and every path's node."""
        with self._lock:
            if blobs is None:
                self._known.clear()
            for key in blobs or ():
                self._known.pop(key, None)
            self._hot.clear()

    def stage_fresh(self, request: ActionRequest, exec_dir: Path) -> FreshStage:
        """Build the tree and stage it into a new exec dir (retrying once if our in-memory view was stale)."""
        try:
            tree, staged, files = self.build_tree(request)
            return FreshStage(staged, self.dircache.stage(tree, exec_dir), files)
        except MissingBlobError:
            self.forget()  # a blob was GC'd or quarantined elsewhere: forget what we knew, retry once
            remove_tree(exec_dir)
            tree, staged, files = self.build_tree(request)
            return FreshStage(staged, self.dircache.stage(tree, exec_dir), files)

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
                return self._ensure_blob(request.execroot / path, hash_hex, executable, path)[1]

            report = self.pool.patch(entry, changes, removed, output_dirs(request.spec), admit)
            entry.manifest = request.inputs
        except (OSError, TreematError):
            self.counters.add("execpool_patch_failed")
            self._drop(entry)
            return None, empty
        except BaseException:
            self._drop(entry)  # leased and half patched: never back to the pool, never left in exec/
            raise
        report.unchanged = len(request.inputs) - report.linked
        self.counters.add("execpool_reused")
        self.counters.add("hardlink", report.linked)
        stage = StageReport(files=len(request.inputs), methods={"reused": report.unchanged, "hardlink": report.linked})
        stage.hardlinked = report.relinked
        stage.seconds = time.perf_counter() - started
        return entry, stage

    def _drop(self, entry: PooledDir) -> None:
        """A leased dir that cannot be used: unwatched and removed."""
        assert self.pool is not None
        self.pool.forget(entry)
        self._dispose(entry.path)

    def _delta(self, request: ActionRequest, entry: PooledDir) -> tuple[dict[str, tuple[str, bool]], set[str]]:
        """What to (re)link ({path: (hash, executable)}) and what to remove to turn `entry` into this request.

        Decoding costs O(changed inputs): the manifests find the run of inputs that differs (manifest.py). Every
        input is `stat`ed once: an exec bit is what the execroot says now (`chmod +x` keeps the bytes and the
        digest Bazel lists), so an unchanged input whose bit flipped is relinked to the other blob.
        ExecutionError where this request cannot be patched in (fresh staging then gives the real answer).
        """
        if entry.manifest is None:
            raise ExecutionError("the pooled dir has no manifest")
        delta = request.inputs.delta(entry.manifest)
        self.counters.add("execpool_delta_entries", len(delta.earlier) + len(delta.later))  # O(changed), in stats
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
            changes[path] = (hash_hex, _executable(f"{request.execroot}/{path}", path))
        base, files = f"{request.execroot}/", entry.files
        for path, staged in files.items():
            if path not in changes and path not in earlier:
                executable = _executable(base + path, path)
                if executable != staged.executable:
                    changes[path] = (staged.hash, executable)
        return changes, earlier - changes.keys()

    def pooled_from_fresh(self, request: ActionRequest, exec_dir: Path, fresh: FreshStage) -> PooledDir | None:
        """Describe a freshly staged exec dir for the pool (only plain hardlink trees of hashed inputs)."""
        stage = fresh.report
        if (
            self.pool is None
            or fresh.files is None
            or not fresh.files
            or stage.subtree_hits
            or any(method not in ("hardlink", "zero_byte") for method in stage.methods)
        ):
            return None
        entry = PooledDir(path=exec_dir, key=pool_key(request.spec), files=fresh.files)
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

    def build_tree(self, request: ActionRequest) -> tuple[InputTree, StagedBlobs, dict[str, StagedFile] | None]:
        """Validate input paths, admit every blob (ingesting what the CAS lacks).

        Returns the tree, its blob inodes (identity -> (a path, its key)) and, for the exec-dir pool, what each path
        is a hardlink to (None when an input has no digest, e.g. a directory input). A warm worker spends one
        dict lookup, one stat of the execroot file (its exec bit now), one lstat (the guard's per-use check) and
        one tree insert per input.
        """
        tree = InputTree()
        add_file = tree.add_file
        staged: StagedBlobs = {}
        files: dict[str, StagedFile] | None = {} if self.pool is not None else None
        used: list[tuple[str, bool]] = []
        execroot = str(request.execroot)
        if execroot != self._hot_root:
            self._hot.clear()
            self._hot_root = execroot
        hot, admit, stat_now = self._hot, self.guard.admit, os.stat
        for item in request.inputs:
            known = hot.get(item)
            identity: BlobIdentity | None = NO_BLOB
            if known is not None:
                path, node, size, full = known
                try:
                    mode = stat_now(full).st_mode
                except OSError:
                    mode = 0  # gone: the slow path says so
                if not stat.S_ISREG(mode) or bool(mode & 0o111) != node.executable:
                    known = None  # chmodded (same bytes, same digest), replaced or gone since
                elif size:
                    identity = admit(node.digest.hash, node.executable, size)
                    if identity is None:  # gone or rejected since: the slow path re-ingests it
                        known = None
                    else:
                        key = (node.digest.hash, node.executable)
                        staged.setdefault(identity, (path, key))
                        used.append(key)
            if known is None:
                if not item.hash:
                    files = None  # no digest (a directory or an unhashed file): the request cannot tell a change
                placed = self._admit_input(tree, request, item, staged)
                if placed is None:
                    continue  # a directory input, added entry by entry
                path, node, identity = placed
            add_file(path, node, normalized=True)
            if files is not None:
                files[path] = StagedFile(node.digest.hash, node.executable, identity or NO_BLOB)
        self.cas.touch_all(used)  # LRU recency for `cas gc` (throttled to once an hour per blob)
        check_symlinks(tree)
        return tree, staged, files

    def _admit_input(
        self, tree: InputTree, request: ActionRequest, item: RequestInput, staged: StagedBlobs
    ) -> tuple[str, FileNode, BlobIdentity | None] | None:
        """The slow path of one input: validate, stat, admit or ingest; None for a directory input (added)."""
        path = self._normalize(item.path)
        expected = check_hash(item.hash) if item.hash else None
        full = f"{request.execroot}/{path}"
        info = _stat_input(full, path)
        if stat.S_ISDIR(info.st_mode):
            self._add_directory(tree, request.execroot, path, staged)
            return None
        if not stat.S_ISREG(info.st_mode):
            raise ExecutionError(f"input {path!r} is a {file_kind(info.st_mode)}: refused (not a regular file)")
        executable = bool(info.st_mode & 0o111)
        digest, identity = self._ensure_blob(full, expected, executable, path)
        if identity is not None:
            staged.setdefault(identity, (path, (digest.hash, executable)))
        node = FileNode(digest, executable, source=full)
        if expected:
            if len(self._hot) > 1_000_000:
                self._hot.clear()
            self._hot[item] = (path, node, digest.size, full)
        return path, node, identity

    def _add_directory(self, tree: InputTree, execroot: Path, path: str, staged: StagedBlobs) -> None:
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
                    digest, identity = self._ensure_blob(full, None, executable, rel)
                    if identity is not None:
                        staged.setdefault(identity, (rel, (digest.hash, executable)))
                    tree.add_file(rel, FileNode(digest, executable, source=full))
                else:
                    raise ExecutionError(
                        f"input {rel!r} (inside directory input {path!r}) is a {file_kind(info.st_mode)}: refused"
                    )

    def _ensure_blob(
        self, full: str | Path, expected: str | None, executable: bool, path: str
    ) -> tuple[Digest, BlobIdentity | None]:
        """The blob's digest and inode (None for the empty file), admitted by the guard; ingests (and
        verifies) the execroot file if the CAS lacks it."""
        if expected is not None:
            if expected == EMPTY_DIGEST.hash:
                return EMPTY_DIGEST, None
            key = (expected, executable)
            admitted = self.guard.admit_sized(expected, executable, self._known.get(key))
            if admitted is not None:
                identity, size = admitted
                self.cas.touch(expected, executable)  # LRU recency for `cas gc` (throttled to once an hour)
                self._known[key] = size
                return Digest(expected, size), identity
            self._known.pop(key, None)
        digest = self.cas.ingest_file(full, executable=executable, expected=expected)
        self._known[(digest.hash, executable)] = digest.size
        if not digest.size:
            return digest, None
        ingested = self.guard.admit_ingested(digest.hash, executable, digest.size)
        if ingested is None:
            raise ExecutionError(f"input {path!r}: its blob vanished or was rejected right after ingest")
        return digest, ingested


@dataclass(slots=True)
class FreshStage:
    """A freshly staged exec dir: its blob inodes (identity -> (a path, its key)), the report, and (for the pool)
    what each path is a hardlink to, None when a directory input is in it."""

    staged: StagedBlobs
    report: StageReport
    files: dict[str, StagedFile] | None


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


def _executable(full: str, path: str) -> bool:
    """The exec bit a regular-file input has in the execroot now; ExecutionError for anything else."""
    mode = _stat_input(full, path).st_mode
    if not stat.S_ISREG(mode):
        raise ExecutionError(f"input {path!r} is a {file_kind(mode)}: refused")
    return bool(mode & 0o111)


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
