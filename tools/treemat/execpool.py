"""Exec-dir reuse: keep finished exec dirs and stage the next similar action by patching the difference.

Only under overlay isolation (sandbox.py): there the tool's writes land in the overlay's upper dir, so the staged
tree (the overlay's lower layer: hardlinks to CAS blobs plus the output parent dirs) is exactly as it was staged
when the tool exits. Keeping it and patching it for the next action with the same outputs (the same target
rebuilt after an edit) replaces "mkdir every dir, link every file, remove it all afterwards" by "unlink what
changed, link the new blobs".

What keeps a reused dir honest:
- every directory is watched with inotify from the moment it is staged: an entry added, removed, renamed or
  chmodded by anyone but the pool's own patch marks the dir dirty, and a dirty dir is discarded (O(1) at
  reuse). Without inotify, or when a dir could not be watched whole (out of watches), the pool remembers each
  directory's (inode, mtime, ctime) and `lstat`s them all before reuse instead;
- a lost directory watch (queue overflow, IN_IGNORED) marks the dir dirty, even during the pool's own patch;
- file contents are CAS inodes, watched by the blob guard: a write anywhere taints the inode, and a pooled dir
  holding a tainted inode is discarded. When the guard's mark moved since the dir was staged (a taint, or a
  blob that lost or never had its watch), every file the guard does not trust right now is hashed again
  (`BlobGuard.confirm`) before reuse, and the dir is discarded if one is not its blob any more;
- a dir whose patch fails halfway is discarded, never returned to the pool.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from treemat.blobguard import BlobGuard
from treemat.blobstate import NO_BLOB, BlobKey, GuardMark, StagedFile
from treemat.cas import ContentStore
from treemat.errors import ExecutionError
from treemat.fsprims import blob_mode, remove_tree
from treemat.manifest import InputManifest
from treemat.pooleddir import PatchReport, PooledDir, parent_of
from treemat.staging import StageReport
from treemat.writewatch import WriteWatch

DEFAULT_POOL_SIZE = 8

Dispose = Callable[[Path, Iterable[BlobKey]], None]  # remove a dir (in the background); its blobs' ledger refreshed


class ExecDirPool:
    """A bounded LRU of finished exec dirs, each leased to one action at a time; it removes the dirs it drops."""

    def __init__(
        self, cas: ContentStore, guard: BlobGuard, watch: WriteWatch, *, dispose: Dispose, size: int = DEFAULT_POOL_SIZE
    ) -> None:
        self.cas = cas
        self.guard = guard
        self.watch = watch
        self.size = size
        self._dispose = dispose
        self._lock = threading.Lock()
        self._idle: OrderedDict[str, PooledDir] = OrderedDict()

    def adopt(
        self,
        path: Path,
        key: str,
        files: dict[str, StagedFile] | None,
        report: StageReport,
        pinned: Iterable[str],
        manifest: InputManifest,
        mark: GuardMark,
    ) -> PooledDir | None:
        """A freshly staged exec dir becomes a pool entry if the pool can patch it later: a plain hardlink tree of
        hashed inputs (`files`: None where an input had no digest; no cloned subtree, no copies in `report`), else
        None. Every directory's signature taken and watched (on an error the dir is removed before it is raised)."""
        if not files or report.subtree_hits or any(m not in ("hardlink", "zero_byte") for m in report.methods):
            return None
        entry = PooledDir(path=path, key=key, files=files, pinned=set(pinned), manifest=manifest, mark=mark)
        for rel in directories_for(entry.files.keys(), entry.pinned):
            entry.dirs[rel] = (0, 0, 0)
        entry.count_children()
        try:
            self.record(entry)
            self._watch(entry, entry.dirs)
        except BaseException:
            self.retire(entry)  # never adopted: unwatched and removed here (its blobs' ledger refreshed)
            raise
        return entry

    def acquire(self, key: str) -> PooledDir | None:
        """Lease the idle dir for `key`, if any, after checking nothing changed it; None to stage afresh."""
        with self._lock:
            entry = self._idle.pop(key, None)
        if entry is None:
            return None
        self.guard.poll()
        mark = self.guard.mark()
        if entry.mark != mark:
            if self.guard.tainted(entry.identities()) or not self._blobs_confirmed(entry):
                self._discard(entry)  # a blob it holds was written to, or cannot be vouched for
                return None
            entry.mark = mark
        unchanged = self._dirs_unchanged(entry) if entry.unwatched else not entry.dirty
        if not unchanged:
            self._discard(entry)  # a directory changed behind the pool's back
            return None
        return entry

    def _blobs_confirmed(self, entry: PooledDir) -> bool:
        """Every file still its blob: trusted under a live watch, else hashed again now."""
        confirm = self.guard.confirm
        return all(
            confirm(staged.key(), staged.identity) for staged in entry.files.values() if staged.identity != NO_BLOB
        )

    def release(self, entry: PooledDir) -> list[PooledDir]:
        """Return a dir after its action; the evicted dirs (least recently used beyond `size`) are returned."""
        evicted: list[PooledDir] = []
        with self._lock:
            old = self._idle.pop(entry.key, None)
            if old is not None:
                evicted.append(old)
            self._idle[entry.key] = entry
            while len(self._idle) > self.size:
                evicted.append(self._idle.popitem(last=False)[1])
        return evicted

    def drain(self) -> list[PooledDir]:
        """Take every idle dir out."""
        with self._lock:
            entries = list(self._idle.values())
            self._idle.clear()
        return entries

    def close(self) -> None:
        """Remove every idle dir now (they pin their blobs against gc while kept)."""
        for entry in self.drain():
            self._forget(entry)
            remove_tree(entry.path)
            self.guard.refresh(entry.keys())

    def retire(self, entry: PooledDir, *, intact: bool = True) -> None:
        """A dir leaves the pool (evicted, dirty, or failed half patched): unwatched and removed; the ledger is
        refreshed for its blobs when it is `intact` (holds what `files` says)."""
        self._forget(entry)
        self._dispose(entry.path, entry.keys() if intact else [])

    def _discard(self, entry: PooledDir) -> None:
        """Drop a dir that cannot be trusted."""
        self.guard.counters.add("execpool_discarded")
        self.retire(entry, intact=False)

    def _forget(self, entry: PooledDir) -> None:
        """Stop watching a dir that leaves the pool."""
        for wd in entry.watches.values():
            self.watch.unwatch_directory(wd)
        entry.watches.clear()

    def _watch(self, entry: PooledDir, rels: Iterable[str]) -> None:
        """Watch `rels` (dirs of `entry`); if any watch cannot be placed, none is kept (see `acquire`)."""
        if entry.unwatched:
            return
        base = str(entry.path)
        for rel in rels:
            if rel in entry.watches:
                continue
            wd = self.watch.watch_directory(f"{base}/{rel}" if rel else base, entry.on_directory_event)
            if wd is None:
                # no inotify, or out of watches (fs.inotify.max_user_watches): a dir watched only in part would
                # let a change in its unwatched directories through, so acquire verifies by lstat instead
                self._forget(entry)
                entry.unwatched = True
                return
            entry.watches[rel] = wd

    def _dirs_unchanged(self, entry: PooledDir) -> bool:
        base = str(entry.path)
        lstat = os.lstat
        for rel, signature in entry.dirs.items():
            try:
                info = lstat(f"{base}/{rel}" if rel else base)
            except OSError:
                return False
            if (info.st_ino, info.st_mtime_ns, info.st_ctime_ns) != signature:
                return False
        return True

    # ----------------------------------------------------------------------------------------- patching

    def patch(
        self,
        entry: PooledDir,
        changes: dict[str, BlobKey],
        removed: Iterable[str],
        extra_dirs: Iterable[str],
        *,
        execroot: str,
        manifest: InputManifest,
        mark: GuardMark,
    ) -> PatchReport:
        """Turn `entry` into the dir of a request whose inputs are `manifest`, staged under the guard's `mark`.

        `removed` paths go; `changes` ({path: blob key}) are admitted by the guard (ingested from `execroot`
        when the CAS lacks them) and (re)linked. Directories follow: a parent is made when a file needs it and
        removed once nothing (no file, no subdirectory, no declared output dir in `extra_dirs`) is left in it.
        Raises OSError or TreematError if the dir cannot be patched; the caller then retires it. Cost: O(delta).
        """
        admitted = {path: self._admit(entry, path, key, execroot) for path, key in changes.items()}
        with self._own_events(entry):
            report = self._apply(entry, admitted, removed, extra_dirs)
        entry.manifest, entry.mark = manifest, mark  # anything the guard saw since is checked on the next reuse
        return report

    def _admit(self, entry: PooledDir, path: str, key: BlobKey, execroot: str) -> StagedFile:
        """The changed input's blob: the one `entry` links there already, else the guard's (one call)."""
        current = entry.files.get(path)
        if current is not None and current.key() == key:
            return current
        obtained = self.guard.obtain(f"{execroot}/{path}", key[0], key[1], None)
        if obtained is None:
            raise ExecutionError(f"input {path!r}: its blob vanished or was rejected right after ingest")
        return StagedFile(key[0], key[1], obtained[1] or NO_BLOB)

    @contextlib.contextmanager
    def _own_events(self, entry: PooledDir) -> Iterator[None]:
        """While the pool changes a dir itself, its directory events are ours: read them before handing it on."""
        entry.patching = True
        try:
            yield
        finally:
            self.guard.poll()
            entry.patching = False

    def _apply(
        self,
        entry: PooledDir,
        changes: dict[str, StagedFile],
        removed: Iterable[str],
        extra_dirs: Iterable[str],
    ) -> PatchReport:
        report = PatchReport()
        base = str(entry.path)
        files, children = entry.files, entry.children
        touched: set[str] = set()
        pinned = set(extra_dirs)
        for rel in pinned - entry.dirs.keys():
            self._make_dirs(entry, rel, touched, report)
        for rel in pinned - entry.pinned:
            children[rel] = children.get(rel, 0) + 1
        for rel in entry.pinned - pinned:
            children[rel] -= 1
            self._prune(entry, rel, touched, report)
        entry.pinned = pinned
        gone = [path for path in removed if path in files]
        gone += [path for path, want in changes.items() if path in files and want.key() != files[path].key()]
        for path in gone:
            os.unlink(f"{base}/{path}")
            if files[path].identity != NO_BLOB:
                report.relinked.append(files[path].key())
            del files[path]
            parent = parent_of(path)
            children[parent] -= 1
            touched.add(parent)
        report.unlinked = len(gone)
        for path in gone:
            if path not in changes:
                self._prune(entry, parent_of(path), touched, report)
        for path, want in changes.items():
            if path in files:
                continue
            parent = parent_of(path)
            if parent not in entry.dirs:
                self._make_dirs(entry, parent, touched, report)
            hash_hex, executable = want.key()
            if want.identity == NO_BLOB:  # the zero-byte file: created, never a CAS inode
                mode = blob_mode(executable)
                fd = os.open(f"{base}/{path}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
                os.fchmod(fd, mode)
                os.close(fd)
            else:
                os.link(self.cas.blob_path_str(hash_hex, executable), f"{base}/{path}")
                report.relinked.append((hash_hex, executable))
            files[path] = want
            children[parent] = children.get(parent, 0) + 1
            touched.add(parent)
            report.linked += 1
        self.record(entry, touched)
        self._watch(entry, [rel for rel in touched if rel in entry.dirs])
        return report

    def _make_dirs(self, entry: PooledDir, rel: str, touched: set[str], report: PatchReport) -> None:
        """mkdir `rel` and any missing parents, keeping child counts."""
        missing = []
        while rel and rel not in entry.dirs:
            missing.append(rel)
            rel = parent_of(rel)
        for path in reversed(missing):
            os.mkdir(f"{entry.path}/{path}", 0o755)
            entry.dirs[path] = (0, 0, 0)
            parent = parent_of(path)
            entry.children[parent] = entry.children.get(parent, 0) + 1
            touched.update((path, parent))
            report.made_dirs += 1

    def _prune(self, entry: PooledDir, rel: str, touched: set[str], report: PatchReport) -> None:
        """rmdir `rel` and its parents while they hold nothing."""
        while rel and entry.children.get(rel, 0) == 0 and rel in entry.dirs:
            os.rmdir(f"{entry.path}/{rel}")
            del entry.dirs[rel]
            wd = entry.watches.pop(rel, None)
            if wd is not None:
                self.watch.unwatch_directory(wd)
            entry.children.pop(rel, None)
            touched.discard(rel)
            parent = parent_of(rel)
            entry.children[parent] -= 1
            touched.add(parent)
            report.removed_dirs += 1
            rel = parent

    def record(self, entry: PooledDir, rels: Iterable[str] | None = None) -> None:
        """Remember the current (inode, mtime, ctime) of `rels` (all of the entry's dirs when None)."""
        base = str(entry.path)
        for rel in entry.dirs if rels is None else rels:
            if rel in entry.dirs or rel == "":
                info = os.lstat(f"{base}/{rel}" if rel else base)
                entry.dirs[rel] = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns)


def directories_for(paths: Iterable[str], extra: Iterable[str]) -> set[str]:
    """Every directory that must exist for `paths` (and the `extra` dirs with their parents); "" is the root."""
    needed = {""}
    for path in (*(p.rpartition("/")[0] for p in paths), *extra):
        while path and path not in needed:
            needed.add(path)
            path = path.rpartition("/")[0]
    return needed
