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
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from treemat.counters import Counters
from treemat.digest import EMPTY_DIGEST, Digest, check_hash
from treemat.errors import CasError, CorruptBlobError, MissingBlobError
from treemat.fsprims import LEGACY_MODES, blob_mode, file_kind, is_btrfs, reflink_fd, sweep_unlocked_files
from treemat.layout import Root
from treemat.locking import ForkGate, file_lock

BLOB_MTIME_NS = 946_684_800 * 1_000_000_000  # 2000-01-01T00:00:00Z: a blob whose mtime differs was written to
TOUCH_INTERVAL_NS = 3600 * 1_000_000_000
TEMP_GRACE_NS = 10 * 1_000_000_000  # a named temp file younger than this may still be about to be locked
_CHUNK = 1 << 20
_INGEST_CHUNK = 1 << 18  # read, hashed and written while still in the CPU's cache


@dataclass(frozen=True, slots=True)
class CasStats:
    """Size of the store."""

    blobs: int
    bytes: int
    executable_blobs: int
    quarantined: int


@dataclass(slots=True)
class VerifyReport:
    """Outcome of rehashing every blob."""

    checked: int = 0
    ok: int = 0
    corrupt: int = 0
    corrupt_blobs: list[str] = field(default_factory=list)


@dataclass(slots=True)
class GcReport:
    """Outcome of a garbage collection."""

    before_bytes: int = 0
    after_bytes: int = 0
    deleted_blobs: int = 0
    deleted_bytes: int = 0
    kept_in_use: int = 0


class ContentStore:
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
        self._touch_lock = threading.Lock()
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
                digest = _copy_and_hash(src_fd, temp.fd, source, reflink=self.ingest_reflinks)
                _check_expected(digest, expected_hash, expected_size, source)
                return self._publish(temp, digest, executable)
        _check_expected(digest, expected_hash, expected_size, source)
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
                raise _io_error(exc, "writing a blob") from None
            return self._publish(temp, digest, executable)

    @contextlib.contextmanager
    def _temp_blob(self) -> Iterator[_TempBlob]:
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

    def _open_temp(self) -> _TempBlob:
        try:
            temp = _TempBlob(os.open(self.tmp_dir, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600), None)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise _io_error(exc, f"creating a temp file in {self.tmp_dir}") from None
            temp = _TempBlob(*self._named_temp())
        return temp

    def _named_temp(self) -> tuple[int, str]:
        """Fallback temp file: held under an exclusive flock for its whole life, so sweeps can tell it is live."""
        path = f"{self.tmp_dir}/{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(6)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _io_error(exc, f"creating a temp file in {self.tmp_dir}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, path

    def _publish(self, temp: _TempBlob, digest: Digest, executable: bool) -> Digest:
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
                    raise _io_error(exc, f"publishing blob {digest}") from None
        except OSError as exc:
            raise _io_error(exc, f"publishing blob {digest}") from None
        self.counters.add("ingested_blobs")
        self.counters.add("ingested_bytes", digest.size)
        return digest

    # ------------------------------------------------------------------ integrity

    def quarantine(self, hash_hex: str, executable: bool, reason: str) -> None:
        """Move a blob out of service (kept under `<root>/quarantine` for inspection)."""
        path = self.blob_path(hash_hex, executable)
        target = self.quarantine_dir / f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
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

    def iter_blobs(self) -> Iterator[tuple[str, bool, Path]]:
        """Every (hash, executable, path) in the store."""
        for _hash_hex, _executable, entry in self._scan():
            name = entry.name
            executable = name.endswith("+x")
            yield (name[:-2] if executable else name), executable, Path(entry.path)

    def _scan(self) -> Iterator[tuple[str, bool, os.DirEntry[str]]]:
        """Every blob as a DirEntry (one getdents per shard, no Path objects): the fast path for gc and stats."""
        try:
            shards = sorted(entry.path for entry in os.scandir(self.cas_dir) if entry.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return
        for shard in shards:
            with contextlib.suppress(FileNotFoundError), os.scandir(shard) as entries:
                for entry in entries:
                    name = entry.name
                    executable = name.endswith("+x")
                    yield (name[:-2] if executable else name), executable, entry

    def verify_all(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Rehash every blob; corrupt ones are quarantined."""
        report = VerifyReport()
        for hash_hex, executable, _path in self.iter_blobs():
            report.checked += 1
            if self.verify(hash_hex, executable):
                report.ok += 1
            else:
                report.corrupt += 1
                report.corrupt_blobs.append(hash_hex + ("+x" if executable else ""))
                self.quarantine(hash_hex, executable, "content does not match its digest")
            if progress:
                progress(1)
        return report

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

    def gc(self, max_bytes: int) -> GcReport:
        """Delete least-recently-used blobs until the store fits in `max_bytes`; linked (in-use) blobs stay."""
        self.flush_touches()
        report = GcReport()
        with file_lock(self.gc_lock_path):
            entries: list[tuple[int, int, str]] = []
            pinned_bytes = 0
            for _hash, _executable, entry in self._scan():
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                path = entry.path
                report.before_bytes += info.st_size
                if info.st_nlink > 1:
                    report.kept_in_use += 1
                    pinned_bytes += info.st_size
                    continue
                entries.append((info.st_atime_ns, info.st_size, path))
            total = report.before_bytes
            for _atime, size, path in sorted(entries):
                if total <= max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    total -= size
                    report.deleted_blobs += 1
                    report.deleted_bytes += size
            report.after_bytes = total
            self.sweep_temp_files()
        return report

    def sweep_temp_files(self) -> int:
        """Remove named temp files no live writer holds (killed mid-ingest); returns how many.

        Liveness is the writer's flock, never a timestamp: a publish sets the sentinel mtime on its temp file
        before linking it, so an mtime says nothing. A file is taken only if its lock can be had and its ctime
        (which nobody can set back) is older than a short grace period covering create-then-lock.
        """
        # names not starting with a digit are not temp blobs (e.g. a probe's scratch directory)
        return sweep_unlocked_files(self.tmp_dir, grace_ns=TEMP_GRACE_NS, wanted=lambda name: name[:1].isdigit())

    def stats(self) -> CasStats:
        """Blob count and bytes."""
        blobs = total = executable_blobs = 0
        for _hash, executable, entry in self._scan():
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            blobs += 1
            total += size
            executable_blobs += executable
        quarantined = sum(1 for p in self.quarantine_dir.iterdir() if not p.name.endswith(".reason"))
        return CasStats(blobs=blobs, bytes=total, executable_blobs=executable_blobs, quarantined=quarantined)


@dataclass(slots=True)
class _TempBlob:
    """A temp file being written: its descriptor, and its name when it is not an unnamed O_TMPFILE."""

    fd: int
    name: str | None

    def seal(self) -> None:
        """Swap the writable descriptor for a read-only one (the write one's close event happens now)."""
        read_only = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        if self.name is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # a fresh named file is inside the sweep's grace period
            fcntl.flock(read_only, fcntl.LOCK_EX)
        os.close(self.fd)
        self.fd = read_only

    def close(self) -> None:
        """Close whichever descriptor is held."""
        os.close(self.fd)


def _fingerprint_ok(info: os.stat_result, executable: bool) -> bool:
    return (
        stat.S_ISREG(info.st_mode)
        and stat.S_IMODE(info.st_mode) == blob_mode(executable)
        and info.st_mtime_ns == BLOB_MTIME_NS
    )


def _check_expected(
    digest: Digest, expected_hash: str | None, expected_size: int | None, source: str | os.PathLike[str]
) -> None:
    if expected_hash is not None and digest.hash != expected_hash:
        raise CorruptBlobError(
            f"{source}: content hashes to {digest.hash[:16]}… but {expected_hash[:16]}… was expected "
            "(the file changed after Bazel digested it?)"
        )
    if expected_size is not None and digest.size != expected_size:
        raise CorruptBlobError(f"{source}: {digest.size} bytes, but its digest declares {expected_size}")


def _io_error(exc: OSError, doing: str) -> CasError:
    if exc.errno == errno.ENOSPC:
        return CasError(f"disk full while {doing}: free space or run `treemat cas gc`")
    return CasError(f"{exc.strerror or exc} while {doing}")


def _copy_and_hash(src_fd: int, dst_fd: int, source: str | os.PathLike[str], *, reflink: bool = False) -> Digest:
    """Copy src into the empty dst and hash exactly the bytes dst holds.

    With `reflink`, dst first shares src's extents (FICLONE) and is then read back and hashed. Otherwise, or
    where the reflink fails, one pass: each chunk read from src is hashed and written to dst, the same
    immutable bytes object for both, so the digest is of what was written.
    """
    hasher = hashlib.sha256()
    size = 0
    try:
        if reflink:
            try:
                reflink_fd(src_fd, dst_fd)
            except OSError:
                pass  # not here (another filesystem, no reflink support): copy below
            else:
                while chunk := os.read(dst_fd, _CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
                return Digest(hasher.hexdigest(), size)
        while chunk := os.read(src_fd, _INGEST_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]
    except OSError as exc:
        raise _io_error(exc, f"ingesting {source}") from None
    return Digest(hasher.hexdigest(), size)
