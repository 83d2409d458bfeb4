"""Per-process guard that the CAS never serves a blob whose bytes are not its digest's.

The sandbox (sandbox.py) and copy-on-write placement keep *tools* from writing a blob. The guard covers
everything else that can reach the store: another program of the same user, a bad disk, an old treemat.

- Before each use (`admit`), the blob is `lstat`ed, never followed: it must be a regular file with the
  digest's size, the store's fixed mode and sentinel mtime, and the same (device, inode) as when it was
  verified. That catches truncation, replacement (by a file or a symlink), chmod and touched mtimes.
- A blob is trusted on that one `lstat` only while this process holds a live inotify watch on its inode
  (`/proc/self/fd/N`), placed before the blob was hashed (or matched in the verified ledger, ledger.py) and
  with no event since. A write through *any* link (IN_MODIFY), or opening it for writing at all
  (IN_CLOSE_WRITE, which also covers writes through mmap), queues an event, whatever mtime and mode are restored
  afterwards. `poll` drains the queue: the blob is quarantined and its inode tainted, so every action that had
  it staged fails instead of returning success. Blobs this process ingested itself are only watched.
- Fail closed. Every loss of that signal makes the blobs concerned untrusted (hashed on *every* use): no inotify
  (mode `none`), a watch not placed (ENOSPC) or dropped (the `max_watches` budget, IN_IGNORED), a queue overflow
  (every blob). Each loss bumps `trust_epoch`, which tells in-flight actions (executor.py) and pooled exec dirs
  (execpool.py) to hash what they staged again (`recheck`, `confirm`). The mode is in `describe()`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from treemat.blobstate import (
    EXEC_FILE_MODE,
    PLAIN_FILE_MODE,
    BlobIdentity,
    BlobKey,
    GuardMark,
    Recheck,
    StagedBlobs,
    hash_fd,
    hash_inode,
    stat_problem,
)
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import EMPTY_DIGEST, Digest
from treemat.fsprims import BLOB_MTIME_NS
from treemat.ledger import VerifiedLedger
from treemat.writewatch import SignalLog, WriteWatch, errno_name, inotify_flags

DEFAULT_MAX_WATCHES = 50_000
_EMPTY_HASH = EMPTY_DIGEST.hash  # the empty file has no blob
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class BlobGuard:
    """Trusts blobs it watches, hashes the ones it cannot watch on every use, fails actions that used a bad one."""

    def __init__(
        self,
        cas: ContentStore,
        watch: WriteWatch,
        *,
        counters: Counters,
        ledger: VerifiedLedger | None,
        max_watches: int | None = None,
    ) -> None:
        self.cas = cas
        self.watch = watch
        self.ledger = ledger
        self.counters = counters
        self.max_watches = DEFAULT_MAX_WATCHES if max_watches is None else max_watches
        self._lock = threading.Lock()
        # trusted on one lstat: only blobs with a live watch placed before they were verified, no event since
        self._verified: OrderedDict[BlobKey, tuple[BlobIdentity, int]] = OrderedDict()
        self._by_watch: dict[int, BlobKey] = {}
        self._watch_of: OrderedDict[BlobKey, tuple[int, BlobIdentity]] = OrderedDict()  # LRU for the budget
        self._tainted: set[BlobIdentity] = set()
        self.taint_reasons: dict[BlobIdentity, str] = {}
        self.taint_generation = 0  # bumped whenever an inode is tainted: a cheap "anything new?" check
        self.trust_epoch = 0  # bumped whenever a blob may be in use without a live watch
        self._overflows = 0
        self._signal = SignalLog()  # why the guard is not (only) on inotify
        self._inotify = watch.inotify
        if watch.why_not:
            self._signal.lost(watch.why_not)
            self.counters.add("guard_no_inotify")
        watch.serve(self._on_events, self._lost_locked)

    @property
    def watching(self) -> bool:
        """True when writes are caught by inotify (else every use hashes)."""
        return self._inotify is not None

    def describe(self) -> dict[str, object]:
        """The mode (`write_watch`) and why (`write_watch_detail`), for `treemat stats` / `probe`."""
        with self._lock:
            return self._signal.describe(self._inotify is not None)

    def mark(self) -> GuardMark:
        """The taint generation and trust epoch now (see GuardMark)."""
        return GuardMark(self.taint_generation, self.trust_epoch)

    def _lost_locked(self, reason: str, counter: str) -> None:
        with self._lock:
            self._lost(reason, counter)

    def _lost(self, reason: str, counter: str) -> None:
        """Note a loss of signal (lock held)."""
        self._signal.lost(reason)
        self.trust_epoch += 1
        self.counters.add(counter)

    # ----------------------------------------------------------------------------------------- admission

    def admit(self, hash_hex: str, executable: bool, size: int) -> BlobIdentity | None:
        """Check a blob right before it is staged; None if absent (or just quarantined: the caller re-ingests)."""
        return admitted[0] if (admitted := self.admit_sized(hash_hex, executable, size)) is not None else None

    def admit_sized(self, hash_hex: str, executable: bool, size: int | None = None) -> tuple[BlobIdentity, int] | None:
        """`admit`, also for a blob whose size the caller does not know yet (None): (identity, size) or None. An
        unknown size is what this process verified before, else the blob's own (then hashed, or matched in the
        verified ledger under a live watch, as always)."""
        key = (hash_hex, executable)
        path = self.cas.blob_path_str(hash_hex, executable)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            with self._lock:
                self._verified.pop(key, None)
            return None
        known = self._verified.get(key)  # a dict read is atomic: no lock on the hot path
        if size is None:
            size = known[1] if known is not None else info.st_size
        if (
            known is not None
            and info.st_ino == known[0].inode
            and info.st_dev == known[0].device
            and info.st_size == size
            and info.st_mtime_ns == BLOB_MTIME_NS
            and info.st_mode == (EXEC_FILE_MODE if executable else PLAIN_FILE_MODE)
        ):
            return known[0], size
        reason = stat_problem(info, executable, size)
        if known is not None and reason is None:
            reason = "the blob file was replaced"
        if reason is not None and not (
            known is None and info.st_size == size and self.cas.upgrade_legacy_mode(hash_hex, executable, info)
        ):
            self._reject(key, reason)
            return None
        identity = self._verify_and_watch(key, path, size, rehash=True)
        return (identity, size) if identity is not None else None

    def obtain(
        self, source: str | os.PathLike[str], expected: str | None, executable: bool, size: int | None
    ) -> tuple[Digest, BlobIdentity | None] | None:
        """`source`'s admitted blob in one call: the store's (stamped), else `source` ingested and watched; or None."""
        if expected == _EMPTY_HASH:
            return EMPTY_DIGEST, None  # the empty file: no blob inode
        if expected is not None and (admitted := self.admit_sized(expected, executable, size)) is not None:
            self.cas.touch(expected, executable)  # LRU recency for `cas gc`, throttled to once an hour per blob
            return Digest(expected, admitted[1]), admitted[0]
        digest = self.cas.ingest_file(source, executable=executable, expected=expected)
        if not digest.size:
            return digest, None
        key = (digest.hash, executable)  # just hashed by the ingest: watched, not hashed again
        identity = self._verify_and_watch(key, self.cas.blob_path_str(*key), digest.size, rehash=False)
        return (digest, identity) if identity is not None else None

    def _verify_and_watch(self, key: BlobKey, path: str, size: int, *, rehash: bool) -> BlobIdentity | None:
        hash_hex, executable = key
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._reject(key, "the blob is a symlink")
                return None
            raise
        try:
            info = os.fstat(fd)
            reason = stat_problem(info, executable, size)
            if reason is not None:
                self._reject(key, reason)
                return None
            identity = BlobIdentity(info.st_dev, info.st_ino)
            overflows = self._overflows
            watch = self._watch(fd, key, identity)
            info = os.fstat(fd)  # after the watch: any later write to this inode is an event
            trusted = watch is not None and self.ledger is not None and self.ledger.matches(key, info)
            if trusted:
                self.counters.add("guard_ledger_trusted")
            elif rehash or watch is None:
                self.counters.add("guard_hashed_blobs")
                self.counters.add("guard_hashed_bytes", size)
                if watch is None:
                    self.counters.add("guard_unwatched_hashed_blobs")
                    self.counters.add("guard_unwatched_hashed_bytes", size)
                if hash_fd(fd) != hash_hex:
                    self._reject(key, "content does not match its digest", taint=identity)
                    return None
            if watch is not None and not trusted and self.ledger is not None:
                self.ledger.record(key, info)
        finally:
            os.close(fd)
        with self._lock:
            live = self._watch_of.get(key)
            if watch is not None and live is not None and live[0] == watch and self._overflows == overflows:
                self._verified[key] = (identity, size)
                self._verified.move_to_end(key)
            else:  # no watch, or it was lost meanwhile: good for this use only
                self._verified.pop(key, None)
                self.trust_epoch += 1
        return identity

    def _watch(self, fd: int, key: BlobKey, identity: BlobIdentity) -> int | None:
        if self._inotify is None:
            return None
        mask = inotify_flags.MODIFY | inotify_flags.CLOSE_WRITE
        stale: list[int] = []
        wd: int | None = None
        with self._lock:
            old = self._watch_of.pop(key, None)
            if old is not None:
                self._by_watch.pop(old[0], None)
            while self._watch_of and len(self._watch_of) >= self.max_watches:
                stale.append(self._drop_oldest_watch())
            if self.max_watches <= 0:
                self._lost(f"watch budget of {self.max_watches} reached", "guard_watch_budget_drops")
            else:
                try:
                    wd = int(self._inotify.add_watch(f"/proc/self/fd/{fd}", mask))
                    self._by_watch[wd] = key
                    self._watch_of[key] = (wd, identity)
                except OSError as exc:
                    self._lost(f"a blob watch failed ({errno_name(exc)})", "guard_watch_failures")
            if old is not None and old[0] != wd:
                stale.append(old[0])
        for gone in stale:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(gone)
        return wd

    def _drop_oldest_watch(self) -> int:
        """Over budget (lock held): the least recently verified blob loses its watch, so its trust."""
        key, (wd, _identity) = self._watch_of.popitem(last=False)
        self._by_watch.pop(wd, None)
        self._verified.pop(key, None)
        self._lost(f"watch budget of {self.max_watches} reached", "guard_watch_budget_drops")
        return wd

    # ----------------------------------------------------------------------------------------- taint

    def poll(self) -> list[BlobKey]:
        """Drain the write-watch queue: each written blob is tainted and quarantined (directory watchers are told);
        returns the blobs hit. After a queue overflow every blob is untrusted (hashed again on its next use)."""
        return self.watch.poll()

    def _on_events(self, events: list[Any]) -> list[BlobKey]:
        """The events of blob watches (and a queue overflow), from `WriteWatch.poll`."""
        hit: dict[BlobKey, str] = {}
        for event in events:
            ignored = bool(event.mask & inotify_flags.IGNORED)
            with self._lock:
                if event.mask & inotify_flags.Q_OVERFLOW:
                    self._verified.clear()
                    self._overflows += 1
                    self._lost("the inotify queue overflowed (events lost)", "guard_queue_overflows")
                    continue
                key = self._by_watch.get(event.wd)
                if ignored and key is not None:
                    self._by_watch.pop(event.wd, None)
                    live = self._watch_of.get(key)
                    if live is not None and live[0] == event.wd:
                        del self._watch_of[key]
                        self._verified.pop(key, None)
                        self._lost("a blob watch was removed by the kernel (IN_IGNORED)", "guard_watches_lost")
            if key is None or ignored:
                continue
            names = "|".join(flag.name or "?" for flag in inotify_flags.from_mask(event.mask))
            hit[key] = f"{hit[key]},{names}" if key in hit else names
        for key, names in hit.items():
            self._reject(key, f"written to while in the store (inotify {names})", written=True)
        return list(hit)

    def tainted(self, identities: set[BlobIdentity]) -> bool:
        """True if any of these inodes was written to since it was verified."""
        with self._lock:
            return not self._tainted.isdisjoint(identities)

    def _reject(self, key: BlobKey, reason: str, *, written: bool = False, taint: BlobIdentity | None = None) -> None:
        """Quarantine a bad blob and stop watching it; its inode is tainted if it was written (`written`: the
        watched one; `taint`: this one, whose bytes were found wrong). Only a write taints an inode (and fails the
        actions that staged it): a blob merely replaced or chmodded is taken out of service, but the inode an
        action staged kept its bytes. (A tainted inode stays alive in the quarantine, so its number is not reused.)
        """
        hash_hex, executable = key
        with self._lock:
            self._verified.pop(key, None)
            watched = self._watch_of.pop(key, None)
            if watched is not None:
                self._by_watch.pop(watched[0], None)
                if written and taint is None:
                    taint = watched[1]
            if taint is not None:
                self._taint(taint, reason)
            self.trust_epoch += 1  # a pooled dir may still link the old inode, now unwatched
        if watched is not None and self._inotify is not None:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(watched[0])
        self.counters.add("guard_rejected")
        self.cas.quarantine(hash_hex, executable, reason)

    def _taint(self, identity: BlobIdentity, reason: str) -> None:
        """The inode was written (lock held): every action that staged it fails."""
        self._tainted.add(identity)
        self.taint_reasons[identity] = reason
        self.taint_generation += 1

    # ----------------------------------------------------------------------------------------- re-verification

    def trusted(self, key: BlobKey, identity: BlobIdentity) -> bool:
        """True while `identity` is the blob of `key` under a live watch with no event since."""
        return (known := self._verified.get(key)) is not None and known[0] == identity

    def confirm(self, key: BlobKey, identity: BlobIdentity) -> bool:
        """True if `identity` is still the good blob of `key`: trusted, else admitted again (hashed if unwatched)."""
        if self.trusted(key, identity):
            return True
        return (admitted := self.admit_sized(*key)) is not None and admitted[0] == identity

    def recheck(self, staged: StagedBlobs, exec_dir: str, *, rehash: bool) -> Recheck:
        """After an action whose mark moved, in one call: when `rehash`, hash again every staged inode not trusted
        now (a wrong one is tainted; one not found at its CAS path nor at `exec_dir`/path is `missing`) and drain
        the queue (`hit`); then which staged inodes are tainted, with why, by path."""
        missing: list[str] = []
        hit: list[BlobKey] = []
        if rehash:
            self.poll()
            for identity, (path, key) in staged.items():
                if not self.trusted(key, identity) and not self._rehash_inode(identity, key, f"{exec_dir}/{path}"):
                    missing.append(path)
            hit = self.poll()
        with self._lock:
            bad = [(path, self.taint_reasons[who]) for who, (path, _key) in staged.items() if who in self._tainted]
        return Recheck(hit, missing, sorted(bad))

    def _rehash_inode(self, identity: BlobIdentity, key: BlobKey, staged_path: str) -> bool:
        """Hash the inode `identity` (found at the blob's CAS path or where it was staged); False if not found."""
        cas_path = self.cas.blob_path_str(*key)
        found = hash_inode(identity, (cas_path, staged_path))
        if found is None:
            return False
        self.counters.add("guard_rechecked_blobs")
        where, hash_hex = found
        if hash_hex != key[0]:
            reason = "content does not match its digest (hashed again after the action: it had no live watch)"
            if where == cas_path:
                self._reject(key, reason, taint=identity)
            else:
                with self._lock:
                    self._taint(identity, reason)
        return True

    # ----------------------------------------------------------------------------------------- ledger, close

    def refresh(self, keys: Iterable[BlobKey]) -> int:
        """Record in the ledger the new state (our own links and unlinks moved their ctime) of watched blobs.

        Each blob is `lstat`ed first, then the event queue is drained: a blob written meanwhile is rejected, not
        recorded. Run it off the request path (the executor's background thread). Returns how many were recorded.
        """
        if self.ledger is None or self._inotify is None:
            return 0
        seen: list[tuple[BlobKey, os.stat_result]] = []
        for key in set(keys):
            known = self._verified.get(key)
            if known is None:
                continue
            try:
                info = os.lstat(self.cas.blob_path_str(*key))
            except OSError:
                continue
            if info.st_ino == known[0].inode and info.st_dev == known[0].device:
                seen.append((key, info))
        self.poll()
        recorded = 0
        for key, info in seen:
            if key in self._verified:
                self.ledger.record(key, info)
                recorded += 1
        self.ledger.flush()
        return recorded

    def close(self) -> None:
        """Flush the ledger and stop using inotify (the stack closes the shared instance)."""
        if self.ledger is not None:
            self.ledger.close()
        self._inotify = None
