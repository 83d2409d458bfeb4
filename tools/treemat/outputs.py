"""Declared outputs back to Bazel, by directory descriptor only: no path a tool could change is ever followed.

The source is the tool's view of its exec dir (a descriptor the sandbox handed back: the overlay's merged view,
or the staged copy); the destination is a descriptor of Bazel's execroot. Every component on either side is
opened with `O_NOFOLLOW` relative to its parent's descriptor, so a symlink planted anywhere (an output's parent
replaced by a link into TREEMAT_ROOT, say) is a refusal, never a redirected write, delete or rename.

- Every output is copied, never moved: a copy is a new inode (never a CAS blob, whatever links the tool made),
  sparse-aware (only data extents are copied) and bounded by the size the file had when opened.
- A relative symlink that stays inside the exec dir is kept; an absolute one into the exec dir is resolved to
  its content (inside the view, hop by hop); a link leaving the exec dir, or a device, FIFO or socket, is refused.
- Inside an output directory every entry is checked the same way; an entry that cannot be read is an error.
- A symlink that leads back to a directory containing it (`out/x -> ..`, an absolute link to the exec dir or
  to a directory being copied) is refused: copying it would never end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence

from treemat.errors import ExecutionError
from treemat.fsprims import file_kind
from treemat.tree import normalize_path

_SYMLINK_HOPS = 40
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_COPY_CHUNK = 1 << 30

Identity = tuple[int, int]  # (st_dev, st_ino) of a directory


class OutputView:
    """The tool's exec dir after it ran, as a descriptor; `prefixes` are the absolute paths the tool saw it at."""

    def __init__(self, view_fd: int, prefixes: Sequence[str]) -> None:
        self.fd = view_fd
        self.prefixes = tuple(prefix.rstrip("/") for prefix in prefixes)

    def inside(self, link_dir: str, target: str, what: str) -> str:
        """The view-relative path a symlink in `link_dir` to `target` names; refused if it leaves the view."""
        if os.path.isabs(target):
            normal = os.path.normpath(target)
            for prefix in self.prefixes:
                if normal == prefix:
                    return "."
                if normal.startswith(prefix + "/"):
                    return normal[len(prefix) + 1 :]
            raise ExecutionError(f"output {what!r} is a symlink to {target!r}, outside the exec dir: refused")
        inside = os.path.normpath(os.path.join(link_dir, target))
        if inside == ".." or inside.startswith("../"):
            raise ExecutionError(f"output {what!r} is a symlink to {target!r}, outside the exec dir: refused")
        return inside

    def open_parent(self, rel: str, what: str) -> tuple[int, str] | None:
        """(descriptor of `rel`'s parent, its last name), following no link; None if a parent is missing."""
        parts = rel.split("/")
        fd = os.dup(self.fd)
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, _DIR_PATH, dir_fd=fd)
                except FileNotFoundError:
                    os.close(fd)
                    return None
                except OSError as exc:
                    raise _parent_error(exc, what, part) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def parent_identities(self, rel: str) -> set[Identity]:
        """(dev, ino) of every directory above `rel` in the view (the view itself included), following no link."""
        fd = os.dup(self.fd)
        try:
            found = {_identity(os.fstat(fd))}
            for part in rel.split("/")[:-1]:
                child = os.open(part, _DIR_PATH, dir_fd=fd)
                os.close(fd)
                fd = child
                found.add(_identity(os.fstat(fd)))
        finally:
            os.close(fd)
        return found

    def resolve(self, rel: str, what: str) -> tuple[int, str, os.stat_result] | None:
        """Follow symlinks inside the view from `rel` to a file or directory: (parent fd, name, lstat) or None."""
        for _hop in range(_SYMLINK_HOPS):
            if rel == ".":
                return os.dup(self.fd), ".", os.stat(self.fd)
            opened = self.open_parent(rel, what)
            if opened is None:
                return None
            parent, name = opened
            try:
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                os.close(parent)
                return None
            if not stat.S_ISLNK(info.st_mode):
                return parent, name, info
            target = os.readlink(name, dir_fd=parent)
            os.close(parent)
            rel = self.inside(os.path.dirname(rel), target, what)
        raise ExecutionError(f"output {what!r}: too many levels of symlinks")


def collect_outputs(outputs: Sequence[str], view: OutputView, execroot_fd: int) -> list[str]:
    """Copy each declared output (file or directory) from the view into the execroot; returns the missing ones."""
    missing: list[str] = []
    for output in outputs:
        rel = normalize_path(output)
        opened = view.open_parent(rel, rel)
        if opened is None:
            missing.append(rel)
            continue
        parent, name = opened
        try:
            try:
                info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                missing.append(rel)
                continue
            # the directories the copy must never come back to: the output's parents (for a link or a directory)
            above = set() if stat.S_ISREG(info.st_mode) else view.parent_identities(rel)
            with _destination_parent(execroot_fd, rel) as (dst_parent, dst_name):
                _clear(dst_parent, dst_name, rel)
                try:
                    _copy_entry(view, parent, name, info, dst_parent, dst_name, rel, above)
                except RecursionError:
                    raise ExecutionError(f"output {rel!r} is nested too deeply to copy: refused") from None
        finally:
            os.close(parent)
    return missing


def _copy_entry(
    view: OutputView,
    parent: int,
    name: str,
    info: os.stat_result,
    dst_parent: int,
    dst_name: str,
    rel: str,
    above: set[Identity],
) -> None:
    """Copy one entry (file, directory or symlink) of the view into `dst_parent`, by the rules above.

    `above` holds the directories that contain the entry (in the view and in this copy): reaching one again is
    a cycle.
    """
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(name, dir_fd=parent)
        inside = view.inside(os.path.dirname(rel), target, rel)
        if not os.path.isabs(target):
            if inside in (".", rel) or rel.startswith(inside + "/"):
                raise ExecutionError(f"output {rel!r} is a symlink to {target!r}, a directory containing it: refused")
            _check_link_target(view, inside, rel, target)
            os.symlink(target, dst_name, dir_fd=dst_parent)
            return
        resolved = view.resolve(inside, rel)
        if resolved is None:
            raise ExecutionError(f"output {rel!r} is a dangling symlink ({target!r})")
        real_parent, real_name, real_info = resolved
        try:
            if stat.S_ISDIR(real_info.st_mode) and _identity(real_info) in above:
                raise ExecutionError(f"output {rel!r} is a symlink to {target!r}, a directory containing it: refused")
            _copy_entry(view, real_parent, real_name, real_info, dst_parent, dst_name, rel, above)
        finally:
            os.close(real_parent)
    elif stat.S_ISREG(info.st_mode):
        copy_file_at(parent, name, dst_parent, dst_name, rel)
    elif stat.S_ISDIR(info.st_mode):
        _copy_directory(view, parent, name, dst_parent, dst_name, rel, above)
    else:
        raise ExecutionError(f"output {rel!r} is a {file_kind(info.st_mode)}: refused")


def _identity(info: os.stat_result) -> Identity:
    return (info.st_dev, info.st_ino)


def _check_link_target(view: OutputView, inside: str, rel: str, target: str) -> None:
    """A kept relative link must lead, inside the view, to a file or directory (not a device, not dangling)."""
    resolved = view.resolve(inside, rel)
    if resolved is None:
        return  # dangling relative links inside an output dir are kept as they are (Bazel checks declared ones)
    parent, _name, info = resolved
    os.close(parent)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ExecutionError(f"output {rel!r} is a symlink ({target!r}) to a {file_kind(info.st_mode)}: refused")


def _copy_directory(
    view: OutputView, parent: int, name: str, dst_parent: int, dst_name: str, rel: str, above: set[Identity]
) -> None:
    try:
        src = os.open(name, _DIR_READ, dir_fd=parent)
    except OSError as exc:
        raise ExecutionError(f"output directory {rel!r} cannot be read: {exc.strerror}") from None
    try:
        identity = _identity(os.fstat(src))
        if identity in above:
            raise ExecutionError(f"output {rel!r} leads back to a directory containing it: refused")
        above = above | {identity}
        os.mkdir(dst_name, 0o755, dir_fd=dst_parent)
        dst = os.open(dst_name, _DIR_PATH, dir_fd=dst_parent)
        try:
            for entry_name in sorted(os.listdir(src)):
                inner = f"{rel}/{entry_name}"
                entry_info = os.stat(entry_name, dir_fd=src, follow_symlinks=False)
                _copy_entry(view, src, entry_name, entry_info, dst, entry_name, inner, above)
        finally:
            os.close(dst)
    except PermissionError as exc:
        raise ExecutionError(f"output directory {rel!r} has an entry that cannot be read: {exc.strerror}") from None
    finally:
        os.close(src)


def copy_file_at(src_parent: int, src_name: str, dst_parent: int, dst_name: str, what: str) -> None:
    """Copy a regular file (checked through the open descriptor) to a new file, mode 0o755 or 0o644.

    Sparse-aware: only the data extents are copied (a huge hole costs nothing); never more than the size the
    file had when it was opened.
    """
    try:
        fd = os.open(src_name, _FILE_READ, dir_fd=src_parent)
    except OSError as exc:
        raise ExecutionError(f"output {what!r} cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ExecutionError(f"output {what!r} is a {file_kind(info.st_mode)}: refused")
        mode = 0o755 if info.st_mode & 0o111 else 0o644
        out = os.open(
            dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dst_parent
        )
        try:
            for start, end in _data_extents(fd, info.st_size):
                _copy_range(fd, out, start, end)
            os.ftruncate(out, info.st_size)
            os.fchmod(out, mode)
        finally:
            os.close(out)
    finally:
        os.close(fd)


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
        if copied == 0:
            return  # the file shrank while copied: the copy holds what was there
        offset += copied


@contextlib.contextmanager
def _destination_parent(root_fd: int, rel: str) -> Iterator[tuple[int, str]]:
    """The destination's parent directory as a descriptor (created as needed), following no link."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIR_PATH, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                child = _open_destination_dir(fd, part, rel)
            except OSError as exc:
                raise _parent_error(exc, rel, part) from None
            os.close(fd)
            fd = child
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _open_destination_dir(parent: int, part: str, rel: str) -> int:
    try:
        return os.open(part, _DIR_PATH, dir_fd=parent)
    except OSError as exc:
        raise _parent_error(exc, rel, part) from None


def _parent_error(exc: OSError, rel: str, part: str) -> ExecutionError:
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        return ExecutionError(f"output {rel!r}: its parent {part!r} is not a directory (a symlink?): refused")
    return ExecutionError(f"output {rel!r}: cannot open its parent {part!r}: {exc.strerror}")


def _clear(parent: int, name: str, rel: str) -> None:
    """Remove whatever is at `name` (a stale output), never following a link."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        remove_tree_at(parent, name)
    else:
        os.unlink(name, dir_fd=parent)


def remove_tree_at(parent: int, name: str) -> None:
    """Remove the directory `name` under `parent` and everything in it, by descriptor (mode-000 dirs included)."""
    try:
        fd = os.open(name, _DIR_READ, dir_fd=parent)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=parent)  # the tools are gone: nothing can swap it
        fd = os.open(name, _DIR_READ, dir_fd=parent)
    try:
        for entry in os.listdir(fd):
            info = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                remove_tree_at(fd, entry)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)
