"""The store's offline half: scan every blob, rehash them all, collect garbage, count.

`ContentStore` (cas.py) inherits it; `treemat cas verify|gc|stats` and the size budget (budget.py) use it. What
serving a build needs (lookups, ingest, quarantine) stays in cas.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from treemat.fsprims import sweep_unlocked_files
from treemat.locking import file_lock

TEMP_GRACE_NS = 10 * 1_000_000_000  # a named temp file younger than this may still be about to be locked


class CasStats(NamedTuple):
    """Size of the store."""

    blobs: int
    bytes: int
    executable_blobs: int
    quarantined: int


class VerifyReport:
    """Outcome of rehashing every blob."""

    __slots__ = ("checked", "corrupt", "corrupt_blobs", "ok")

    def __init__(self, checked: int = 0, ok: int = 0, corrupt: int = 0, corrupt_blobs: list[str] | None = None) -> None:
        self.checked = checked
        self.ok = ok
        self.corrupt = corrupt
        self.corrupt_blobs: list[str] = [] if corrupt_blobs is None else corrupt_blobs

    def to_json(self) -> dict[str, object]:
        """For `--json`."""
        return {"checked": self.checked, "ok": self.ok, "corrupt": self.corrupt, "corrupt_blobs": self.corrupt_blobs}


class GcReport:
    """Outcome of a garbage collection."""

    __slots__ = ("after_bytes", "before_bytes", "deleted_blobs", "deleted_bytes", "kept_in_use")

    def __init__(
        self,
        before_bytes: int = 0,
        after_bytes: int = 0,
        deleted_blobs: int = 0,
        deleted_bytes: int = 0,
        kept_in_use: int = 0,
    ) -> None:
        self.before_bytes = before_bytes
        self.after_bytes = after_bytes
        self.deleted_blobs = deleted_blobs
        self.deleted_bytes = deleted_bytes
        self.kept_in_use = kept_in_use

    def to_json(self) -> dict[str, object]:
        """For `--json`."""
        return {name: getattr(self, name) for name in self.__slots__}


class StoreMaintenance:
    """Scan, verify, gc and stats over a store's directories (mixed into ContentStore)."""

    cas_dir: Path
    quarantine_dir: Path
    gc_lock_path: Path
    tmp_dir: Path

    def blob_path(self, hash_hex: str, executable: bool) -> Path:
        raise NotImplementedError

    def quarantine(self, hash_hex: str, executable: bool, reason: str) -> None:
        raise NotImplementedError

    def verify(self, hash_hex: str, executable: bool) -> bool:
        raise NotImplementedError

    def flush_touches(self) -> int:
        raise NotImplementedError

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

    def sweep_temp_files(self) -> int:
        """Remove named temp files no live writer holds (killed mid-ingest); returns how many.

        Liveness is the writer's flock, never a timestamp: a publish sets the sentinel mtime on its temp file
        before linking it, so an mtime says nothing. A file is taken only if its lock can be had and its ctime
        (which nobody can set back) is older than a short grace period covering create-then-lock.
        """
        # names not starting with a digit are not temp blobs (e.g. a probe's scratch directory)
        return sweep_unlocked_files(self.tmp_dir, grace_ns=TEMP_GRACE_NS, wanted=lambda name: name[:1].isdigit())
