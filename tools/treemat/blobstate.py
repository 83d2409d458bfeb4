"""The words for a blob's state that the guard, the stager and the pool share: its key, its inode, the
guard's mark, and the checks of a blob file (its fixed stat fingerprint; its bytes hashed).
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import NamedTuple

from treemat.fsprims import BLOB_MTIME_NS, blob_mode

_CHUNK = 1 << 20


PLAIN_FILE_MODE = stat.S_IFREG | blob_mode(False)


EXEC_FILE_MODE = stat.S_IFREG | blob_mode(True)


BlobKey = tuple[str, bool]  # (hash, executable)


class BlobIdentity(NamedTuple):
    """The inode a verified blob lives in."""

    device: int
    inode: int


class GuardMark(NamedTuple):
    """Where the guard stood when an action began: a different mark later means taints or lost trust since."""

    taint_generation: int
    trust_epoch: int


StagedBlobs = dict[BlobIdentity, tuple[str, BlobKey]]  # inode -> (a path it is staged at, its key)


class Recheck:
    """What the guard found after an action: blobs written since (quarantined: the stager forgets them), staged
    paths it could not hash again, and staged paths whose inode was written, with why (by path)."""

    __slots__ = ("hit", "missing", "tainted")

    def __init__(self, hit: list[BlobKey], missing: list[str], tainted: list[tuple[str, str]]) -> None:
        self.hit = hit
        self.missing = missing
        self.tainted = tainted


def stat_problem(info: os.stat_result, executable: bool, size: int) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "the blob is not a regular file"
    if info.st_size != size:
        return f"the blob has {info.st_size} bytes, its digest says {size}"
    if stat.S_IMODE(info.st_mode) != blob_mode(executable):
        return f"the blob's mode changed to {stat.S_IMODE(info.st_mode):o}"
    if info.st_mtime_ns != BLOB_MTIME_NS:
        return "the blob's mtime changed (written to)"
    return None


def hash_fd(fd: int) -> str:
    hasher = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest()


def hash_inode(identity: BlobIdentity, candidates: tuple[str, ...]) -> tuple[str, str] | None:
    """(path, sha256) of the first candidate path that is the inode `identity` (never followed); None if none is."""
    for candidate in candidates:
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) == (identity.device, identity.inode):
                return candidate, hash_fd(fd)
        finally:
            os.close(fd)
    return None


NO_BLOB = BlobIdentity(-1, -1)  # what a staged empty file links: no blob inode


class StagedFile:
    """One input file in an exec dir: which blob it is a hardlink to."""

    __slots__ = ("executable", "hash", "identity")

    def __init__(self, hash: str, executable: bool, identity: BlobIdentity) -> None:
        self.hash = hash
        self.executable = executable
        self.identity = identity

    def key(self) -> BlobKey:
        """What the file must be: (hash, executable)."""
        return (self.hash, self.executable)
