"""Whole-tree clones for the directory cache (dircache.py): the platform's O(1) copy of a directory, if any.

clonefile(2) of a directory on macOS, a btrfs subvolume snapshot on Linux; elsewhere (ext4, xfs, tmpfs) there
is none, and the cache stands aside. `TreeCloner` is what the cache needs (tests inject a plain copy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol

from treemat.fsprims import clone_tree, create_subvolume, is_btrfs


class TreeCloner(Protocol):
    """The whole-tree operations the cache needs from the platform (injectable: tests use a plain copy)."""

    def mode(self, cache_dir: Path) -> str:
        """The method's name where a whole tree clones in O(1) at `cache_dir`, else 'off'."""
        ...

    def new_entry(self, path: Path) -> None:
        """Create the empty directory (0o755) an entry is built in; called only when `mode` is not 'off'."""
        ...

    def clone(self, entry: Path, dest: Path) -> bool:
        """Clone the read-only tree `entry` to `dest` (must not exist) whole; False where that is impossible."""
        ...


class KernelTreeCloner:
    """The real cloner: clonefile(2) of a directory on macOS, a btrfs subvolume snapshot on Linux."""

    def mode(self, cache_dir: Path) -> str:
        """'clonefile' (macOS), 'snapshot' (btrfs), or 'off' (no O(1) whole-tree clone here)."""
        if sys.platform == "darwin":
            return "clonefile"
        cache_dir.mkdir(parents=True, exist_ok=True)
        return "snapshot" if is_btrfs(cache_dir) else "off"

    def new_entry(self, path: Path) -> None:
        """A plain directory for clonefile(2); a subvolume (what can be snapshotted) on btrfs."""
        if sys.platform == "darwin":
            os.mkdir(path, 0o755)
        else:
            create_subvolume(path)
            os.chmod(path, 0o755)

    def clone(self, entry: Path, dest: Path) -> bool:
        """One clonefile(2) / snapshot call."""
        return clone_tree(entry, dest)
