"""Tests for treemat.dircache: whole-subtree clones (btrfs snapshots here), hits/misses, pins, eviction."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from treemat.backends import BackendProbe
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.dircache import DirectoryCache
from treemat.fsprims import is_subvolume, remove_tree
from treemat.locking import file_lock
from treemat.materializer import Materializer
from treemat.merkle import MerkleIndex
from treemat.tree import FileNode, InputTree

from .treegen import Spec, build_tree, expected_view, read_back, tree_specs


def _stack(root: Path, min_files: int | None = 4, max_bytes: int | None = None) -> tuple[ContentStore, DirectoryCache]:
    counters = Counters()
    cas = ContentStore(root, counters=counters)
    cache = DirectoryCache(
        root,
        Materializer(cas, BackendProbe(), counters=counters),
        counters=counters,
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


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(spec=tree_specs(max_entries=30))
def test_tree_in_equals_tree_out_through_the_cache(btrfs_dir: Path, spec: Spec) -> None:
    base = btrfs_dir / "prop"
    if base.exists():
        remove_tree(base)
    base.mkdir()
    cas, cache = _stack(base / "root", min_files=1)
    tree = build_tree(spec, cas)
    miss = cache.stage(tree, base / "cold")
    hit = cache.stage(tree, base / "warm")
    assert read_back(base / "cold") == expected_view(spec)
    assert read_back(base / "warm") == expected_view(spec)
    assert hit.subtree_misses == 0
    assert hit.subtree_hits == miss.subtree_misses


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
    missing = InputTree()
    from treemat.digest import digest_bytes

    missing.add_file("sdk/x", FileNode(digest_bytes(b"never stored")))
    for i in range(5):
        missing.add_file(f"sdk/y{i}", FileNode(cas.ingest_bytes(b"y%d" % i, executable=False)))
    with pytest.raises(Exception, match="not in the CAS"):
        cache.stage(missing, base / "exec")
    assert not (base / "exec").exists()
    assert not [p for p in cache.cache_dir.iterdir() if p.name.startswith(".tmp")]
    cache.stage(tree, base / "ok")
    shutil.rmtree(base / "ok", ignore_errors=True)
