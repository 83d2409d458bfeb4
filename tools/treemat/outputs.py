"""Declared outputs back to Bazel: found in the tool's view of its exec dir, checked, moved or copied.

Relative symlinks that stay inside the exec dir are kept; absolute ones into it are resolved to content; a
symlink leaving the exec dir, or to a device, FIFO or socket, is refused, and so is such a file itself. Under the
overlay, outputs live in the upper dir; whatever is found in the staged (lower) tree is copied, never moved,
because that tree is reused for the next action.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from treemat.errors import ExecutionError
from treemat.fsprims import file_kind
from treemat.tree import normalize_path

_SYMLINK_HOPS = 40


def collect_outputs(outputs: list[str], execroot: Path, exec_dir: Path, upper: Path | None) -> list[str]:
    """Move each declared output (file or directory) from the tool's view to the execroot; returns the missing."""
    view = ExecView(exec_dir, upper)
    missing: list[str] = []
    for output in outputs:
        rel = normalize_path(output)
        src = view.find(rel)
        if src is None:
            missing.append(rel)
            continue
        if view.in_lower(src):
            # untouched by the tool (an empty output dir treemat prepared): the staged tree keeps it
            _copy_out_of_lower(src, execroot / rel, rel, view)
            continue
        move_output(src, execroot / rel, rel, view)
    return missing


class ExecView:
    """The tool's view of its exec dir after it ran: the overlay's upper dir over the staged tree, if any."""

    def __init__(self, exec_dir: Path, upper: Path | None) -> None:
        self.exec_dir = exec_dir
        self.upper = upper if upper is not None and upper.is_dir() else None

    def find(self, rel: str) -> Path | None:
        """Where `rel` is now, or None if it does not exist (a whiteout counts as deleted)."""
        if self.upper is not None:
            candidate = self.upper / rel
            try:
                info = os.lstat(candidate)
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                return None
            else:
                return None if _is_whiteout(info) else candidate
        candidate = self.exec_dir / rel
        return candidate if os.path.lexists(candidate) else None

    def in_lower(self, path: Path) -> bool:
        """True if `path` is in the staged tree under an overlay (which must stay as staged)."""
        return self.upper is not None and not path.is_relative_to(self.upper)

    def check_relative(self, link_dir: str, target: str, what: str) -> None:
        """A relative symlink output is kept as is, but only if it stays inside the exec dir."""
        inside = os.path.normpath(os.path.join(link_dir, target))
        if inside == ".." or inside.startswith("../"):
            raise ExecutionError(f"output {what!r} is a symlink to {target!r}, outside the exec dir: refused")

    def resolve(self, rel: str, link_dir: str, target: str, what: str) -> Path:
        """Follow a symlink (chain) inside the exec dir to a regular file or directory; refuse anything else."""
        for _hop in range(_SYMLINK_HOPS):
            if os.path.isabs(target):
                inside = os.path.relpath(os.path.normpath(target), self.exec_dir)
            else:
                inside = os.path.normpath(os.path.join(link_dir, target))
            if inside == ".." or inside.startswith("../") or os.path.isabs(inside):
                raise ExecutionError(f"output {what!r} is a symlink to {target!r}, outside the exec dir: refused")
            found = self.find(inside) if inside != "." else self.exec_dir
            if found is None:
                raise ExecutionError(f"output {what!r} is a dangling symlink ({target!r})")
            info = os.lstat(found)
            if stat.S_ISLNK(info.st_mode):
                link_dir, target = os.path.dirname(inside), os.readlink(found)
                continue
            if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                return found
            raise ExecutionError(f"output {what!r} leads to a {file_kind(info.st_mode)}: refused")
        raise ExecutionError(f"output {what!r}: too many levels of symlinks")


def _is_whiteout(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


def move_output(src: Path, dst: Path, rel: str, view: ExecView) -> None:
    """Move one output to the execroot.

    Relative symlinks that stay inside the exec dir are kept; absolute ones into it are resolved to content;
    a symlink leaving the exec dir, or to a device, FIFO or socket, is refused, and so is such a file itself.
    Inside output directories the same rules apply to every entry.
    """
    info = os.lstat(src)
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(src)
        if not os.path.isabs(target):
            view.check_relative(os.path.dirname(rel), target, rel)
            _clear(dst)
            os.symlink(target, dst)
            return
        resolved = view.resolve(rel, os.path.dirname(rel), target, rel)
        _clear(dst)
        if resolved.is_dir():
            _copy_tree(resolved, dst, rel, view)
        else:
            _copy_file(resolved, dst)
        return
    if stat.S_ISDIR(info.st_mode):
        _check_output_tree(src, rel, view)
    elif not stat.S_ISREG(info.st_mode):
        raise ExecutionError(f"output {rel!r} is a {file_kind(info.st_mode)}: refused")
    _clear(dst)
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        # a tool hardlinked an input into its output: moving that link would hand Bazel the CAS blob's inode
        _copy_file(src, dst)
        return
    try:
        os.replace(src, dst)
    except OSError:
        if src.is_dir():
            _copy_tree(src, dst, rel, view)
        else:
            _copy_file(src, dst)


def _copy_out_of_lower(src: Path, dst: Path, rel: str, view: ExecView) -> None:
    """An output found in the overlay's lower layer is copied out, never moved (the staged tree is reused)."""
    info = os.lstat(src)
    _clear(dst)
    if stat.S_ISDIR(info.st_mode):
        with os.scandir(src) as entries:
            empty = next(entries, None) is None
        if empty:  # the output dir treemat prepared, left empty: nothing to copy or check
            os.mkdir(dst)
            return
        _copy_tree(src, dst, rel, view)
    elif stat.S_ISREG(info.st_mode):
        _copy_file(src, dst)
    else:
        raise ExecutionError(f"output {rel!r} is a {file_kind(info.st_mode)}: refused")


def _check_output_tree(top: Path, rel: str, view: ExecView) -> None:
    """Inside an output directory: resolve absolute symlinks into the exec dir, refuse escapes and devices."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            inner = os.path.join(rel, os.path.relpath(full, top))
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(full)
                if not os.path.isabs(target):
                    view.check_relative(os.path.dirname(inner), target, inner)
                else:
                    resolved = view.resolve(inner, os.path.dirname(inner), target, inner)
                    os.unlink(full)
                    if resolved.is_dir():
                        _copy_tree(resolved, Path(full), inner, view)
                    else:
                        _copy_file(resolved, Path(full))
            elif _is_whiteout(info):
                os.unlink(full)
            elif not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise ExecutionError(f"output {inner!r} is a {file_kind(info.st_mode)}: refused")


def _clear(dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        shutil.rmtree(dst)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a regular file (checked through the open descriptor: never a device), mode 0o755/0o644."""
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ExecutionError(f"output {src.name!r} is a {file_kind(info.st_mode)}: refused")
        mode = 0o755 if info.st_mode & 0o111 else 0o644
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            offset, size = 0, info.st_size  # bounded by the size the file had when opened
            while offset < size:
                try:
                    copied = os.copy_file_range(fd, out, min(size - offset, 1 << 30), offset, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    os.lseek(out, offset, os.SEEK_SET)
                    copied = os.sendfile(out, fd, offset, min(size - offset, 1 << 30))  # across filesystems
                if copied == 0:
                    break
                offset += copied
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _copy_tree(src: Path, dst: Path, rel: str, view: ExecView) -> None:
    shutil.copytree(src, dst, symlinks=True)
    _check_output_tree(dst, rel, view)
