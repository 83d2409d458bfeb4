"""Copying the tool's outputs into Bazel's execroot: the worker's sink for the output walker (outputs.py).

- a copy is a new file, mode 0o755 or 0o644, sparse-aware (only data extents are copied, a huge hole costs
  nothing) and never more than the size the file had when it was opened; a file that changes while it is copied
  (size, modification or change time) fails the copy: the action fails, never gets mixed or zero-padded bytes;
- a file reached again (a hardlink, an absolute symlink resolved to its content) is linked to its first copy:
  copied one by one, 10 MB linked 100 times by the tool (at no cost in its tmpfs) were 1 GB in the execroot,
  a tool could fill Bazel's disk with links.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from treemat.errors import ExecutionError

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 30


class CopySink:
    """New files, directories and links under destination directory descriptors below `root_fd` (the
    execroot); `rel` of each entry is its path below `root_fd`."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._copies: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) in the view -> the copy's rel

    def file(self, fd: int, info: os.stat_result, into: int, name: str, rel: str) -> None:
        key = (info.st_dev, info.st_ino)
        first = self._copies.get(key)
        if first is not None:
            try:
                os.link(first, name, src_dir_fd=self.root_fd, dst_dir_fd=into, follow_symlinks=False)
                return
            except OSError as exc:  # EMLINK, or the first copy is gone: a copy of its own
                if exc.errno not in (errno.EMLINK, errno.ENOENT, errno.EXDEV, errno.EPERM):
                    raise
        copy_open_file(fd, info, into, name, rel)
        self._copies[key] = rel

    def symlink(self, target: str, into: int, name: str, rel: str) -> None:
        os.symlink(target, name, dir_fd=into)

    def directory(self, into: int, name: str, rel: str) -> int:
        os.mkdir(name, 0o755, dir_fd=into)
        return os.open(name, _DIR_PATH, dir_fd=into)

    def close(self, directory: int, *, complete: bool) -> None:
        os.close(directory)


def copy_open_file(fd: int, info: os.stat_result, dst_parent: int, dst_name: str, what: str = "") -> None:
    """Copy the regular file open at `fd` (`info`: its fstat when opened) to a new file, mode 0o755 or 0o644.

    Sparse-aware: only the data extents are copied (a huge hole costs nothing); never more than the size the
    file had when it was opened; ExecutionError (naming `what`) if it changed meanwhile.
    """
    mode = 0o755 if info.st_mode & 0o111 else 0o644
    out = os.open(
        dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dst_parent
    )
    try:
        for start, end in _data_extents(fd, info.st_size):
            _copy_range(fd, out, start, end)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (info.st_size, info.st_mtime_ns, info.st_ctime_ns):
            raise ExecutionError(f"output {what or dst_name!r} changed while it was copied (a process still writes it)")
        os.ftruncate(out, info.st_size)
        os.fchmod(out, mode)
    finally:
        os.close(out)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of `fd` that hold data, up to `size` (the whole file where holes are unknown)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole is left
            yield offset, size  # no SEEK_DATA here: copy everything
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    offset = start
    while offset < end:
        length = min(end - offset, _COPY_CHUNK)
        try:
            copied = os.copy_file_range(src, dst, length, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.lseek(dst, offset, os.SEEK_SET)
            copied = os.sendfile(dst, src, offset, length)
        if copied == 0:  # the file shrank while copied: the size check after the copy refuses it
            return
        offset += copied
