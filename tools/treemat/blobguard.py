"""Per-process guard that the CAS never serves a blob whose bytes are not its digest's.

The sandbox (sandbox.py) and copy-on-write placement keep *tools* from writing a blob. The guard covers
everything else that can reach the store: another program of the same user, a bad disk, an old treemat.

- Before each use (`admit`), the blob is `lstat`ed, never followed: it must be a regular file with the
  digest's size, the store's fixed mode and sentinel mtime, and the same (device, inode) as when it was
  verified. That catches truncation, replacement (by a file or a symlink), chmod and touched mtimes.
- The first time a process uses a blob it hashes it, through an `O_NOFOLLOW` descriptor, and puts an inotify
  watch on that very inode (`/proc/self/fd/N`). From then on, a write through *any* link (IN_MODIFY), or
  opening it for writing at all (IN_CLOSE_WRITE, which also covers writes through mmap), queues an event,
  whatever mtime and mode are restored afterwards. `poll` drains the queue: the blob is quarantined and its
  identity is remembered as tainted, so every action that had it staged fails instead of returning success.
  Blobs this process ingested itself were hashed on the way in and are only watched.
- Without inotify (macOS) or past the watch budget, a blob is re-hashed on every first use per process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from treemat.cas import BLOB_MTIME_NS, ContentStore
from treemat.counters import Counters
from treemat.fsprims import blob_mode

try:  # Linux only; elsewhere every first use per process re-hashes
    from inotify_simple import INotify
    from inotify_simple import flags as inotify_flags
except ImportError:  # pragma: no cover - non-Linux
    INotify = None  # type: ignore[assignment,misc]
    inotify_flags = None  # type: ignore[assignment]

DEFAULT_MAX_WATCHES = 50_000
_PLAIN_FILE_MODE = stat.S_IFREG | blob_mode(False)
_EXEC_FILE_MODE = stat.S_IFREG | blob_mode(True)
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class BlobIdentity:
    """The inode a verified blob lives in."""

    device: int
    inode: int


class BlobGuard:
    """Verifies blobs once per process, watches them for writes, and fails actions that used a tainted one."""

    def __init__(
        self,
        cas: ContentStore,
        *,
        counters: Counters | None = None,
        max_watches: int | None = None,
        ledger: VerifiedLedger | None = None,
    ) -> None:
        self.cas = cas
        self.ledger = ledger
        self.counters = counters if counters is not None else cas.counters
        self.max_watches = DEFAULT_MAX_WATCHES if max_watches is None else max_watches
        self._lock = threading.Lock()
        self._verified: OrderedDict[tuple[str, bool], tuple[BlobIdentity, int]] = OrderedDict()
        self._by_watch: dict[int, tuple[str, bool]] = {}
        self._watch_of: dict[tuple[str, bool], int] = {}
        self._tainted: set[BlobIdentity] = set()
        self.taint_reasons: dict[BlobIdentity, str] = {}
        self.taint_generation = 0  # bumped whenever an inode is tainted: a cheap "anything new?" check
        self._dir_watch: dict[int, Callable[[], None]] = {}
        self._poll_lock = threading.Lock()  # one reader of the event queue at a time
        self._inotify = _open_inotify()

    @property
    def watching(self) -> bool:
        """True when writes are caught by inotify (else only by the per-use stat and per-process hash)."""
        return self._inotify is not None

    # ----------------------------------------------------------------------------------------- admission

    def admit(self, hash_hex: str, executable: bool, size: int) -> BlobIdentity | None:
        """Check a blob right before it is staged; None if absent (or just quarantined: the caller re-ingests)."""
        admitted = self.admit_sized(hash_hex, executable, size)
        return admitted[0] if admitted is not None else None

    def admit_sized(self, hash_hex: str, executable: bool, size: int | None = None) -> tuple[BlobIdentity, int] | None:
        """`admit`, also for a blob whose size the caller does not know yet (None): (identity, size) or None.

        An unknown size is taken from what this process verified before, else from the blob itself (whose
        first use in this process is then hashed, or matched in the verified ledger, as always).
        """
        key = (hash_hex, executable)
        path = self.cas.blob_path_str(hash_hex, executable)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self._forget(key)
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
            and info.st_mode == (_EXEC_FILE_MODE if executable else _PLAIN_FILE_MODE)
        ):
            return known[0], size
        reason = _stat_problem(info, executable, size)
        if known is not None and reason is None:
            reason = "the blob file was replaced"
        if reason is not None and not (
            known is None and info.st_size == size and self.cas.upgrade_legacy_mode(hash_hex, executable, info)
        ):
            self._reject(key, reason)
            return None
        identity = self._verify_and_watch(key, path, size, rehash=True)
        return (identity, size) if identity is not None else None

    def admit_ingested(self, hash_hex: str, executable: bool, size: int) -> BlobIdentity | None:
        """Register a blob this process has just hashed on ingest: watched, not hashed again."""
        return self._verify_and_watch(
            (hash_hex, executable), self.cas.blob_path_str(hash_hex, executable), size, rehash=False
        )

    def _verify_and_watch(self, key: tuple[str, bool], path: str, size: int, *, rehash: bool) -> BlobIdentity | None:
        hash_hex, executable = key
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._reject(key, "the blob is a symlink")
                return None
            raise
        try:
            reason = _stat_problem(os.fstat(fd), executable, size)
            if reason is not None:
                self._reject(key, reason)
                return None
            watch = self._watch(fd, key)
            info = os.fstat(fd)  # after the watch: any later write to this inode is an event
            trusted = watch is not None and self.ledger is not None and self.ledger.matches(key, info)
            if trusted:
                self.counters.add("guard_ledger_trusted")
            elif rehash or watch is None:
                self.counters.add("guard_hashed_blobs")
                self.counters.add("guard_hashed_bytes", size)
                if _hash_fd(fd) != hash_hex:
                    self._reject(key, "content does not match its digest")
                    return None
            if watch is not None and not trusted and self.ledger is not None:
                self.ledger.record(key, info)
        finally:
            os.close(fd)
        identity = BlobIdentity(info.st_dev, info.st_ino)
        with self._lock:
            self._verified[key] = (identity, size)
            self._verified.move_to_end(key)
        return identity

    def _watch(self, fd: int, key: tuple[str, bool]) -> int | None:
        if self._inotify is None:
            return None
        mask = inotify_flags.MODIFY | inotify_flags.CLOSE_WRITE
        with self._lock:
            if len(self._watch_of) >= self.max_watches:
                self._drop_oldest_watch()
            try:
                wd = int(self._inotify.add_watch(f"/proc/self/fd/{fd}", mask))
            except OSError:
                return None  # out of watches (fs.inotify.max_user_watches): this blob is re-hashed per use
            self._by_watch[wd] = key
            self._watch_of[key] = wd
        return wd

    def _drop_oldest_watch(self) -> None:
        """Over budget: forget the least recently verified blob (it will be hashed again on its next use)."""
        for key in self._verified:
            wd = self._watch_of.pop(key, None)
            if wd is not None:
                self._by_watch.pop(wd, None)
                del self._verified[key]
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(wd)  # type: ignore[union-attr]
                return

    # ----------------------------------------------------------------------------------------- taint

    def poll(self) -> list[tuple[str, bool]]:
        """Drain the event queue: each written blob is tainted and quarantined; directory watchers are told.

        Returns the blobs hit. If the kernel's queue overflowed, nothing verified can be trusted: every blob is
        forgotten (hashed again on its next use) and every directory watcher is told.
        """
        if self._inotify is None:
            return []
        with self._poll_lock:
            try:
                events = self._inotify.read(timeout=0)
            except BlockingIOError:
                events = []
        hit: list[tuple[str, bool]] = []
        why: dict[tuple[str, bool], str] = {}
        notify: list[Callable[[], None]] = []
        for event in events:
            if event.mask & inotify_flags.Q_OVERFLOW:
                with self._lock:
                    self._verified.clear()
                    notify.extend(self._dir_watch.values())
                self.counters.add("guard_queue_overflows")
                continue
            with self._lock:
                key = self._by_watch.get(event.wd)
                on_dir_event = self._dir_watch.get(event.wd)
                if event.mask & inotify_flags.IGNORED:
                    self._dir_watch.pop(event.wd, None)
            if on_dir_event is not None:
                notify.append(on_dir_event)
            if key is None or event.mask & inotify_flags.IGNORED:
                continue
            if key not in hit:
                hit.append(key)
            names = "|".join(flag.name or "?" for flag in inotify_flags.from_mask(event.mask))
            why[key] = f"{why[key]},{names}" if key in why else names
        for key in hit:
            self._reject(key, f"written to while in the store (inotify {why[key]})", written=True)
        for callback in notify:
            callback()
        return hit

    def watch_directory(self, path: str, on_event: Callable[[], None]) -> int | None:
        """Call `on_event` (from `poll`) whenever an entry of `path` is created, removed, renamed or chmodded.

        None when there is no inotify (the caller then verifies by `lstat`).
        """
        if self._inotify is None:
            return None
        mask = (
            inotify_flags.CREATE
            | inotify_flags.DELETE
            | inotify_flags.MOVED_FROM
            | inotify_flags.MOVED_TO
            | inotify_flags.ATTRIB
            | inotify_flags.DELETE_SELF
            | inotify_flags.MOVE_SELF
            | inotify_flags.ONLYDIR
            | inotify_flags.DONT_FOLLOW
        )
        try:
            wd = int(self._inotify.add_watch(path, mask))
        except OSError:
            return None
        with self._lock:
            self._dir_watch[wd] = on_event
        return wd

    def unwatch_directory(self, wd: int) -> None:
        """Stop watching a directory (gone already is fine)."""
        with self._lock:
            self._dir_watch.pop(wd, None)
        if self._inotify is not None:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)

    def tainted(self, identities: set[BlobIdentity]) -> bool:
        """True if any of these inodes was written to since it was verified."""
        with self._lock:
            return not self._tainted.isdisjoint(identities)

    def _reject(self, key: tuple[str, bool], reason: str, *, written: bool = False) -> None:
        """Quarantine a bad blob and stop watching it; `written`: its inode was written to, so it is tainted.

        Only a write taints an inode (and fails the actions that staged it). A blob that was merely replaced or
        chmodded is taken out of service, but the inode an action staged kept its bytes. (A tainted inode stays
        alive in the quarantine directory, so its number cannot be reused by another file.)
        """
        hash_hex, executable = key
        with self._lock:
            known = self._verified.pop(key, None)
            wd = self._watch_of.pop(key, None)
            if wd is not None:
                self._by_watch.pop(wd, None)
            if known is not None and written:
                self._tainted.add(known[0])
                self.taint_reasons[known[0]] = reason
                self.taint_generation += 1
        if wd is not None and self._inotify is not None:
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)
        self.counters.add("guard_rejected")
        self.cas.quarantine(hash_hex, executable, reason)

    def refresh(self, keys: Iterable[tuple[str, bool]]) -> int:
        """Record in the ledger the new state (our own links and unlinks moved their ctime) of watched blobs.

        Each blob is `lstat`ed first, then the event queue is drained: a blob written meanwhile is rejected, not
        recorded. Run it off the request path (the executor's background thread). Returns how many were recorded.
        """
        if self.ledger is None or self._inotify is None:
            return 0
        seen: list[tuple[tuple[str, bool], os.stat_result]] = []
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

    def _forget(self, key: tuple[str, bool]) -> None:
        with self._lock:
            self._verified.pop(key, None)

    def close(self) -> None:
        """Flush the ledger and release the inotify descriptor."""
        if self.ledger is not None:
            self.ledger.close()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


def _stat_problem(info: os.stat_result, executable: bool, size: int) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "the blob is not a regular file"
    if info.st_size != size:
        return f"the blob has {info.st_size} bytes, its digest says {size}"
    if stat.S_IMODE(info.st_mode) != blob_mode(executable):
        return f"the blob's mode changed to {stat.S_IMODE(info.st_mode):o}"
    if info.st_mtime_ns != BLOB_MTIME_NS:
        return "the blob's mtime changed (written to)"
    return None


def _hash_fd(fd: int) -> str:
    hasher = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest()


def _open_inotify() -> INotify | None:
    if INotify is None:
        return None
    try:
        # non-blocking: two threads may both see events pending (FIONREAD) and both read; the second must get
        # EAGAIN, not block until some future event (that hung a worker)
        return INotify(nonblocking=True)
    except OSError:
        return None


class VerifiedLedger:
    """Blob states known good, shared by every treemat process of one root: (inode, ctime, size) per blob.

    A process that hashed a blob, or that holds an inotify watch on it and saw no write, appends the blob's
    current (inode, ctime, size) to its own log under `<root>/verified/`. A new process trusts a blob without
    hashing it when, *after* putting its own watch on it, the blob still has exactly a recorded state: ctime
    moves on every write, chmod or link, and nobody can set it back. Our own links and unlinks move it too, so
    workers re-record after staging and removal (in the background). A state that is not recorded is hashed.
    What the ledger does not stop: someone who forges the ledger itself (same user, on purpose).
    """

    COMPACT_AFTER_FILES = 16

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._records = self._load()
        self._pending: list[str] = []
        path = self.directory / f"{os.getpid()}-{secrets.token_hex(4)}.log"
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # held for our whole life: compaction never removes a live log

    def matches(self, key: tuple[str, bool], info: os.stat_result) -> bool:
        """True if `info` is exactly a recorded good state of the blob."""
        record = self._records.get(key)
        return record is not None and record == (info.st_ino, info.st_ctime_ns, info.st_size)

    def record(self, key: tuple[str, bool], info: os.stat_result) -> None:
        """Note a good state (written out by `flush`)."""
        state = (info.st_ino, info.st_ctime_ns, info.st_size)
        hash_hex, executable = key
        with self._lock:
            self._records[key] = state
            self._pending.append(f"{hash_hex}{'+x' if executable else ''} {state[0]} {state[1]} {state[2]}\n")
            full = len(self._pending) >= 4096
        if full:
            self.flush()

    def flush(self) -> None:
        """Append the noted states to this process's log."""
        with self._lock:
            pending, self._pending = self._pending, []
            fd = self._fd
        if pending and fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, "".join(pending).encode())

    def close(self) -> None:
        """Flush and close this process's log."""
        self.flush()
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _load(self) -> dict[tuple[str, bool], tuple[int, int, int]]:
        records: dict[tuple[str, bool], tuple[int, int, int]] = {}
        logs = sorted(self.directory.glob("*.log"))
        for log in logs:
            try:
                text = log.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                fields = line.split()
                if len(fields) != 4 or not all(part.isdigit() for part in fields[1:]):
                    continue  # a torn or foreign line: ignored, the blob is hashed instead
                name = fields[0]
                key = (name[:-2], True) if name.endswith("+x") else (name, False)
                state = (int(fields[1]), int(fields[2]), int(fields[3]))
                if key not in records or state[1] >= records[key][1]:
                    records[key] = state
        if len(logs) > self.COMPACT_AFTER_FILES:
            self._compact(records, logs)
        return records

    def _compact(self, records: dict[tuple[str, bool], tuple[int, int, int]], logs: list[Path]) -> None:
        """Write the merged records to one log, then remove the logs no live process holds."""
        lines = [f"{h}{'+x' if x else ''} {ino} {ctime} {size}\n" for (h, x), (ino, ctime, size) in records.items()]
        temp = self.directory / f".compact-{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(OSError):
            temp.write_text("".join(lines))
            os.chmod(temp, 0o600)
            os.replace(temp, self.directory / f"0-compact-{secrets.token_hex(4)}.log")
            for log in logs:
                with contextlib.suppress(OSError):
                    fd = os.open(log, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        log.unlink()
                    except OSError:
                        pass  # a live writer's log
                    finally:
                        os.close(fd)
