"""The bot's one seam into treemat's core: a local CAS keyed by (digest, executable) plus the directory cache.

Everything the bot needs from the core goes through `LocalStager`: is a blob here, store one, where does it
live, stage an input tree into a fresh directory, and publish counters for `treemat stats`. When the core
changes, only this module needs re-wiring.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from treemat.counters import StatsStore
from treemat.digest import EMPTY_DIGEST, Digest
from treemat.errors import TreematError
from treemat.fsprims import remove_tree, sweep_dead_owners
from treemat.stack import DEFAULT_DIRCACHE_MIN_FILES, ISOLATION_COW, open_stack
from treemat.staging import StageReport
from treemat.tree import FileNode, InputTree, check_symlinks

__all__ = ["Digest", "FileNode", "InputTree", "LocalStager", "StageReport", "check_symlinks"]


class LocalStager:
    """treemat's CAS, materializer and directory cache under one root, wired for a bot process."""

    def __init__(self, root: Path, *, concurrency: int | None = None, dircache: bool = True) -> None:
        # The bot runs commands itself, outside the overlay sandbox: so it never hardlinks (copy-on-write
        # isolation: reflink / snapshot / copy), and no command can write a CAS inode through its inputs.
        stack = open_stack(
            Path(root),
            isolation=ISOLATION_COW,
            concurrency=concurrency,
            dircache_min_files=DEFAULT_DIRCACHE_MIN_FILES if dircache else None,
        )
        self.root = stack.root
        self.counters = stack.counters
        self.cas = stack.cas
        self.guard = stack.guard
        self.dircache = stack.dircache
        self.isolation = stack.describe()
        self.exec_base = self.root / "exec"
        self.exec_base.mkdir(parents=True, exist_ok=True)
        self._stats = StatsStore(self.root)
        self._stats_lock = threading.Lock()
        self._sweep_stale_exec_dirs()

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

    # --------------------------------------------------------------------------- staging

    @contextlib.contextmanager
    def exec_dir(self, tag: str) -> Iterator[Path]:
        """A fresh (not yet created) private exec dir path, removed afterwards."""
        path = self.exec_base / f"{os.getpid()}-{tag}-{secrets.token_hex(4)}"
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                remove_tree(path)

    def begin(self) -> None:
        """Before an action: take in every write event, so a blob written since it was verified is not trusted."""
        self.guard.poll()

    def stage(self, tree: InputTree, dest: Path) -> StageReport:
        """Materialize `tree` into `dest` (must not exist): read-only inputs, writable directories.

        A blob written while it was being copied in is caught here (write events), and the staging refused.
        """
        with self.cas.in_use():
            report = self.dircache.stage(tree, dest)
        written = set(self.guard.poll())
        if written & {(node.digest.hash, node.executable) for _, node in tree.iter_files()}:
            remove_tree(dest)
            raise TreematError("an input blob was written to while it was staged; it was quarantined (retry)")
        return report

    def publish_stats(self, *, role: str, extra: Mapping[str, object] | None = None) -> None:
        """Write this process's counters where `treemat stats` sums them."""
        with self._stats_lock, contextlib.suppress(OSError):
            self._stats.publish(self.counters, role=role, extra={**self.dircache.describe(), **(extra or {})})

    def _sweep_stale_exec_dirs(self) -> None:
        sweep_dead_owners(self.exec_base)


EMPTY = EMPTY_DIGEST
