"""Tests for treemat.dircache: whole-subtree clones (btrfs snapshots as root; a fake cloner without), hits/misses,
pins, eviction."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from treemat.backends import BackendProbe
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import digest_bytes
from treemat.dircache import DirectoryCache
from treemat.errors import MissingBlobError
from treemat.fsprims import is_subvolume, remove_tree
from treemat.layout import Root
from treemat.locking import file_lock
from treemat.materializer import Materializer
from treemat.merkle import MerkleIndex
from treemat.staging import StageReport
from treemat.tree import FileNode, InputTree
from treemat.treeclone import KernelTreeCloner

from ..support.dircaches import CopyCloner, entry_key, fake_stack
from .treegen import Spec, build_tree, expected_view, read_back, tree_specs


def _stack(root: Path, min_files: int | None = 4, max_bytes: int | None = None) -> tuple[ContentStore, DirectoryCache]:
    counters = Counters()
    layout = Root(root)
    cas = ContentStore(layout, counters=counters)
    cache = DirectoryCache(
        layout.dircache,
        Materializer(cas, BackendProbe(), counters=counters),
        counters=counters,
        cloner=KernelTreeCloner(),
        min_files=min_files,
        max_bytes=max_bytes,
    )
    return cas, cache


def _sdk_tree(cas: ContentStore, variant: bytes = b"") -> InputTree:
    tree = InputTree()
    for i in range(12):
        tree.add_file(f"sdk/include/h{i}.h", FileNode(cas.ingest_bytes(b"header %d" % i, executable=False)))
    tree.add_file("sdk/bin/tool", FileNode(cas.ingest_bytes(b"#!/bin/sh\n", executable=True), executable=True))
    tree.add_file("src/main.swift", FileNode(cas.ingest_bytes(b"print(1)" + variant, executable=False)))
    return tree


def test_off_where_no_o1_clone(tmp_path: Path) -> None:
    cas, cache = _stack(tmp_path / "root")
    if cache.mode != "off":
        pytest.skip(f"tmp_path supports {cache.mode}")
    report = cache.stage(_sdk_tree(cas), tmp_path / "exec")
    assert report.subtree_hits == report.subtree_misses == 0
    assert (tmp_path / "exec/sdk/include/h3.h").read_bytes() == b"header 3"


def test_btrfs_subtree_snapshot_hits(btrfs_dir: Path) -> None:
    base = btrfs_dir / "hits"
    cas, cache = _stack(base / "root")
    assert cache.mode == "snapshot"
    first = cache.stage(_sdk_tree(cas), base / "exec1")
    assert (first.subtree_misses, first.subtree_hits) == (1, 0)
    second = cache.stage(_sdk_tree(cas, variant=b" // changed"), base / "exec2")
    assert (second.subtree_misses, second.subtree_hits) == (0, 1), "the unchanged sdk/include is reused"
    assert second.methods.get("snapshot") == 12
    # sdk/ has a big subdirectory, so the cache unit is sdk/include (a big directory without big children)
    assert is_subvolume(base / "exec2" / "sdk" / "include"), "a hit is one snapshot of the cached subvolume"
    assert not is_subvolume(base / "exec2" / "sdk")
    assert (base / "exec2/src/main.swift").read_bytes() == b"print(1) // changed"
    assert read_back(base / "exec2")["sdk/bin/tool"] == ("file", (b"#!/bin/sh\n", True))
    (base / "exec2/sdk/include/new.o").write_bytes(b"outputs can go inside cloned input dirs")
    assert cache.counters.get("subtree_hits") == 1 and cache.counters.get("subtree_misses") == 1


def _fresh_dir(base: Path) -> Path:
    """`base`, empty (hypothesis runs a test many times in one tmp dir)."""
    if base.exists():
        remove_tree(base)
    base.mkdir()
    return base


def _stage_cold_then_warm(
    cache: DirectoryCache, tree: InputTree, spec: Spec, base: Path
) -> tuple[StageReport, StageReport]:
    """Stage `tree` twice: both copies read back as `spec`, and the second is all hits where the first missed."""
    miss = cache.stage(tree, base / "cold")
    hit = cache.stage(tree, base / "warm")
    assert read_back(base / "cold") == expected_view(spec)
    assert read_back(base / "warm") == expected_view(spec)
    assert hit.subtree_misses == 0
    assert hit.subtree_hits == miss.subtree_misses
    return miss, hit


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(spec=tree_specs(max_entries=30))
def test_tree_in_equals_tree_out_through_the_cache(btrfs_dir: Path, spec: Spec) -> None:
    base = _fresh_dir(btrfs_dir / "prop")
    cas, cache = _stack(base / "root", min_files=1)
    _stage_cold_then_warm(cache, build_tree(spec, cas), spec, base)


def test_pinned_entries_survive_eviction(btrfs_dir: Path) -> None:
    base = btrfs_dir / "evict"
    cas, cache = _stack(base / "root", max_bytes=None)
    tree_a = _sdk_tree(cas)
    cache.stage(tree_a, base / "e1")
    key = MerkleIndex().digest_of(tree_a.root.dirs["sdk"].dirs["include"]).hash
    with file_lock(cache.cache_dir / f"{key}.lock", shared=True):  # a stager is cloning it right now
        assert cache.evict(0) == 0
        assert (cache.cache_dir / key).is_dir()
    assert cache.evict(0) == 1
    assert not (cache.cache_dir / key).exists()
    assert cache.stats().entries == 0
    assert cache.counters.get("evictions") == 1


def test_failed_stage_leaves_nothing(btrfs_dir: Path) -> None:
    base = btrfs_dir / "fail"
    cas, cache = _stack(base / "root")
    tree = _sdk_tree(cas)
    missing = _tree_missing_a_blob(cas)
    with pytest.raises(Exception, match="not in the CAS"):
        cache.stage(missing, base / "exec")
    assert not (base / "exec").exists()
    assert not [p for p in cache.cache_dir.iterdir() if p.name.startswith(".tmp")]
    cache.stage(tree, base / "ok")
    shutil.rmtree(base / "ok", ignore_errors=True)


# ---------------------------------------------------------------------------- the cache's logic, without root
# A fake cloner (shutil.copytree, every call recorded) stands in for clonefile(2) / btrfs snapshots, so what the
# cache decides (what to clone whole, hits and misses, eviction, pins, falling back) runs on any filesystem.


def _tree_missing_a_blob(cas: ContentStore) -> InputTree:
    """A subtree of 6 files, one of whose blobs was never stored (staging it must fail)."""
    missing = InputTree()
    missing.add_file("sdk/x", FileNode(digest_bytes(b"never stored")))
    for i in range(5):
        missing.add_file(f"sdk/y{i}", FileNode(cas.ingest_bytes(b"y%d" % i, executable=False)))
    return missing


def _sdk_view(variant: bytes = b"") -> dict[str, object]:
    view: dict[str, object] = {f"sdk/include/h{i}.h": ("file", (b"header %d" % i, False)) for i in range(12)}
    view["sdk/bin/tool"] = ("file", (b"#!/bin/sh\n", True))
    view["src/main.swift"] = ("file", (b"print(1)" + variant, False))
    return view


def test_fake_cloner_misses_then_hits(tmp_path: Path) -> None:
    cloner = CopyCloner()
    cas, cache = fake_stack(tmp_path / "root", cloner)
    assert cache.mode == "copytree"
    first = cache.stage(_sdk_tree(cas), tmp_path / "exec1")
    assert (first.subtree_misses, first.subtree_hits, first.subtree_files) == (1, 0, 12)
    assert len(cloner.entries) == 1, "a miss builds the entry once"
    second = cache.stage(_sdk_tree(cas, variant=b" // changed"), tmp_path / "exec2")
    assert (second.subtree_misses, second.subtree_hits) == (0, 1), "the unchanged sdk/include is reused"
    assert len(cloner.entries) == 1, "a hit builds nothing"
    entry = cache.cache_dir / entry_key(_sdk_tree(cas), "sdk", "include")
    assert cloner.clones == [(entry, tmp_path / "exec1/sdk/include"), (entry, tmp_path / "exec2/sdk/include")]
    assert second.files == 14 and second.methods["copytree"] == 12
    assert second.bytes == _sdk_tree(cas).root.total_bytes() + len(b" // changed")
    assert read_back(tmp_path / "exec1") == _sdk_view()
    assert read_back(tmp_path / "exec2") == _sdk_view(b" // changed")
    assert (cache.counters.get("subtree_hits"), cache.counters.get("subtree_misses")) == (1, 1)
    assert cache.counters.get("copytree") == 24
    assert cloner.mode_calls == 1, "the mode is decided once"
    (tmp_path / "exec2/sdk/include/new.o").write_bytes(b"outputs can go inside cloned input dirs")
    assert not (entry / "new.o").exists()


def test_min_files_threshold(tmp_path: Path) -> None:
    """sdk/ holds 13 files (include/ 12, bin/ 1): at 13 it is the unit, at 14 nothing is big enough."""
    cloner = CopyCloner()
    cas, cache = fake_stack(tmp_path / "r13", cloner, min_files=13)
    report = cache.stage(_sdk_tree(cas), tmp_path / "e13")
    assert [dest for _entry, dest in cloner.clones] == [tmp_path / "e13/sdk"]
    assert report.subtree_files == 13
    cloner = CopyCloner()
    cas, cache = fake_stack(tmp_path / "r14", cloner, min_files=14)
    report = cache.stage(_sdk_tree(cas), tmp_path / "e14")
    assert cloner.clones == [] and cloner.entries == []
    assert (report.subtree_hits, report.subtree_misses, report.files) == (0, 0, 14)
    assert read_back(tmp_path / "e14") == _sdk_view()


def test_disabled_cache_never_asks_the_cloner(tmp_path: Path) -> None:
    cloner = CopyCloner()
    cas, cache = fake_stack(tmp_path / "root", cloner, min_files=None)
    report = cache.stage(_sdk_tree(cas), tmp_path / "exec")
    assert cache.mode == "off" and cloner.mode_calls == 0 and cloner.clones == []
    assert report.files == 14 and "copytree" not in report.methods
    assert not any(cache.cache_dir.iterdir()), "nothing written to the (disabled) cache"


def test_whole_subtree_choice_prefers_cached_directories(tmp_path: Path) -> None:
    """Uncached: the deepest big directory (sdk/include, since sdk has a big child). Cached: the biggest."""
    cloner = CopyCloner()
    cas, cache = fake_stack(tmp_path / "root", cloner, min_files=4)
    cache.stage(_sdk_tree(cas), tmp_path / "deep")
    assert [dest for _entry, dest in cloner.clones] == [tmp_path / "deep/sdk/include"]
    # another cache over the same root, whose threshold made sdk/ itself an entry
    _cas, wide = fake_stack(tmp_path / "root", cloner, min_files=13)
    wide.stage(_sdk_tree(cas), tmp_path / "wide")
    assert cloner.clones[-1] == (wide.cache_dir / entry_key(_sdk_tree(cas), "sdk"), tmp_path / "wide/sdk")
    cloner.clones.clear()
    report = cache.stage(_sdk_tree(cas), tmp_path / "again")
    assert [dest for _entry, dest in cloner.clones] == [tmp_path / "again/sdk"], "sdk/ is cached: one clone"
    assert (report.subtree_hits, report.subtree_misses, report.subtree_files) == (1, 0, 13)
    assert read_back(tmp_path / "again") == _sdk_view()


def test_a_failed_clone_falls_back_to_the_wrapped_stager(tmp_path: Path) -> None:
    cloner = CopyCloner(fail=True)
    cas, cache = fake_stack(tmp_path / "root", cloner)
    calls: list[int] = []
    report = cache.stage(_sdk_tree(cas), tmp_path / "exec", progress=calls.append)
    assert len(cloner.clones) == 1, "the clone was tried"
    assert (report.subtree_hits, report.subtree_misses, report.subtree_files) == (0, 0, 0)
    assert report.files == 14 and "copytree" not in report.methods
    assert sum(calls) == 14
    assert read_back(tmp_path / "exec") == _sdk_view()
    assert cache.counters.get("subtree_hits") == cache.counters.get("subtree_misses") == 0


def test_progress_counts_every_file_once(tmp_path: Path) -> None:
    cas, cache = fake_stack(tmp_path / "root", CopyCloner())
    for attempt in ("cold", "warm"):
        calls: list[int] = []
        cache.stage(_sdk_tree(cas), tmp_path / attempt, progress=calls.append)
        assert sum(calls) == 14, attempt


def test_pins_and_lru_eviction_without_root(tmp_path: Path) -> None:
    cloner = CopyCloner()
    cas, cache = fake_stack(tmp_path / "root", cloner)
    tree_a = _sdk_tree(cas)
    tree_b = InputTree()
    for i in range(5):
        tree_b.add_file(f"lib/m{i}", FileNode(cas.ingest_bytes(b"module %d" % i, executable=False)))
    cache.stage(tree_a, tmp_path / "a")
    cache.stage(tree_b, tmp_path / "b")
    key_a, key_b = entry_key(tree_a, "sdk", "include"), entry_key(tree_b, "lib")
    os.utime(cache.cache_dir / f"{key_a}.lock", (1, 1))  # a was used long ago, b just now
    assert cache.stats().entries == 2
    with file_lock(cache.cache_dir / f"{key_a}.lock", shared=True):  # a stager is cloning a right now
        assert cache.evict(0) == 1
        assert (cache.cache_dir / key_a).is_dir() and not (cache.cache_dir / key_b).exists()
    cache.stage(tree_b, tmp_path / "b2")  # b again (a miss): now b is the recent one
    b_bytes = cache.stats().bytes - sum(len(b"header %d" % i) for i in range(12))
    assert cache.evict(b_bytes) == 1, "over budget by one entry: the least recently used one goes"
    assert not (cache.cache_dir / key_a).exists() and (cache.cache_dir / key_b).is_dir()
    assert cache.counters.get("evictions") == 2
    assert not [p for p in cache.cache_dir.iterdir() if p.name.startswith((".evict", ".tmp"))], "no graveyards left"


def test_failed_stage_leaves_nothing_without_root(tmp_path: Path) -> None:
    cas, cache = fake_stack(tmp_path / "root", CopyCloner())
    missing = _tree_missing_a_blob(cas)
    with pytest.raises(MissingBlobError, match="not in the CAS"):
        cache.stage(missing, tmp_path / "exec")
    assert not (tmp_path / "exec").exists()
    assert [p.name for p in cache.cache_dir.iterdir() if p.is_dir()] == [], "no half-built entry either"


@SETTINGS
@given(spec=tree_specs(max_entries=30))
def test_tree_in_equals_tree_out_through_the_fake_cloner(tmp_path: Path, spec: Spec) -> None:
    base = _fresh_dir(tmp_path / "prop")
    cas, cache = fake_stack(base / "root", CopyCloner(), min_files=1)
    tree = build_tree(spec, cas)
    miss, hit = _stage_cold_then_warm(cache, tree, spec, base)
    assert miss.files == hit.files == tree.count_files()


def test_a_new_entry_is_not_the_first_evicted(tmp_path: Path) -> None:
    """Building an entry may push the cache over budget: the least recently used entry goes, not the new one."""
    cloner = CopyCloner()
    cas, cache = fake_stack(tmp_path / "root", cloner, max_bytes=None)
    old, new = InputTree(), InputTree()
    for i in range(5):
        old.add_file(f"lib/m{i}", FileNode(cas.ingest_bytes(b"old module %d" % i, executable=False)))
        new.add_file(f"lib/m{i}", FileNode(cas.ingest_bytes(b"new module %d" % i, executable=False)))
    cache.stage(old, tmp_path / "old")
    cache.max_bytes = cache.stats().bytes  # room for one entry
    report = cache.stage(new, tmp_path / "new")
    assert (report.subtree_misses, report.files) == (1, 5), "the new entry was built and cloned"
    assert not (cache.cache_dir / entry_key(old, "lib")).exists(), "the old entry made room"
    assert (cache.cache_dir / entry_key(new, "lib")).is_dir()
    assert read_back(tmp_path / "new")["lib/m0"] == ("file", (b"new module 0", False))


def test_the_stack_default_is_the_measured_threshold() -> None:
    """stack.py cannot import dircache at start-up: its copy of the measured threshold must not drift."""
    from treemat.dircache import MIN_SUBTREE_FILES
    from treemat.stack import DEFAULT_DIRCACHE_MIN_FILES

    assert DEFAULT_DIRCACHE_MIN_FILES == MIN_SUBTREE_FILES == DirectoryCache.__init__.__kwdefaults__["min_files"]


# ---------------------------------------------------------------------------- incremental eviction
# Sizes are recorded when an entry is built; a build under budget must not list or walk the cache.
