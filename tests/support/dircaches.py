"""A copying stand-in for the directory cache's cloner, and a cache over a fresh root wired with it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from treemat.backends import BackendProbe
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.dircache import DirectoryCache
from treemat.layout import Root
from treemat.materializer import Materializer
from treemat.merkle import MerkleIndex
from treemat.tree import InputTree


class CopyCloner:
    """A TreeCloner that copies instead of cloning in O(1), records its calls, and can be told to fail."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.mode_calls = 0
        self.entries: list[Path] = []
        self.clones: list[tuple[Path, Path]] = []

    def mode(self, cache_dir: Path) -> str:
        self.mode_calls += 1
        return "copytree"

    def new_entry(self, path: Path) -> None:
        os.mkdir(path, 0o755)
        self.entries.append(path)

    def clone(self, entry: Path, dest: Path) -> bool:
        self.clones.append((entry, dest))
        if self.fail:
            return False
        shutil.copytree(entry, dest, symlinks=True)
        return True


def fake_stack(
    root: Path, cloner: CopyCloner, min_files: int | None = 4, max_bytes: int | None = None
) -> tuple[ContentStore, DirectoryCache]:
    """A CAS and a directory cache over `root`, cloning with `cloner`."""
    counters = Counters()
    layout = Root(root)
    cas = ContentStore(layout, counters=counters)
    materializer = Materializer(cas, BackendProbe(), counters=counters)
    cache = DirectoryCache(
        layout.dircache, materializer, counters=counters, cloner=cloner, min_files=min_files, max_bytes=max_bytes
    )
    return cas, cache


def entry_key(tree: InputTree, *path: str) -> str:
    """The cache key (Merkle digest) of the subtree at `path`."""
    node = tree.root
    for name in path:
        node = node.dirs[name]
    return MerkleIndex().digest_of(node).hash
