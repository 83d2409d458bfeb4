"""Per-file placement methods from the CAS into exec dirs, and a probe that picks the fastest one that works.

Per file: APFS clonefile(2) (macOS), FICLONE reflink (Linux xfs/btrfs), hardlink (same filesystem), copy. The
system calls themselves are in fsprims; this module is the policy: which method, in what order, measured.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from treemat.fsprims import StrPath, blob_mode, clonefile, copy, reflink


class Method(enum.Enum):
    """How one file gets from the CAS into an exec dir, fastest first."""

    CLONEFILE = "clonefile"
    REFLINK = "reflink"
    HARDLINK = "hardlink"
    COPY = "copy"


DEFAULT_ORDER = (Method.CLONEFILE, Method.REFLINK, Method.HARDLINK, Method.COPY)


def place_file(method: Method, src: StrPath, dst: StrPath, *, executable: bool) -> None:
    """Create dst (which must not exist) with src's content and mode 0o440/0o550 using `method`."""
    mode = blob_mode(executable)
    if method is Method.HARDLINK:
        os.link(src, dst)  # the CAS blob already carries the right mode
    elif method is Method.REFLINK:
        reflink(src, dst, mode)
    elif method is Method.CLONEFILE:
        clonefile(src, dst)  # keeps the blob's mode
    else:
        copy(src, dst, mode)


class BackendProbe:
    """Which methods work between two filesystems, learnt once per (src st_dev, dst st_dev) by trying them.

    With `measure=True` the working methods are also timed there (placing a few 64 KiB files each) and
    ordered cheapest first, copy always last: the choice is the measurement, not a fixed rank.
    """

    def __init__(self, prefer: Sequence[Method] | None = None, *, measure: bool = False) -> None:
        self.order: tuple[Method, ...] = tuple(prefer) if prefer else DEFAULT_ORDER
        if Method.COPY not in self.order:
            self.order = (*self.order, Method.COPY)
        self.measure = measure
        self.timings: dict[str, dict[str, float]] = {}  # "src_dev:dst_dev" -> method -> µs per file
        self._cache: dict[tuple[int, int], list[Method]] = {}
        self._lock = threading.Lock()

    def methods_for(self, src_dir: Path, dst_dir: Path) -> list[Method]:
        """Usable methods from files in src_dir to files in dst_dir, in preference order (COPY always last)."""
        key = (os.stat(src_dir).st_dev, os.stat(dst_dir).st_dev)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        usable = [m for m in self.order if m is Method.COPY or _try_method(m, src_dir, dst_dir)]
        if self.measure and len(usable) > 2:
            costs = {m: _time_method(m, src_dir, dst_dir) for m in usable if m is not Method.COPY}
            usable = [*sorted(costs, key=lambda m: costs[m]), Method.COPY]
            with self._lock:
                self.timings[f"{key[0]}:{key[1]}"] = {m.value: round(c * 1e6, 1) for m, c in costs.items()}
        with self._lock:
            self._cache[key] = usable
        return usable


def _time_method(method: Method, src_dir: Path, dst_dir: Path, files: int = 16) -> float:
    """Median seconds per file to place a 64 KiB file with `method` from src_dir into dst_dir."""
    token = f".treemat-time-{os.getpid()}-{threading.get_ident()}"
    src = src_dir / token
    scratch = dst_dir / (token + ".d")
    samples: list[float] = []
    try:
        src.write_bytes(os.urandom(64 << 10))
        os.chmod(src, blob_mode(False))
        scratch.mkdir()
        for index in range(files):
            started = time.perf_counter()
            place_file(method, src, scratch / str(index), executable=False)
            samples.append(time.perf_counter() - started)
    except OSError:
        return float("inf")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
        with contextlib.suppress(OSError):
            src.unlink()
    import statistics  # here: only a probe needs it (2 ms of a service's start)

    return statistics.median(samples)


def _try_method(method: Method, src_dir: Path, dst_dir: Path) -> bool:
    token = f".treemat-probe-{os.getpid()}-{threading.get_ident()}"
    src, dst = src_dir / token, dst_dir / (token + ".out")
    try:
        src.write_bytes(b"treemat probe\n")
        os.chmod(src, 0o444)
        place_file(method, src, dst, executable=False)
        return dst.read_bytes() == b"treemat probe\n"
    except OSError:
        return False
    finally:
        for path in (dst, src):
            with contextlib.suppress(OSError):
                path.unlink()
