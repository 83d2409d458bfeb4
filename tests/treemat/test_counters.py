"""Tests for treemat.counters and treemat.locking."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from pathlib import Path

import pytest
from treemat.counters import Counters, StatsStore, sum_counters
from treemat.layout import Root
from treemat.locking import LockBusy, file_lock


def test_counters_are_thread_safe() -> None:
    counters = Counters()

    def bump() -> None:
        for _ in range(10_000):
            counters.add("hardlink")

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.get("hardlink") == 80_000
    assert counters.get("never") == 0


def test_merge_and_sum() -> None:
    counters = Counters()
    counters.add("copy", 2)
    counters.merge({"copy": 3, "reflink": 1})
    assert counters.snapshot() == {"copy": 5, "reflink": 1}
    assert sum_counters([{"a": 1}, {"a": 2, "b": 5}]) == {"a": 3, "b": 5}


def test_stats_store_publish_totals_reset(tmp_path: Path) -> None:
    store = StatsStore(Root(tmp_path).stats)
    counters = Counters()
    counters.add("hardlink", 7)
    path = store.publish(counters, role="test", extra={"recent_actions": [{"files": 7}]})
    record = json.loads(path.read_text())
    assert record["counters"] == {"hardlink": 7}
    assert record["recent_actions"] == [{"files": 7}]
    # another process's record plus a corrupt file that must be skipped
    (tmp_path / "stats" / "1.json").write_text(json.dumps({"counters": {"hardlink": 3, "copy": 1}}))
    (tmp_path / "stats" / "2.json").write_text("{not json")
    assert store.totals() == {"hardlink": 10, "copy": 1}
    assert store.reset() == 3
    assert store.totals() == {}
    assert not list((tmp_path / "stats").iterdir())


def _hold_lock(path: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    with file_lock(Path(path)):
        ready.set()
        release.wait(10)


def test_exclusive_lock_excludes_other_process(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(lock_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockBusy), file_lock(lock_path, shared=True, blocking=False):
            pass
    finally:
        release.set()
        holder.join(10)
    with file_lock(lock_path, blocking=False):
        pass


def test_shared_locks_coexist(tmp_path: Path) -> None:
    lock_path = tmp_path / "s.lock"
    with file_lock(lock_path, shared=True), file_lock(lock_path, shared=True, blocking=False):
        pass


def test_fork_gate_lets_a_waiting_fork_in_between_ingests() -> None:
    """Ingests hold the gate shared, one after another; a fork waiting meanwhile gets in before the next ingest."""
    import threading

    from treemat.locking import ForkGate

    gate = ForkGate()
    order: list[str] = []
    stop = threading.Event()

    started = threading.Event()

    def ingests() -> None:
        while not stop.is_set():
            with gate.writing():
                order.append("ingest")
                started.set()
                hashlib.sha256(bytes(1 << 16)).digest()  # an ingest's worth of work while holding the gate

    def fork() -> None:
        with gate.forking():
            order.append("fork")

    thread = threading.Thread(target=ingests, daemon=True)
    thread.start()
    assert started.wait(10)
    forker = threading.Thread(target=fork, daemon=True)
    forker.start()
    forker.join(10)
    stop.set()
    thread.join(10)
    assert "fork" in order, "the fork starved behind back-to-back ingests"
