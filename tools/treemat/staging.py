"""The stager interface: put an input tree under a new directory, and report what that took.

`materializer.Materializer` implements it file by file; `dircache.DirectoryCache` decorates any Stager,
cloning repeated subtrees whole and handing the rest of the tree to the stager it wraps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from treemat.tree import DirectoryNode, InputTree

Progress = Callable[[int], None]


class StageReport:
    """What staging one tree did: files placed per method, plus subtree cache figures."""

    __slots__ = (
        "bytes",
        "files",
        "hardlinked",
        "methods",
        "seconds",
        "subtree_files",
        "subtree_hits",
        "subtree_misses",
    )

    def __init__(
        self,
        files: int = 0,
        bytes: int = 0,
        methods: dict[str, int] | None = None,
        hardlinked: list[tuple[str, bool]] | None = None,
        subtree_hits: int = 0,
        subtree_misses: int = 0,
        subtree_files: int = 0,
        seconds: float = 0.0,
    ) -> None:
        self.files = files
        self.bytes = bytes
        self.methods: dict[str, int] = {} if methods is None else methods
        self.hardlinked: list[tuple[str, bool]] = [] if hardlinked is None else hardlinked
        self.subtree_hits = subtree_hits
        self.subtree_misses = subtree_misses
        self.subtree_files = subtree_files
        self.seconds = seconds

    def count(self, method: str, amount: int) -> None:
        """Record `amount` files placed with `method`."""
        self.methods[method] = self.methods.get(method, 0) + amount

    def merge(self, other: StageReport) -> None:
        """Add another report's figures into this one (time excluded)."""
        self.files += other.files
        self.bytes += other.bytes
        for name, amount in other.methods.items():
            self.count(name, amount)
        self.hardlinked.extend(other.hardlinked)
        self.subtree_hits += other.subtree_hits
        self.subtree_misses += other.subtree_misses
        self.subtree_files += other.subtree_files

    def to_json(self) -> dict[str, object]:
        """Plain-JSON form (hardlinked blobs summarized as a count)."""
        return {
            "files": self.files,
            "bytes": self.bytes,
            "methods": dict(self.methods),
            "hardlinked": len(self.hardlinked),
            "subtree_hits": self.subtree_hits,
            "subtree_misses": self.subtree_misses,
            "subtree_files": self.subtree_files,
            "seconds": round(self.seconds, 6),
        }


class Stager(Protocol):
    """Something that can build an input tree on disk."""

    def stage(self, tree: InputTree | DirectoryNode, dest: Path, *, progress: Progress | None = None) -> StageReport:
        """Create `dest` (must not exist) holding the tree; nothing is left behind on failure."""
        ...

    def fill(self, node: DirectoryNode, dest: Path) -> StageReport:
        """Build the tree inside `dest`, an existing empty directory (e.g. a fresh subvolume); no cleanup."""
        ...
