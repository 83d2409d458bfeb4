"""REAPI Merkle digests of input trees: each directory's canonical `Directory` message, hashed.

Kept apart from tree.py so that building and validating a tree never loads protobuf; the directory cache
(which keys its entries by these digests) is the only user on the request path.
"""

from __future__ import annotations

from treemat import protos
from treemat.digest import Digest, digest_bytes
from treemat.tree import DirectoryNode


class MerkleIndex:
    """REAPI Merkle digests of every directory in a tree (canonical `Directory` encoding), memoized."""

    def __init__(self) -> None:
        self._digests: dict[int, Digest] = {}
        self._keepalive: list[DirectoryNode] = []  # id() keys stay valid while the nodes live

    def digest_of(self, node: DirectoryNode) -> Digest:
        """Digest of `node`'s canonical Directory message (children sorted by name)."""
        known = self._digests.get(id(node))
        if known is not None:
            return known
        # iterative post-order so deep trees don't hit the recursion limit
        stack: list[tuple[DirectoryNode, bool]] = [(node, False)]
        while stack:
            current, children_done = stack.pop()
            if id(current) in self._digests:
                continue
            if not children_done:
                stack.append((current, True))
                stack.extend((child, False) for child in current.dirs.values() if id(child) not in self._digests)
                continue
            message = protos.Directory()
            for name in sorted(current.files):
                file = current.files[name]
                entry = message.files.add(name=name, is_executable=file.executable)
                entry.digest.hash = file.digest.hash
                entry.digest.size_bytes = file.digest.size
            for name in sorted(current.dirs):
                child_digest = self._digests[id(current.dirs[name])]
                sub = message.directories.add(name=name)
                sub.digest.hash = child_digest.hash
                sub.digest.size_bytes = child_digest.size
            for name in sorted(current.symlinks):
                message.symlinks.add(name=name, target=current.symlinks[name].target)
            self._digests[id(current)] = digest_bytes(message.SerializeToString(deterministic=True))
            self._keepalive.append(current)
        return self._digests[id(node)]
