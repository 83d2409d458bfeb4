"""What the input stager learnt across requests, in one memo with one invalidation rule.

A warm worker sees the same inputs request after request. The memo keeps, per input as Bazel lists it, what
staging it needs (its normalized path, its node, its blob's size, its execroot path), the size of every blob
known to be in the CAS, and normalized paths.

The rule: a blob the guard rejected (or one found missing) is forgotten, and with it every input entry (an
entry names the blob it was admitted as). A new execroot drops the input entries (their execroot paths). Paths
are pure functions of their text and never go stale. Each table is cleared when it grows past `limit`.
Plain dict operations only (atomic under the GIL): callers on several threads need no lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import NamedTuple

from treemat.blobstate import BlobKey
from treemat.tree import FileNode, normalize_path


class KnownInput(NamedTuple):
    """One input as last staged: normalized path, node, blob size, path in the execroot."""

    path: str
    node: FileNode
    size: int
    full: str


class InputMemo:
    """Normalized paths, blob sizes and staged inputs, remembered across requests."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self._paths: dict[str, str] = {}
        self._sizes: dict[BlobKey, int] = {}  # blobs known to be in the CAS
        self._inputs: dict[Hashable, KnownInput] = {}
        self._execroot = ""  # the execroot the inputs' `full` paths are under

    def path(self, raw: str) -> str:
        """normalize_path, memoized (the same execroot paths come back in every request)."""
        path = self._paths.get(raw)
        if path is None:
            path = normalize_path(raw)
            if len(self._paths) > self.limit:
                self._paths.clear()
            self._paths[raw] = path
        return path

    def size(self, key: BlobKey) -> int | None:
        """The blob's size, if it was known to be in the CAS."""
        return self._sizes.get(key)

    def learn_size(self, key: BlobKey, size: int) -> None:
        """The blob is in the CAS with this size."""
        if len(self._sizes) > self.limit:
            self._sizes.clear()
        self._sizes[key] = size

    def use_execroot(self, execroot: str) -> None:
        """Requests from another execroot: the input entries' paths are not theirs."""
        if execroot != self._execroot:
            self._inputs.clear()
            self._execroot = execroot

    def known(self, item: Hashable) -> KnownInput | None:
        """The input as last staged (the caller checks it still holds), or None."""
        return self._inputs.get(item)

    def learn(self, item: Hashable, known: KnownInput) -> None:
        """Remember how an input was staged."""
        if len(self._inputs) > self.limit:
            self._inputs.clear()
        self._inputs[item] = known

    def forget(self, blobs: Iterable[BlobKey] | None = None) -> None:
        """Blobs that were rejected or found missing (None: any blob): forget them and every input entry."""
        if blobs is None:
            self._sizes.clear()
        for key in blobs or ():
            self._sizes.pop(key, None)
        self._inputs.clear()
