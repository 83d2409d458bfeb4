"""Telemetry: thread-safe counters, persisted per process so `treemat stats` can sum them.

A silent fallback (e.g. clonefile -> copy) must be visible: every path a file takes increments a counter.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

# The counters of the paths a file can take into an exec dir (`treemat stats` shows their shares).
FILE_METHOD_COUNTERS = ("clonefile", "snapshot", "reflink", "hardlink", "copy", "zero_byte")


class Counters:
    """A bag of monotonically increasing integer counters, safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        """Increase counter `name` by `amount`."""
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def merge(self, other: Mapping[str, int]) -> None:
        """Add every value of `other` into this bag."""
        with self._lock:
            for name, amount in other.items():
                self._values[name] = self._values.get(name, 0) + amount

    def get(self, name: str) -> int:
        """Current value of `name` (0 if never incremented)."""
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        """A copy of all values."""
        with self._lock:
            return dict(self._values)


def sum_counters(snapshots: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Element-wise sum of counter snapshots."""
    total: dict[str, int] = {}
    for snap in snapshots:
        for name, amount in snap.items():
            total[name] = total.get(name, 0) + int(amount)
    return total


class StatsStore:
    """Per-process counter files in `directory` (`Root.stats`), rewritten atomically (temp file + os.replace)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def publish(self, counters: Counters, *, role: str, extra: Mapping[str, object] | None = None) -> Path:
        """Write this process's counters to `<root>/stats/<pid>.json`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record: dict[str, object] = {
            "pid": os.getpid(),
            "role": role,
            "updated": time.time(),
            "counters": counters.snapshot(),
        }
        if extra:
            record.update(extra)
        target = self.directory / f"{os.getpid()}.json"
        fd, temp = tempfile.mkstemp(prefix=".stats-", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle, sort_keys=True)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return target

    def load_all(self) -> list[dict[str, object]]:
        """Every readable stats record (corrupt or vanished files are skipped)."""
        records: list[dict[str, object]] = []
        if not self.directory.is_dir():
            return records
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return records

    def totals(self) -> dict[str, int]:
        """Sum of counters over all records."""
        snaps: list[Mapping[str, int]] = []
        for record in self.load_all():
            counters = record.get("counters")
            if isinstance(counters, dict):
                snaps.append({str(k): int(v) for k, v in counters.items()})
        return sum_counters(snaps)

    def reset(self) -> int:
        """Delete all records; returns how many were removed."""
        removed = 0
        if self.directory.is_dir():
            for path in self.directory.glob("*.json"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed
