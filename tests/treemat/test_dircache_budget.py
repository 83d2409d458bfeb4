"""Tests for treemat.dircache's size budget: recorded sizes, eviction passes, concurrent processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treemat.cas import ContentStore
from treemat.dircache import DirectoryCache, recorded_usage
from treemat.fsprims import remove_tree
from treemat.layout import Root
from treemat.locking import file_lock
from treemat.tree import FileNode, InputTree

from ..support.dircaches import CopyCloner, entry_key, fake_stack

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _lib_tree(cas: ContentStore, tag: str, sizes: list[int]) -> InputTree:
    tree = InputTree()
    for i, size in enumerate(sizes):
        data = (f"{tag}:{i}:".encode() * (size // 4 + 1))[:size] or tag.encode()
        tree.add_file(f"lib/m{i}", FileNode(cas.ingest_bytes(data, executable=False)))
    return tree


def _actual(cache: DirectoryCache) -> dict[str, int]:
    """Every entry and its bytes, by walking (what the cache must no longer do per build)."""
    sizes: dict[str, int] = {}
    if not cache.cache_dir.is_dir():
        return sizes
    for path in cache.cache_dir.iterdir():
        if path.is_dir() and not path.name.startswith("."):
            sizes[path.name] = sum(
                os.lstat(os.path.join(d, f)).st_size for d, _dirs, files in os.walk(path) for f in files
            )
    return sizes


@contextlib.contextmanager
def _fs_calls(monkeypatch: pytest.MonkeyPatch, under: Path) -> Iterator[list[tuple[str, str]]]:
    """Record (call, path) for every stat / lstat / open / listing of a path under `under`."""
    calls: list[tuple[str, str]] = []
    prefix = str(under)

    def wrap(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def recorded(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, os.PathLike)) and not kwargs.get("dir_fd"):
                text = os.fspath(path)
                if isinstance(text, str) and text.startswith(prefix):
                    calls.append((name, text))
            return real(path, *args, **kwargs)

        return recorded

    with monkeypatch.context() as patch:
        for name in ("stat", "lstat", "open", "scandir", "listdir"):
            patch.setattr(os, name, wrap(name))
        yield calls


@pytest.mark.parametrize("cached", [2, 12])
def test_a_build_under_budget_touches_no_other_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: int
) -> None:
    """The first build of an entry records its size in O(1): the cache is neither listed nor walked
    (the old code walked every entry to evict, on every build)."""
    cas, cache = fake_stack(tmp_path / "root", CopyCloner(), max_bytes=1 << 30)
    old = [_lib_tree(cas, f"old{n}", [100] * 5) for n in range(cached)]
    for n, tree in enumerate(old):
        cache.stage(tree, tmp_path / f"old{n}")
    new = _lib_tree(cas, "new", [100] * 5)
    with _fs_calls(monkeypatch, cache.cache_dir) as calls:
        report = cache.stage(new, tmp_path / "new")
    assert report.subtree_misses == 1
    old_keys = {entry_key(tree, "lib") for tree in old}
    listed = [path for call, path in calls if call in ("scandir", "listdir") and path == str(cache.cache_dir)]
    assert listed == [], "the cache directory was listed"
    inside = [path for _call, path in calls if os.path.relpath(path, cache.cache_dir).split(os.sep)[0] in old_keys]
    assert inside == [], f"other entries were touched: {inside[:5]}"
    # what a build does in the cache depends on the new entry alone, not on how many others there are
    test_a_build_under_budget_touches_no_other_entry.calls[cached] = len(calls)  # type: ignore[attr-defined]
    counts = test_a_build_under_budget_touches_no_other_entry.calls  # type: ignore[attr-defined]
    if len(counts) == 2:
        assert counts[2] == counts[12], counts
    assert recorded_usage(Root(tmp_path / "root").dircache) == (cached + 1, 500 * (cached + 1))
    assert cache.counters.get("dircache_eviction_passes") == 0


test_a_build_under_budget_touches_no_other_entry.calls = {}  # type: ignore[attr-defined]


@SETTINGS
@given(data=st.data())
def test_eviction_keeps_the_budget_and_spares_pinned_entries(tmp_path: Path, data: st.DataObject) -> None:
    """Property: after every build the recorded total is exact, the cache is within budget unless everything
    left is pinned, and a pinned entry is never removed."""
    base = tmp_path / "evict-prop"
    if base.exists():
        remove_tree(base)
    base.mkdir()
    budget = data.draw(st.integers(0, 3000), label="budget")
    cas, cache = fake_stack(base / "root", CopyCloner(), min_files=1, max_bytes=budget)
    sizes = st.lists(st.integers(1, 400), min_size=1, max_size=4)
    trees = [_lib_tree(cas, f"t{n}", data.draw(sizes, label=f"sizes{n}")) for n in range(6)]
    for step in range(data.draw(st.integers(1, 10), label="steps")):
        tree = trees[data.draw(st.integers(0, len(trees) - 1), label="tree")]
        present = sorted(_actual(cache))
        pinned = data.draw(st.sets(st.sampled_from(present)) if present else st.just(set()), label="pinned")
        with contextlib.ExitStack() as pins:
            for key in pinned:
                pins.enter_context(file_lock(cache.cache_dir / f"{key}.lock", shared=True))
            report = cache.stage(tree, base / f"exec{step}")
        remove_tree(base / f"exec{step}")
        actual = _actual(cache)
        assert pinned <= set(actual), "a pinned entry was evicted"
        assert recorded_usage(Root(base / "root").dircache) == (len(actual), sum(actual.values()))
        if report.subtree_misses:  # a build: over budget afterwards only if nothing left could go
            new_key = entry_key(tree, "lib")
            assert sum(actual.values()) <= budget or set(actual) <= pinned | {new_key}, (budget, actual, pinned)


def _stage_many(root: str, trees: list[InputTree], out: str, budget: int) -> None:
    _cas, cache = fake_stack(Path(root), CopyCloner(), min_files=4, max_bytes=budget)
    Path(out).mkdir()
    for n, tree in enumerate(trees + trees[::2]):  # misses, then hits (or misses again, if evicted meanwhile)
        cache.stage(tree, Path(out) / str(n))
        remove_tree(Path(out) / str(n))


def test_concurrent_processes_keep_the_recorded_total_exact(tmp_path: Path) -> None:
    """Three processes build, hit and evict overlapping entries in one cache: the total stays exact."""
    cas, cache = fake_stack(tmp_path / "root", CopyCloner(), max_bytes=2000)
    pool = [_lib_tree(cas, f"shared{n}", [100] * 5) for n in range(8)]
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_stage_many, args=(str(tmp_path / "root"), pool[w:] + pool[:w], str(tmp_path / f"w{w}"), 2000)
        )
        for w in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    actual = _actual(cache)
    assert recorded_usage(Root(tmp_path / "root").dircache) == (len(actual), sum(actual.values()))
    assert sum(actual.values()) <= 2000, "every pin is released: the last build's eviction got under budget"
    assert not [p for p in cache.cache_dir.iterdir() if p.name.startswith((".evict", ".tmp"))]


def test_a_cache_without_recorded_sizes_is_measured_once(tmp_path: Path) -> None:
    """Entries from before sizes were recorded (or a crash between publishing and recording) are walked by
    the next pass, once; their sizes are recorded from then on."""
    cas, cache = fake_stack(tmp_path / "root", CopyCloner(), max_bytes=None)
    trees = [_lib_tree(cas, f"legacy{n}", [50 * (n + 1)] * 4) for n in range(3)]
    for n, tree in enumerate(trees):
        cache.stage(tree, tmp_path / f"e{n}")
    for sidecar in cache.cache_dir.glob("*.bytes"):
        sidecar.unlink()
    (cache.cache_dir / ".index").unlink()
    assert recorded_usage(Root(tmp_path / "root").dircache) is None
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (3, 4 * (50 + 100 + 150))
    assert sorted(p.name for p in cache.cache_dir.glob("*.bytes")) == sorted(
        f"{entry_key(t, 'lib')}.bytes" for t in trees
    )
    assert cache.evict(4 * 150) == 2, "the two least recently used go"
    assert recorded_usage(Root(tmp_path / "root").dircache) == (1, 4 * 150)
