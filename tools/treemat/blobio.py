"""The byte-level half of ingesting a blob: its temp file, copying while hashing, and the errors it reports.

cas.py decides where a blob goes and publishes it; this module moves and hashes the bytes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

from treemat.digest import Digest
from treemat.errors import CasError, CorruptBlobError
from treemat.fsprims import reflink_fd

_CHUNK = 1 << 20
_INGEST_CHUNK = 1 << 18  # read, hashed and written while still in the CPU's cache


class TempBlob:
    """A temp file being written: its descriptor, and its name when it is not an unnamed O_TMPFILE."""

    __slots__ = ("fd", "name")

    def __init__(self, fd: int, name: str | None) -> None:
        self.fd = fd
        self.name = name

    def seal(self) -> None:
        """Swap the writable descriptor for a read-only one (the write one's close event happens now)."""
        read_only = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        if self.name is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # a fresh named file is inside the sweep's grace period
            fcntl.flock(read_only, fcntl.LOCK_EX)
        os.close(self.fd)
        self.fd = read_only

    def close(self) -> None:
        """Close whichever descriptor is held."""
        os.close(self.fd)


def check_expected(
    digest: Digest, expected_hash: str | None, expected_size: int | None, source: str | os.PathLike[str]
) -> None:
    if expected_hash is not None and digest.hash != expected_hash:
        raise CorruptBlobError(
            f"{source}: content hashes to {digest.hash[:16]}… but {expected_hash[:16]}… was expected "
            "(the file changed after Bazel digested it?)"
        )
    if expected_size is not None and digest.size != expected_size:
        raise CorruptBlobError(f"{source}: {digest.size} bytes, but its digest declares {expected_size}")


def io_error(exc: OSError, doing: str) -> CasError:
    if exc.errno == errno.ENOSPC:
        return CasError(f"disk full while {doing}: free space or run `treemat cas gc`")
    return CasError(f"{exc.strerror or exc} while {doing}")


def copy_and_hash(src_fd: int, dst_fd: int, source: str | os.PathLike[str], *, reflink: bool = False) -> Digest:
    """Copy src into the empty dst and hash exactly the bytes dst holds.

    With `reflink`, dst first shares src's extents (FICLONE) and is then read back and hashed. Otherwise, or
    where the reflink fails, one pass: each chunk read from src is hashed and written to dst, the same
    immutable bytes object for both, so the digest is of what was written.
    """
    hasher = hashlib.sha256()
    size = 0
    try:
        if reflink:
            try:
                reflink_fd(src_fd, dst_fd)
            except OSError:
                pass  # not here (another filesystem, no reflink support): copy below
            else:
                while chunk := os.read(dst_fd, _CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
                return Digest(hasher.hexdigest(), size)
        while chunk := os.read(src_fd, _INGEST_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]
    except OSError as exc:
        raise io_error(exc, f"ingesting {source}") from None
    return Digest(hasher.hexdigest(), size)
