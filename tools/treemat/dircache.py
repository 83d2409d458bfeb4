"""Directory cache: materialized subtrees keyed by their REAPI Merkle digest, cloned out whole.

Where the platform can clone a whole directory in O(1) — APFS `clonefile(2)` on a directory, a btrfs
subvolume snapshot — a subtree that repeats across actions (SDKs, dependency modules) costs one kernel call
instead of one per file. Elsewhere (ext4, xfs, tmpfs) cloning a cached copy is still per file and no faster
than placing from the CAS, so the cache stands aside and the materializer's fastest per-file method is used.

Entries live in `<root>/dircache/<hash>/`, read-only, published atomically by rename. Readers pin an entry
with a shared flock on `<hash>.lock` while cloning; eviction needs the exclusive lock and skips pinned ones.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from treemat.counters import Counters
from treemat.fsprims import (
    clone_tree,
    create_subvolume,
    is_btrfs,
    make_dirs_writable,
    make_tree_readonly,
    remove_tree,
)
from treemat.locking import LockBusy, file_lock
from treemat.materializer import Materializer, MaterializeReport, create_destination
from treemat.merkle import MerkleIndex
from treemat.tree import DirectoryNode, InputTree

Progress = Callable[[int], None]


@dataclass(slots=True)
class StageReport:
    """What staging one tree did: the per-file report plus subtree cache figures."""

    files: int = 0
    bytes: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    hardlinked: list[tuple[str, bool]] = field(default_factory=list)
    subtree_hits: int = 0
    subtree_misses: int = 0
    subtree_files: int = 0
    seconds: float = 0.0

    def absorb(self, report: MaterializeReport) -> None:
        """Add a materializer report's figures."""
        self.files += report.files
        self.bytes += report.bytes
        for name, amount in report.methods.items():
            self.methods[name] = self.methods.get(name, 0) + amount
        self.hardlinked.extend(report.hardlinked)

    def to_json(self) -> dict[str, object]:
        """Plain-JSON form (hardlinked blobs summarized as a count)."""
        return {
            "files": self.files,
            "bytes": self.bytes,
            "methods": dict(self.methods),
            "hardlinked": len(self.hardlinked),
            "subtree_hits": self.subtree_hits,
            "subtree_misses": self.subtree_misses,
            "subtree_files": self.subtree_files,
            "seconds": round(self.seconds, 6),
        }


@dataclass(frozen=True, slots=True)
class DirCacheStats:
    """Size of the directory cache."""

    entries: int
    bytes: int
    enabled: bool
    mode: str


class DirectoryCache:
    """Stages input trees, cloning repeated subtrees whole where the filesystem makes that O(1)."""

    def __init__(
        self,
        root: Path,
        materializer: Materializer,
        *,
        counters: Counters | None = None,
        max_bytes: int | None = 8 << 30,
        min_files: int | None = 32,
    ) -> None:
        self.root = Path(root)
        self.materializer = materializer
        self.counters = counters if counters is not None else materializer.counters
        self.max_bytes = max_bytes
        self.min_files = min_files
        self.cache_dir = self.root / "dircache"
        self._mode: str | None = None

    @property
    def mode(self) -> str:
        """'clonefile' (macOS), 'snapshot' (btrfs), or 'off' (no O(1) whole-tree clone here, or disabled)."""
        if self._mode is None:
            if self.min_files is None:
                self._mode = "off"
            elif sys.platform == "darwin":
                self._mode = "clonefile"
            else:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                self._mode = "snapshot" if is_btrfs(self.cache_dir) else "off"
        return self._mode

    def stage(self, tree: InputTree | DirectoryNode, dest: Path, *, progress: Progress | None = None) -> StageReport:
        """Create `dest` (must not exist) holding the tree; nothing is left behind on failure."""
        started = time.perf_counter()
        node = tree.root if isinstance(tree, InputTree) else tree
        report = StageReport()
        if self.mode == "off":
            report.absorb(self.materializer.build(node, dest, progress=progress))
            report.seconds = time.perf_counter() - started
            return report
        merkle = MerkleIndex()
        min_files = self.min_files or 0
        file_counts: dict[int, int] = {}

        def count(n: DirectoryNode) -> int:
            if id(n) not in file_counts:
                file_counts[id(n)] = n.count_files()
            return file_counts[id(n)]

        cached: list[tuple[DirectoryNode, Path]] = []

        def take_whole(child: DirectoryNode, child_path: Path) -> bool:
            """Clone `child` whole if it is big and either cached already or has no big subdirectory."""
            if count(child) < min_files:
                return False
            whole = (self.cache_dir / merkle.digest_of(child).hash).is_dir() or all(
                count(grandchild) < min_files for grandchild in child.dirs.values()
            )
            if whole:
                cached.append((child, child_path))
            return whole

        partial = MaterializeReport()
        create_destination(dest)
        try:
            jobs, links = self.materializer.create_directories(node, dest, partial, skip=take_whole)
            self.materializer.place_files(jobs, partial, progress=progress)
            for child, child_path in cached:
                if not self._clone_cached(child, child_path, merkle, report):
                    partial.merge(self.materializer.build(child, child_path))
                if progress is not None:
                    progress(count(child))
            self.materializer.create_symlinks(links, partial)
        except BaseException:
            remove_tree(dest)
            raise
        report.absorb(partial)
        report.seconds = time.perf_counter() - started
        return report

    def _clone_cached(self, node: DirectoryNode, dest: Path, merkle: MerkleIndex, report: StageReport) -> bool:
        """Clone the cached copy of `node` to `dest` (building the entry on a miss). False if impossible."""
        key = merkle.digest_of(node).hash
        entry = self.cache_dir / key
        hit = entry.is_dir()
        if not hit:
            self._build_entry(node, entry)
        lock = self.cache_dir / f"{key}.lock"
        with file_lock(lock, shared=True):
            if not entry.is_dir() or not clone_tree(entry, dest):
                return False
            os.utime(lock)  # LRU stamp
        make_dirs_writable(dest)
        files = node.count_files()
        self.counters.add("subtree_hits" if hit else "subtree_misses")
        self.counters.add("subtree_clone_calls" if self.mode == "clonefile" else "subtree_snapshots")
        self.counters.add("clonefile" if self.mode == "clonefile" else "snapshot", files)
        if hit:
            report.subtree_hits += 1
        else:
            report.subtree_misses += 1
        report.subtree_files += files
        report.files += files
        report.bytes += node.total_bytes()
        report.methods[self.mode] = report.methods.get(self.mode, 0) + files
        return True

    def _build_entry(self, node: DirectoryNode, entry: Path) -> None:
        """Materialize `node` into a temp entry, make it read-only, publish by rename (losers discard theirs)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        temp = self.cache_dir / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            if self.mode == "snapshot":
                create_subvolume(temp)
                os.chmod(temp, 0o755)
                jobs, links = self.materializer.create_directories(node, temp, MaterializeReport())
                self.materializer.place_files(jobs, MaterializeReport(), progress=None)
                self.materializer.create_symlinks(links, MaterializeReport())
            else:
                self.materializer.build(node, temp)
            make_tree_readonly(temp)
            try:
                os.rename(temp, entry)
            except OSError:
                if not entry.is_dir():
                    raise
                remove_tree(temp)  # another process published the same subtree first
        except BaseException:
            remove_tree(temp)
            raise
        self.evict(self.max_bytes)

    def evict(self, max_bytes: int | None) -> int:
        """Remove least-recently-used unpinned entries until the cache fits in `max_bytes`; returns count."""
        if max_bytes is None or not self.cache_dir.is_dir():
            return 0
        entries = []
        total = 0
        for path in self.cache_dir.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            size = _tree_bytes(path)
            lock = self.cache_dir / f"{path.name}.lock"
            stamp = lock.stat().st_mtime if lock.exists() else 0.0
            entries.append((stamp, size, path))
            total += size
        evicted = 0
        for _stamp, size, path in sorted(entries):
            if total <= max_bytes:
                break
            try:
                with file_lock(self.cache_dir / f"{path.name}.lock", blocking=False):
                    graveyard = self.cache_dir / f".evict-{secrets.token_hex(6)}"
                    os.rename(path, graveyard)
            except (LockBusy, FileNotFoundError):
                continue
            remove_tree(graveyard)
            total -= size
            evicted += 1
        self.counters.add("evictions", evicted)
        return evicted

    def stats(self) -> DirCacheStats:
        """Entries and bytes held."""
        entries = total = 0
        if self.cache_dir.is_dir():
            for path in self.cache_dir.iterdir():
                if path.is_dir() and not path.name.startswith("."):
                    entries += 1
                    total += _tree_bytes(path)
        return DirCacheStats(entries=entries, bytes=total, enabled=self.mode != "off", mode=self.mode)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
