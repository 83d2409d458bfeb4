"""The CAS stays within its size budget without anyone running gc; blobs in use are never removed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from treemat.budget import StoreBudget, default_budget, parse_size
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.executor import ActionRequest, RequestInput
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.stack import ISOLATION_COW, open_stack


def _inputs(execroot: Path, round_: int, count: int = 8, size: int = 64 << 10) -> list[RequestInput]:
    inputs = []
    for index in range(count):
        rel = f"in/r{round_}/f{index}"
        data = f"{round_}:{index}:".encode() * (size // 8)
        path = execroot / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        inputs.append(RequestInput(rel, hashlib.sha256(data).hexdigest()))
    return inputs


def test_the_store_is_kept_within_its_budget(tmp_path: Path) -> None:
    budget = 1 << 20  # 1 MiB; each round ingests ~0.5 MiB of new blobs
    stack = open_stack(Root(tmp_path / "root"), isolation=ISOLATION_COW, max_bytes=budget, background_cleanup=False)
    execroot = tmp_path / "execroot"
    for round_ in range(10):
        spec = ActionSpec(argv=["sh", "-c", "cat in/*/* > out/all"], outputs=["out/all"])
        result = stack.executor.execute(ActionRequest(spec, _inputs(execroot, round_), execroot))
        assert result.exit_code == 0, result.output
        assert stack.cas.stats().bytes <= budget
    assert stack.counters.get("budget_collections") >= 3
    assert stack.counters.get("budget_evicted_bytes") > 0
    stats = stack.describe()
    assert stats["cas_budget_bytes"] == budget


def test_blobs_in_use_survive_collection(tmp_path: Path) -> None:
    stack = open_stack(Root(tmp_path / "root"), max_bytes=1, background_cleanup=False)
    execroot = tmp_path / "execroot"
    inputs = _inputs(execroot, 0, count=3)
    spec = ActionSpec(argv=["true"], outputs=[])
    assert stack.executor.execute(ActionRequest(spec, inputs, execroot)).exit_code == 0
    if stack.executor.pool is None:
        pytest.skip("needs the overlay sandbox (pooled exec dirs hold their blobs)")
    for item in inputs:
        assert item.hash is not None
        assert stack.cas.lookup(item.hash, False) is not None, "a pooled exec dir still links it"
    stack.close()
    stack.budget.maybe_collect()
    assert all(stack.cas.lookup(item.hash or "", False) is None for item in inputs)


def test_sizes_and_default_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_size("10G") == 10 << 30 and parse_size("1.5K") == 1536 and parse_size("2MiB") == 2 << 20
    with pytest.raises(ValueError):
        parse_size("lots")
    monkeypatch.delenv("TREEMAT_MAX_SIZE", raising=False)
    assert default_budget(tmp_path) >= 1 << 30
    monkeypatch.setenv("TREEMAT_MAX_SIZE", "3G")
    assert default_budget(tmp_path) == 3 << 30


def test_the_budget_counts_what_the_store_published_not_a_telemetry_counter(tmp_path: Path) -> None:
    """The estimate grows by the bytes the store published, whichever counters the budget reports to (it read
    the `ingested_bytes` counter: a budget given its own counters never saw an ingest, and never collected)."""
    store = ContentStore(Root(tmp_path / "root"), counters=Counters())
    budget = StoreBudget(store, 4 << 10, counters=Counters())
    assert budget.maybe_collect() is None  # the first call scans: an empty store
    for index in range(4):
        store.ingest_bytes(bytes([index]) * (4 << 10), executable=False)
    report = budget.maybe_collect()
    assert report is not None and report.deleted_blobs > 0
    assert store.stats().bytes <= 4 << 10
