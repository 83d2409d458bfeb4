"""A size budget for the CAS, enforced in the background: nobody has to run `treemat cas gc`.

The default budget is 10% of the size of the filesystem holding the root (at least 1 GiB); `TREEMAT_MAX_SIZE`
(e.g. `20G`) or `open_stack(max_bytes=...)` sets it. Each process keeps an estimate of the store's size (one
scan at start-up, on the background thread, then + what it ingests); once the estimate passes the budget, a gc
brings the store down to 80% of it, least recently used blobs first. Blobs in use (hardlinked into an exec dir
or a pooled one) are never removed, and gc waits for every stager (the shared gc lock).
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

from treemat.cas import ContentStore
from treemat.casmaint import GcReport
from treemat.counters import Counters

DEFAULT_SHARE = 0.10
MIN_DEFAULT_BYTES = 1 << 30
LOW_WATER = 0.8
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`500M`, `10G`, `1234` (bytes) -> bytes; ValueError if malformed."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in _UNITS:
        number, unit = cleaned[:-1], cleaned[-1]
    value = float(number)
    if value < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return int(value * _UNITS[unit])


def default_budget(root: os.PathLike[str] | str) -> int:
    """10% of the filesystem's size, at least 1 GiB; `TREEMAT_MAX_SIZE` overrides."""
    explicit = os.environ.get("TREEMAT_MAX_SIZE")
    if explicit:
        return parse_size(explicit)
    info = os.statvfs(root)
    return max(MIN_DEFAULT_BYTES, int(info.f_blocks * info.f_frsize * DEFAULT_SHARE))


class BudgetState(NamedTuple):
    """What `treemat stats` shows."""

    max_bytes: int
    estimated_bytes: int | None
    collections: int
    evicted_bytes: int


class StoreBudget:
    """Tracks the store's size and collects it when it outgrows the budget (call `maybe_collect` off-path)."""

    def __init__(self, cas: ContentStore, max_bytes: int, *, counters: Counters) -> None:
        self.cas = cas
        self.max_bytes = max_bytes
        self.counters = counters
        self._lock = threading.Lock()
        self._estimate: int | None = None
        self._counted_ingest = 0
        self._collections = 0
        self._evicted = 0

    def maybe_collect(self) -> GcReport | None:
        """Scan once if the size is unknown; gc down to 80% of the budget when over it. Returns the gc report."""
        ingested = self.cas.published_bytes  # what this process added since the last call: the store's own tally
        with self._lock:
            fresh = ingested - self._counted_ingest
            self._counted_ingest = ingested
            if self._estimate is not None:
                self._estimate += fresh
            estimate = self._estimate
        if estimate is None:
            estimate = self.cas.stats().bytes
            with self._lock:
                self._estimate = estimate
        if estimate <= self.max_bytes:
            return None
        report = self.cas.gc(int(self.max_bytes * LOW_WATER))
        with self._lock:
            self._estimate = report.after_bytes
            self._collections += 1
            self._evicted += report.deleted_bytes
        self.counters.add("budget_collections")
        self.counters.add("budget_evicted_blobs", report.deleted_blobs)
        self.counters.add("budget_evicted_bytes", report.deleted_bytes)
        return report

    def state(self) -> BudgetState:
        """Budget, current estimate and evictions so far."""
        with self._lock:
            return BudgetState(self.max_bytes, self._estimate, self._collections, self._evicted)
