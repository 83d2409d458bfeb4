"""Content digests: SHA-256 hex + size, in REAPI `hash/size` form.

Bazel hands treemat only the hash (as hex text); the size is learnt on ingest. Hashing is the expensive
part of staging (~250 ms for a 466 MB tree), so it happens once, when a blob enters the CAS.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import NamedTuple

from treemat.errors import DigestError

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def check_hash(text: str) -> str:
    """Return `text` as a normalised lowercase SHA-256 hex string, or raise DigestError."""
    lowered = text.strip().lower()
    if not _HEX64.match(lowered):
        raise DigestError(f"not a sha256 hex digest: {text[:80]!r}")
    return lowered


class _DigestFields(NamedTuple):
    hash: str
    size: int


class Digest(_DigestFields):
    """A blob's identity: lowercase SHA-256 hex and size in bytes (immutable, ordered by hash then size)."""

    __slots__ = ()

    def __new__(cls, hash: str, size: int) -> Digest:
        if not _HEX64.match(hash):
            raise DigestError(f"not a sha256 hex digest: {hash[:80]!r}")
        if size < 0:
            raise DigestError(f"negative size in digest {hash}/{size}")
        return super().__new__(cls, hash, size)

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"

    @property
    def is_empty(self) -> bool:
        """True for the zero-byte blob, which never touches the CAS."""
        return self.size == 0 and self.hash == EMPTY_SHA256

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `hash/size` (REAPI form). Raises DigestError on anything else."""
        hash_part, sep, size_part = text.strip().partition("/")
        if not sep or not size_part.isdigit():
            raise DigestError(f"digest must look like '<sha256 hex>/<size>': {text[:100]!r}")
        return cls(check_hash(hash_part), int(size_part))


EMPTY_DIGEST = Digest(EMPTY_SHA256, 0)


def digest_bytes(data: bytes) -> Digest:
    """Digest of an in-memory blob."""
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def digest_file(path: str | os.PathLike[str]) -> Digest:
    """Digest of a file's content, streamed in 1 MiB chunks."""
    hasher = hashlib.sha256()
    size = 0
    with open(Path(path), "rb", buffering=0) as handle:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            hasher.update(view[:count])
            size += count
    return Digest(hasher.hexdigest(), size)
