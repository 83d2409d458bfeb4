"""An action's inputs, read from its request: the input tree to stage afresh, or the delta to patch a pooled dir.

Bazel's digests are trusted for lookups; every blob is admitted by the guard right before it is staged (and
ingested, verified against Bazel's digest, when the CAS lacks it). An input the memo cannot vouch for is read
from the execroot by inputfiles.py (a directory input walked entry by entry). Under overlay isolation a finished
exec dir with the same outputs is reused: only the delta between the two requests is linked and unlinked. The
executor decides which of the two it asks for, stages the tree, and has the pool patch or adopt its dirs.
"""

from __future__ import annotations

import os
import stat

from treemat.action import ActionRequest, RequestInput
from treemat.blobguard import BlobGuard
from treemat.blobstate import NO_BLOB, BlobIdentity, BlobKey, StagedBlobs, StagedFile
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import check_hash
from treemat.errors import ExecutionError
from treemat.execrootwatch import ExecrootWatch
from treemat.fsprims import file_kind
from treemat.inputfiles import InputFiles, stat_input
from treemat.inputmemo import InputMemo, KnownInput
from treemat.pooleddir import PooledDir
from treemat.tree import FileNode, InputTree, check_symlinks, normalize_path


class InputStager:
    """Reads requests' inputs: the tree of one to stage afresh, or its delta from a pooled dir's last request."""

    def __init__(self, cas: ContentStore, guard: BlobGuard, *, counters: Counters, pooled: bool) -> None:
        self.cas = cas
        self.guard = guard
        self.counters = counters
        self.pooled = pooled  # an exec-dir pool may adopt fresh dirs: build_tree says what each path links
        self.memo = InputMemo()
        self.files = InputFiles(guard, self.memo)
        self.execroot_watch = ExecrootWatch()

    def close(self) -> None:
        """Drop the execroot watch (its inotify instance)."""
        self.execroot_watch.close()

    def forget(self, blobs: list[BlobKey] | None = None) -> None:
        """Blobs that were just rejected (None: every blob): the memo's one invalidation rule."""
        self.memo.forget(blobs)

    def delta(self, request: ActionRequest, entry: PooledDir) -> tuple[dict[str, tuple[str, bool]], set[str]]:
        """What to (re)link ({path: (hash, executable)}) and what to remove to turn `entry` into this request.

        Decoding costs O(changed inputs): the manifests find the run of inputs that differs (manifest.py). An exec
        bit is what the execroot says now (`chmod +x` keeps the bytes and the digest Bazel lists), so an unchanged
        input whose bit flipped is relinked to the other blob: the execroot watch (execrootwatch.py) says which
        unchanged inputs may have changed since this dir's last request (all of them when it cannot tell), and
        only those are `stat`ed. ExecutionError where this request cannot be patched in (fresh staging then gives
        the real answer).
        """
        if entry.manifest is None:
            raise ExecutionError("the pooled dir has no manifest")
        delta = request.inputs.delta(entry.manifest)
        self.counters.add("execpool_delta_entries", len(delta.earlier) + len(delta.later))  # O(changed), in stats
        execroot = str(request.execroot)
        plan = self.execroot_watch.plan(execroot, entry.exec_bits_seen)
        self.counters.add("execbit_checks_all" if plan.everything else "execbit_checks_marked")
        normalize, watch, base = self.memo.path, self.execroot_watch, f"{execroot}/"
        earlier = {normalize(raw) for raw, _hash in delta.earlier}
        changes: dict[str, tuple[str, bool]] = {}
        declared = [normalize_path(output) for output in [*request.spec.outputs, *request.spec.output_dirs]]
        for raw, hash_text in delta.later:
            if not hash_text:
                raise ExecutionError("a directory input: its contents are not in the request")
            path = normalize(raw)
            if path in changes or (path in entry.files and path not in earlier):
                raise ExecutionError(f"input {path!r} is listed twice")
            for out in declared:  # what build_tree refuses on fresh staging, for the new inputs
                if out == path or out.startswith(f"{path}/") or path.startswith(f"{out}/"):
                    raise ExecutionError(f"output {out!r} overlaps the input {path!r}: refused")
            hash_hex = check_hash(hash_text)
            changes[path] = (hash_hex, _exec_bit(watch.check(execroot, path), base + path, path))
        files = entry.files
        suspects = files.keys() if plan.everything else [path for path in plan.paths if path in files]
        for path in suspects:  # every input when the watch cannot tell: one check and no other call per input
            if path in changes or path in earlier:
                continue
            mode = watch.check(execroot, path)
            executable = bool(mode & 0o111) if stat.S_ISREG(mode) else _exec_bit(mode, base + path, path)
            if executable != files[path].executable:
                changes[path] = (files[path].hash, executable)
        entry.exec_bits_seen = plan.generation
        return changes, earlier - changes.keys()

    def build_tree(self, request: ActionRequest) -> tuple[InputTree, StagedBlobs, dict[str, StagedFile] | None]:
        """Validate input paths, admit every blob (ingesting what the CAS lacks), refuse an output that is, holds or
        lies below an input (ExecutionError).

        Returns the tree, its blob inodes (identity -> (a path, its key)) and, for the exec-dir pool, what each path
        is a hardlink to (None when an input has no digest, e.g. a directory input). A warm worker spends one
        dict lookup, one stat of the execroot file (its exec bit now), one lstat (the guard's per-use check) and
        one tree insert per input.
        """
        tree = InputTree()
        add_file = tree.add_file
        staged: StagedBlobs = {}
        files: dict[str, StagedFile] | None = {} if self.pooled else None
        used: list[tuple[str, bool]] = []
        execroot = str(request.execroot)
        self.memo.use_execroot(execroot)
        known_input, admit, stat_now = self.memo.known, self.guard.admit, os.stat
        base = execroot + "/"  # the service stages for several execroots at once: an entry of another is not ours
        for item in request.inputs:
            known = known_input(item)
            identity: BlobIdentity | None = NO_BLOB
            if known is not None:
                path, node, size, full = known
                try:
                    mode = stat_now(full).st_mode if full.startswith(base) else 0
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
        for output in [*request.spec.outputs, *request.spec.output_dirs]:  # collecting it would overwrite an input
            path = normalize_path(output)
            if tree.holds(path):
                raise ExecutionError(f"output {path!r} is also an input (or lies below one): refused")
        return tree, staged, files

    def _admit_input(
        self, tree: InputTree, request: ActionRequest, item: RequestInput, staged: StagedBlobs
    ) -> tuple[str, FileNode, BlobIdentity | None] | None:
        """The slow path of one input: validate, then stat, admit or ingest (inputfiles.py); None for a directory
        input (added)."""
        path = self.memo.path(item.path)
        expected = check_hash(item.hash) if item.hash else None
        placed = self.files.read_input(tree, request.execroot, path, expected, staged)
        if placed is None:
            return None
        node, identity = placed
        if expected:
            self.memo.learn(item, KnownInput(path, node, node.digest.size, f"{request.execroot}/{path}"))
        return path, node, identity


def _exec_bit(mode: int, full: str, path: str) -> bool:
    """The exec bit of a regular file's `mode`; for anything else (0: could not be read) the execroot is asked
    again: ExecutionError naming what it is, unless it became a regular file since."""
    return bool(mode & 0o111) if stat.S_ISREG(mode) else _executable(full, path)


def _executable(full: str, path: str) -> bool:
    """The exec bit a regular-file input has in the execroot now; ExecutionError for anything else."""
    mode = stat_input(full, path).st_mode
    if not stat.S_ISREG(mode):
        raise ExecutionError(f"input {path!r} is a {file_kind(mode)}: refused")
    return bool(mode & 0o111)
