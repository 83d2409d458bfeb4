"""On-disk content-addressable store, keyed by (digest, executable).

Layout (Bazel `--disk_cache` compatible for plain blobs): `<root>/cas/<hh>/<hash>` (0o440) and
`<root>/cas/<hh>/<hash>+x` (0o550), so an executable and a plain copy of the same bytes never share an inode
and nobody ever chmods a shared blob. No blob is ever world-readable, and the root is private (0o700) unless
group sharing is asked for. Every blob's mtime is the sentinel BLOB_MTIME_NS: together with the fixed mode and
the size it forms a stat fingerprint (blobguard.py adds identity, a once-per-process hash and write watches).
Temp files are unnamed (O_TMPFILE) where the filesystem allows, published by linking `/proc/self/fd/N`: a
killed writer leaves nothing, and `gc` cannot mistake a live ingest for litter. LRU recency lives in atime.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from treemat.blobio import TempBlob, check_expected, copy_and_hash, io_error
from treemat.casmaint import StoreMaintenance
from treemat.counters import Counters
from treemat.digest import EMPTY_DIGEST, Digest, check_hash
from treemat.errors import CasError, MissingBlobError
from treemat.fsprims import BLOB_MTIME_NS, LEGACY_MODES, blob_mode, file_kind, is_btrfs
from treemat.layout import Root
from treemat.locking import ForkGate, file_lock

TOUCH_INTERVAL_NS = 3600 * 1_000_000_000
_CHUNK = 1 << 20


class ContentStore(StoreMaintenance):
    """The CAS. Safe for many threads and processes at once; publishes are atomic (link of an unnamed file)."""

    def __init__(self, layout: Root, *, counters: Counters) -> None:
        self.layout = layout
        self.root = layout.path
        self.cas_dir = layout.cas
        self.tmp_dir = layout.tmp
        self.quarantine_dir = layout.quarantine
        self.gc_lock_path = layout.gc_lock
        self.counters = counters
        self.dir_mode = layout.dir_mode
        self._cas_prefix = f"{self.cas_dir}/"
        self.fork_gate = ForkGate()
        # Ingest strategy, measured (benchmarks/bench_ingest.py): reading a reflinked copy back goes to the disk
        # (page cache is per inode), while the execroot file is usually hot; so one pass (read, hash, write) is
        # cheaper on ext4 and xfs. btrfs' buffered writes cost more than that read-back: reflink, then hash.
        self.ingest_reflinks = is_btrfs(self.tmp_dir)
        # "/" kept open: passing it makes os.link use linkat(AT_SYMLINK_FOLLOW) to publish /proc/self/fd/N (the
        # source is absolute, so which directory it names never matters)
        self._root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._root_fd)
        self._touched: dict[tuple[str, bool], int] = {}
        self._pending_touches: list[tuple[str, bool]] = []
        self._touch_lock = threading.Lock()  # also guards published_bytes
        self.published_bytes = 0  # bytes this process added to the store (the size budget's estimate grows by it)
        self.sweep_temp_files()

    # ------------------------------------------------------------------ paths and lookups

    def blob_path(self, hash_hex: str, executable: bool) -> Path:
        """Where the blob for (hash, executable) lives (whether or not it exists)."""
        return self.cas_dir / hash_hex[:2] / (hash_hex + ("+x" if executable else ""))

    def blob_path_str(self, hash_hex: str, executable: bool) -> str:
        """`blob_path` as a str, for hot loops."""
        return f"{self._cas_prefix}{hash_hex[:2]}/{hash_hex}{'+x' if executable else ''}"

    def lookup(self, hash_hex: str, executable: bool) -> Digest | None:
        """The blob's Digest if present and intact by its stat fingerprint; a tampered blob is quarantined."""
        if check_hash(hash_hex) == EMPTY_DIGEST.hash:
            return EMPTY_DIGEST
        try:
            info = os.lstat(self.blob_path_str(hash_hex, executable))
        except FileNotFoundError:
            return None
        if not _fingerprint_ok(info, executable) and not self.upgrade_legacy_mode(hash_hex, executable, info):
            self.quarantine(hash_hex, executable, "not a regular file, or stat fingerprint changed (mode or mtime)")
            return None
        self.counters.add("cas_hits")
        return Digest(hash_hex, info.st_size)

    def upgrade_legacy_mode(self, hash_hex: str, executable: bool, info: os.stat_result) -> bool:
        """A blob written by an older treemat (mode 0o444/0o555, otherwise intact) gets today's mode; True if so.

        Its content is not trusted for it: the chmod moves its ctime, so the blob guard hashes it on its next use.
        """
        if not (
            stat.S_ISREG(info.st_mode)
            and stat.S_IMODE(info.st_mode) == LEGACY_MODES[executable]
            and info.st_mtime_ns == BLOB_MTIME_NS
        ):
            return False
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(self.blob_path_str(hash_hex, executable), flags)
        except OSError:
            return False
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                return False
            os.fchmod(fd, blob_mode(executable))
        except OSError:
            return False
        finally:
            os.close(fd)
        self.counters.add("cas_legacy_mode_upgraded")
        return True

    def check_fingerprint(self, hash_hex: str, executable: bool, size: int | None = None) -> bool:
        """True if the blob still has its fixed mode, sentinel mtime (and `size`, when given)."""
        try:
            info = os.lstat(self.blob_path_str(hash_hex, executable))
        except FileNotFoundError:
            return True  # nothing served from here any more: nothing to poison
        return _fingerprint_ok(info, executable) and (size is None or info.st_size == size)

    # ------------------------------------------------------------------ ingest

    def ingest_file(
        self, source: str | os.PathLike[str], *, executable: bool, expected: str | Digest | None = None
    ) -> Digest:
        """Copy `source` into the CAS (reflink when possible), hashing it; verify against `expected`.

        Only regular files are taken: a FIFO, socket or device is refused without being opened for reading
        (O_NONBLOCK, then fstat), so it can never hang or flood the store.
        """
        expected_hash = expected.hash if isinstance(expected, Digest) else expected
        expected_size = expected.size if isinstance(expected, Digest) else None
        if expected_hash is not None:
            expected_hash = check_hash(expected_hash)
            known = self.lookup(expected_hash, executable)
            if known is not None and (expected_size is None or known.size == expected_size or known.is_empty):
                return known
        try:
            src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise MissingBlobError(f"cannot ingest {source}: no such file") from None
        except IsADirectoryError:
            raise CasError(f"cannot ingest {source}: it is a directory") from None
        except OSError as exc:
            raise CasError(f"cannot ingest {source}: {exc.strerror}") from None
        try:
            return self._ingest_open(src_fd, source, executable, expected_hash, expected_size)
        finally:
            os.close(src_fd)

    def ingest_fd(self, src_fd: int, *, executable: bool, what: str) -> Digest:
        """Copy the regular file open at `src_fd` into the CAS, hashing it (`what` names it in errors)."""
        return self._ingest_open(src_fd, what, executable, None, None)

    def _ingest_open(
        self,
        src_fd: int,
        source: str | os.PathLike[str],
        executable: bool,
        expected_hash: str | None,
        expected_size: int | None,
    ) -> Digest:
        info = os.fstat(src_fd)
        if not stat.S_ISREG(info.st_mode):
            raise CasError(f"cannot ingest {source}: it is a {file_kind(info.st_mode)}, not a regular file")
        if info.st_size == 0:
            digest = EMPTY_DIGEST
        else:
            with self._temp_blob() as temp:
                digest = copy_and_hash(src_fd, temp.fd, source, reflink=self.ingest_reflinks)
                check_expected(digest, expected_hash, expected_size, source)
                return self._publish(temp, digest, executable)
        check_expected(digest, expected_hash, expected_size, source)
        return digest

    def ingest_bytes(self, data: bytes, *, executable: bool) -> Digest:
        """Store an in-memory blob."""
        digest = Digest(hashlib.sha256(data).hexdigest(), len(data))
        if digest.is_empty:
            return digest
        known = self.lookup(digest.hash, executable)
        if known is not None:
            return known
        with self._temp_blob() as temp:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(temp.fd, view) :]
            except OSError as exc:
                raise io_error(exc, "writing a blob") from None
            return self._publish(temp, digest, executable)

    @contextlib.contextmanager
    def _temp_blob(self) -> Iterator[TempBlob]:
        """A fresh unnamed file in `<root>/tmp` (O_TMPFILE), or a named, flock-held one where unsupported.

        Held under the fork gate's shared side while the writable descriptor lives (see locking.ForkGate).
        """
        with self.fork_gate.writing():
            temp = self._open_temp()
            try:
                yield temp
            finally:
                temp.close()
                if temp.name is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp.name)

    def _open_temp(self) -> TempBlob:
        try:
            temp = TempBlob(os.open(self.tmp_dir, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600), None)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise io_error(exc, f"creating a temp file in {self.tmp_dir}") from None
            temp = TempBlob(*self._named_temp())
        return temp

    def _named_temp(self) -> tuple[int, str]:
        """Fallback temp file: held under an exclusive flock for its whole life, so sweeps can tell it is live."""
        path = f"{self.tmp_dir}/{os.getpid()}-{threading.get_ident()}-{os.urandom(6).hex()}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error(exc, f"creating a temp file in {self.tmp_dir}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, path

    def _publish(self, temp: TempBlob, digest: Digest, executable: bool) -> Digest:
        """Fix mode and mtime on the temp file, then link it into place; EEXIST means another writer won.

        The writable descriptor is closed *before* the link: its close is a write event (IN_CLOSE_WRITE), and
        once the blob is published a guard may be watching it.
        """
        final = self.blob_path_str(digest.hash, executable)
        root_fd = self._root_fd
        try:
            os.fchmod(temp.fd, blob_mode(executable))
            os.utime(temp.fd, ns=(time.time_ns(), BLOB_MTIME_NS))
            temp.seal()
            source = f"/proc/self/fd/{temp.fd}"
            try:
                os.link(source, final, src_dir_fd=root_fd, follow_symlinks=True)
            except FileNotFoundError:  # the shard directory does not exist yet
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.dirname(final), self.dir_mode)
                os.link(source, final, src_dir_fd=root_fd, follow_symlinks=True)
        except FileExistsError:
            if self.lookup(digest.hash, executable) is None:  # the existing one was tampered: replace it
                try:
                    os.link(source, final, src_dir_fd=root_fd, follow_symlinks=True)
                except OSError as exc:
                    raise io_error(exc, f"publishing blob {digest}") from None
        except OSError as exc:
            raise io_error(exc, f"publishing blob {digest}") from None
        with self._touch_lock:
            self.published_bytes += digest.size
        self.counters.add("ingested_blobs")
        self.counters.add("ingested_bytes", digest.size)
        return digest

    # ------------------------------------------------------------------ integrity

    def quarantine(self, hash_hex: str, executable: bool, reason: str) -> None:
        """Move a blob out of service (kept under `<root>/quarantine` for inspection)."""
        path = self.blob_path(hash_hex, executable)
        target = self.quarantine_dir / f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        with contextlib.suppress(OSError):
            (target.with_name(target.name + ".reason")).write_text(reason + "\n")
        self.counters.add("integrity_quarantined")

    def verify(self, hash_hex: str, executable: bool) -> bool:
        """Rehash one blob; False if missing or corrupt."""
        path = self.blob_path(hash_hex, executable)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False  # missing, or a symlink / special file where a blob should be
        try:
            hasher = hashlib.sha256()
            while chunk := os.read(fd, _CHUNK):
                hasher.update(chunk)
            info = os.fstat(fd)
        finally:
            os.close(fd)
        return hasher.hexdigest() == hash_hex and _fingerprint_ok(info, executable)

    # ------------------------------------------------------------------ LRU + GC

    def touch(self, hash_hex: str, executable: bool) -> None:
        """Note a use of a blob (LRU recency, at most once an hour per blob); `flush_touches` writes it out.

        Nothing is written on the request path: the atime updates happen in `flush_touches`, which the
        executor runs on its background thread.
        """
        self.touch_all([(hash_hex, executable)])

    def touch_all(self, keys: list[tuple[str, bool]]) -> None:
        """`touch` for many blobs: one clock read, one lock."""
        now = time.time_ns()
        with self._touch_lock:
            touched, pending = self._touched, self._pending_touches
            for key in keys:
                if now - touched.get(key, 0) >= TOUCH_INTERVAL_NS:
                    touched[key] = now
                    pending.append(key)

    def flush_touches(self) -> int:
        """Write the noted uses as blob atimes (mtime stays the sentinel); returns how many."""
        with self._touch_lock:
            pending, self._pending_touches = self._pending_touches, []
        now = time.time_ns()
        for hash_hex, executable in pending:
            with contextlib.suppress(OSError):
                os.utime(self.blob_path_str(hash_hex, executable), ns=(now, BLOB_MTIME_NS), follow_symlinks=False)
        return len(pending)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold while staging: GC (exclusive on the same lock) waits until every stager is done."""
        with file_lock(self.gc_lock_path, shared=True):
            yield


def _fingerprint_ok(info: os.stat_result, executable: bool) -> bool:
    return (
        stat.S_ISREG(info.st_mode)
        and stat.S_IMODE(info.st_mode) == blob_mode(executable)
        and info.st_mtime_ns == BLOB_MTIME_NS
    )
