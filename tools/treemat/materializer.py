"""Build an input tree on disk from the CAS, file by file, with bounded concurrency (the plain Stager).

Directories are created 0o755 (an action may create outputs anywhere); files come out read-only
(0o440, executables 0o550). Files are placed in batches (~64 per task): on 2 cores a thread per file costs
1.5-4x more than a plain loop, while batches break even and let slow filesystems overlap I/O.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

from treemat.backends import BackendProbe, Method, place_file
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.errors import MaterializeError, MissingBlobError, TreematError
from treemat.fsprims import blob_mode, remove_tree
from treemat.staging import Progress, StageReport
from treemat.tree import DirectoryNode, FileNode, InputTree

_FALLBACK_ERRNOS = {
    errno.EXDEV,
    errno.EMLINK,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EINVAL,
    errno.EPERM,
    errno.ENOTTY,
    errno.ENOSYS,
}


class MaterializeReport:
    """What building (part of) a tree did: counts per method, sizes, time, and the hardlinked blobs."""

    __slots__ = ("bytes", "directories", "files", "hardlinked", "methods", "seconds", "symlinks")

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.directories = 0
        self.symlinks = 0
        self.methods: dict[str, int] = {}
        self.hardlinked: list[tuple[str, bool]] = []
        self.seconds = 0.0

    def count(self, method: str, amount: int = 1) -> None:
        """Record `amount` files placed with `method`."""
        self.methods[method] = self.methods.get(method, 0) + amount

    def merge(self, other: MaterializeReport) -> None:
        """Add another report's figures into this one (time excluded)."""
        self.files += other.files
        self.bytes += other.bytes
        self.directories += other.directories
        self.symlinks += other.symlinks
        for name, amount in other.methods.items():
            self.count(name, amount)
        self.hardlinked.extend(other.hardlinked)


FileJob = tuple[FileNode, str]  # destination as str: Path objects cost microseconds per file


def create_destination(dest: Path) -> None:
    """mkdir the root of a tree being staged (0o755); it must not exist yet."""
    try:
        dest.mkdir(mode=0o755)
    except FileExistsError:
        raise MaterializeError(f"destination already exists: {dest}") from None


def default_concurrency() -> int:
    """Threads for placing files: enough to overlap I/O, few enough not to fight the metadata lock."""
    return max(1, min(8, 2 * (os.cpu_count() or 1)))


class Materializer:
    """Places CAS blobs into directories using the fastest method the probe found for that filesystem pair.

    A `staging.Stager`: `stage` and `fill` give a StageReport; `build` the finer MaterializeReport.
    """

    def __init__(
        self,
        cas: ContentStore,
        probe: BackendProbe,
        *,
        counters: Counters,
        concurrency: int | None = None,
        batch_size: int = 64,
    ) -> None:
        self.cas = cas
        self.probe = probe
        self.counters = counters
        self.concurrency = concurrency or default_concurrency()
        self.batch_size = max(1, batch_size)

    def build(self, node: DirectoryNode, dest: Path, *, progress: Progress | None = None) -> MaterializeReport:
        """Create `dest` (must not exist) holding the whole tree `node`; on failure nothing is left behind."""
        started = time.perf_counter()
        report = MaterializeReport()
        create_destination(dest)
        try:
            self.populate(node, dest, report, progress=progress)
        except BaseException:
            remove_tree(dest)
            raise
        report.seconds = time.perf_counter() - started
        return report

    def stage(self, tree: InputTree | DirectoryNode, dest: Path, *, progress: Progress | None = None) -> StageReport:
        """`build` as a Stager: create `dest` (must not exist) holding the tree; nothing left on failure."""
        return _stage_report(self.build(tree.root if isinstance(tree, InputTree) else tree, dest, progress=progress))

    def fill(self, node: DirectoryNode, dest: Path) -> StageReport:
        """Build `node` inside `dest`, an existing empty directory; the caller removes it on failure."""
        started = time.perf_counter()
        report = MaterializeReport()
        self.populate(node, dest, report, progress=None)
        report.seconds = time.perf_counter() - started
        return _stage_report(report)

    def populate(
        self, node: DirectoryNode, dest: Path, report: MaterializeReport, *, progress: Progress | None
    ) -> None:
        """Directories, then files, then symlinks of `node` into the existing directory `dest`."""
        jobs, links = self.create_directories(node, dest, report)
        self.place_files(jobs, report, progress=progress)
        self.create_symlinks(links, report)

    def create_directories(
        self, node: DirectoryNode, dest: Path, report: MaterializeReport
    ) -> tuple[list[FileJob], list[tuple[str, Path]]]:
        """mkdir every directory under `node` into existing `dest`; return the file and symlink jobs."""
        jobs: list[FileJob] = []
        links: list[tuple[str, Path]] = []
        stack: list[tuple[DirectoryNode, Path]] = [(node, dest)]
        while stack:
            current, path = stack.pop()
            prefix = f"{path}/"
            for name, file in current.files.items():
                jobs.append((file, prefix + name))
            for name, link in current.symlinks.items():
                links.append((link.target, path / name))
            for name, child in current.dirs.items():
                child_path = path / name
                try:
                    os.mkdir(child_path, 0o755)
                except OSError as exc:
                    raise _materialize_error(exc, child_path) from None
                report.directories += 1
                stack.append((child, child_path))
        self.counters.add("directories", report.directories)
        return jobs, links

    def create_symlinks(self, links: Sequence[tuple[str, Path]], report: MaterializeReport) -> None:
        """Create relative symlinks (targets were validated when the tree was built)."""
        for target, path in links:
            try:
                os.symlink(target, path)
            except OSError as exc:
                raise _materialize_error(exc, path) from None
        report.symlinks += len(links)
        self.counters.add("symlinks", len(links))

    def place_files(self, jobs: Sequence[FileJob], report: MaterializeReport, *, progress: Progress | None) -> None:
        """Place every (FileNode, destination path); parents must exist."""
        if not jobs:
            return
        methods = self.probe.methods_for(self.cas.cas_dir, Path(jobs[0][1]).parent)
        batches = [jobs[i : i + self.batch_size] for i in range(0, len(jobs), self.batch_size)]
        workers = min(self._threads_for(methods[0]), len(batches))
        if workers <= 1:
            results = [self._place_batch(batch, methods, progress) for batch in batches]
        else:
            from concurrent.futures import ThreadPoolExecutor  # here: logging comes with it (3 ms of a start)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(lambda b: self._place_batch(b, methods, progress), batches))
        for partial in results:
            report.merge(partial)
        for name, amount in _methods_total(results).items():
            self.counters.add(name, amount)

    def _threads_for(self, method: Method) -> int:
        """Hardlinks are pure metadata and fastest inline; data-touching methods overlap I/O on 2 threads+."""
        if method is Method.HARDLINK:
            return 1
        return min(self.concurrency, 2 * (os.cpu_count() or 1), 4) if self.concurrency > 1 else 1

    def _place_batch(
        self, batch: Sequence[FileJob], methods: list[Method], progress: Progress | None
    ) -> MaterializeReport:
        report = MaterializeReport()
        counts = report.methods
        hardlinked = report.hardlinked
        primary = methods[0]
        cas_prefix = f"{self.cas.cas_dir}/"
        link = os.link
        total_bytes = 0
        for file, dst in batch:
            digest = file.digest
            total_bytes += digest.size
            if digest.size == 0:
                used = self._place_slow(file, dst, methods)
            else:
                hash_hex = digest.hash
                src = f"{cas_prefix}{hash_hex[:2]}/{hash_hex}{'+x' if file.executable else ''}"
                try:
                    if primary is Method.HARDLINK:
                        link(src, dst)
                    else:
                        place_file(primary, src, dst, executable=file.executable)
                    used = primary.value
                except OSError:
                    used = self._place_slow(file, dst, methods)
            counts[used] = counts.get(used, 0) + 1
            if used == "hardlink":
                hardlinked.append((digest.hash, file.executable))
        report.files = len(batch)
        report.bytes = total_bytes
        if progress is not None:
            progress(len(batch))
        return report

    def _place_slow(self, file: FileNode, dst: str, methods: list[Method]) -> str:
        """Zero-byte files, missing blobs (ingest from source) and per-file fallbacks; returns the method used."""
        if file.digest.is_empty:
            try:
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, blob_mode(file.executable))
                os.fchmod(fd, blob_mode(file.executable))  # umask-proof
                os.close(fd)
            except OSError as exc:
                raise _materialize_error(exc, Path(dst)) from None
            return "zero_byte"
        src = self.cas.blob_path(file.digest.hash, file.executable)
        target = Path(dst)
        ingested = False
        index = 0
        while index < len(methods):
            method = methods[index]
            try:
                place_file(method, src, target, executable=file.executable)
                return method.value
            except FileNotFoundError:
                if ingested or file.source is None or not target.parent.exists():
                    raise MissingBlobError(
                        f"{target.name}: blob {file.digest} is not in the CAS and no source file was given"
                    ) from None
                self.cas.ingest_file(file.source, executable=file.executable, expected=file.digest)
                ingested = True
            except FileExistsError:
                raise MaterializeError(f"{dst}: listed twice or already present") from None
            except OSError as exc:
                if exc.errno in _FALLBACK_ERRNOS and index + 1 < len(methods):
                    index += 1
                    continue
                raise _materialize_error(exc, target) from None
        raise MaterializeError(f"{dst}: no method could place this file")  # pragma: no cover - COPY always last


def _stage_report(report: MaterializeReport) -> StageReport:
    return StageReport(
        files=report.files,
        bytes=report.bytes,
        methods=dict(report.methods),
        hardlinked=report.hardlinked,
        seconds=report.seconds,
    )


def _methods_total(reports: Sequence[MaterializeReport]) -> dict[str, int]:
    total: dict[str, int] = {}
    for partial in reports:
        for name, amount in partial.methods.items():
            total[name] = total.get(name, 0) + amount
    return total


def _materialize_error(exc: OSError, path: Path) -> TreematError:
    if exc.errno == errno.ENOSPC:
        return MaterializeError(f"disk full while creating {path}")
    return MaterializeError(f"cannot create {path}: {exc.strerror or exc}")
