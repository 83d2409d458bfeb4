"""Declared outputs back to Bazel, by directory descriptor only: no path a tool could change is ever followed.

The source is the tool's view of its exec dir (a descriptor the sandbox handed back: the overlay's merged view,
or the staged copy); the destination is a descriptor of Bazel's execroot. Every component on either side is
opened with `O_NOFOLLOW` relative to its parent's descriptor, so a symlink planted anywhere (an output's parent
replaced by a link into TREEMAT_ROOT, say) is a refusal, never a redirected write, delete or rename.

- Every output is copied (outputcopy.py), never moved: a copy is a new inode (never a CAS blob; links the tool
  made among its outputs are kept among the copies),
  sparse-aware (only data extents are copied) and bounded by the size the file had when opened.
- A relative symlink that stays inside the exec dir is kept; an absolute one into the exec dir is resolved to
  its content (inside the view, hop by hop); a link leaving the exec dir, or a device, FIFO or socket, is refused.
- Inside an output directory every entry is checked the same way; an entry that cannot be read is an error, and
  a link back into a directory being walked (a loop) is refused, and so is a tree nested deeper than
  MAX_OUTPUT_DEPTH directories, and a directory reached more than MAX_DIRECTORY_VISITS times (absolute links
  to it, fanning out level after level, would copy it exponentially often).

One walker (`walk_entry`) applies these rules for every consumer; what becomes of an entry is its `OutputSink`'s
business: the worker's copies it into Bazel's execroot, the bot's (bot/outputs.py) stores it and builds REAPI
messages. Both therefore refuse the same entries with the same one-line errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

from treemat.errors import ExecutionError
from treemat.fsprims import file_kind
from treemat.outputcopy import CopySink
from treemat.tree import normalize_path

_SYMLINK_HOPS = 40
MAX_DIRECTORY_VISITS = 16  # walks of one directory in one action (absolute symlinks to it resolved to content)
MAX_OUTPUT_DEPTH = 128  # directories nested in one output dir: the walk recurses and holds two descriptors a level
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
H = TypeVar("H")


class OutputView:
    """The tool's exec dir after it ran, as a descriptor; `prefixes` are the absolute paths the tool saw it at."""

    def __init__(self, view_fd: int, prefixes: Sequence[str]) -> None:
        self.fd = view_fd
        self.prefixes = tuple(prefix.rstrip("/") for prefix in prefixes)
        self.visits: dict[tuple[int, int], int] = {}  # directory -> times walked (bounds symlinks fanning out)

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
        return _open_parent(self.fd, rel, what, create=False)

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


class OutputSink(Protocol[H]):
    """Where the walker delivers an output's entries; `into` is a directory of the sink's own (H)."""

    def file(self, fd: int, info: os.stat_result, into: H, name: str, rel: str) -> None:
        """A regular file, open for reading at `fd` (checked regular through it)."""

    def symlink(self, target: str, into: H, name: str, rel: str) -> None:
        """A relative symlink that stays inside the exec dir (its target checked, inside the view)."""

    def directory(self, into: H, name: str, rel: str) -> H:
        """A directory: make it in `into` and return it; its entries follow, then `close` (even on error)."""

    def close(self, directory: H, *, complete: bool) -> None:
        """The directory `directory` returned is done (`complete` False when the walk failed inside it)."""


def find_output(view: OutputView, output: str) -> tuple[int, str, os.stat_result] | None:
    """(parent descriptor, name, lstat) of a declared output in the view, following no link; None if absent."""
    rel = normalize_path(output)
    opened = view.open_parent(rel, rel)
    if opened is None:
        return None
    parent, name = opened
    try:
        return parent, name, os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.close(parent)
        return None
    except BaseException:
        os.close(parent)
        raise


def collect_outputs(outputs: Sequence[str], view: OutputView, execroot_fd: int, dirs: Sequence[str] = ()) -> list[str]:
    """Copy each declared output (file, or directory if in `dirs`) from the view into the execroot; returns the
    missing ones. A directory where a file was declared (or the reverse) is refused: Bazel only warns."""
    missing: list[str] = []
    sink, declared_dirs = CopySink(execroot_fd), {normalize_path(path) for path in dirs}
    for output in outputs:
        rel = normalize_path(output)
        found = find_output(view, rel)
        if found is None:
            missing.append(rel)
            continue
        parent, name, info = found
        try:
            _check_kind(view, rel, info, rel in declared_dirs)
            with _destination_parent(execroot_fd, rel) as (dst_parent, dst_name):
                _clear(dst_parent, dst_name, rel)
                try:
                    walk_entry(view, parent, name, info, sink, dst_parent, dst_name, rel)
                except BaseException as exc:
                    with contextlib.suppress(OSError):  # no partial output left behind (it would fill the disk)
                        _clear(dst_parent, dst_name, rel)
                    if isinstance(exc, OSError):
                        raise ExecutionError(
                            f"output {rel!r} not copied to the execroot: {exc.strerror or exc}"
                        ) from None
                    raise
        finally:
            os.close(parent)
    return missing


def _check_kind(view: OutputView, rel: str, info: os.stat_result, is_dir: bool) -> None:
    """A directory where a file was declared, or the reverse, is refused (a symlink: by what it leads to)."""
    if stat.S_ISLNK(info.st_mode):
        resolved = view.resolve(rel, rel)
        if resolved is None:
            return  # dangling: the walk says so
        os.close(resolved[0])
        info = resolved[2]
    if stat.S_ISDIR(info.st_mode) != is_dir:
        declared = "directory" if is_dir else "file"
        raise ExecutionError(f"output {rel!r} is a {file_kind(info.st_mode)}, declared a {declared}: refused")


def walk_entry(
    view: OutputView,
    parent: int,
    name: str,
    info: os.stat_result,
    sink: OutputSink[H],
    into: H,
    dst_name: str,
    rel: str,
    ancestors: frozenset[tuple[int, int]] = frozenset(),
) -> None:
    """Deliver one entry of the view (file, directory or symlink) to `sink` as `dst_name` in `into`, by the
    rules above; `ancestors` are the directories being walked (a link back into one is a loop: refused)."""
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(name, dir_fd=parent)
        inside = view.inside(os.path.dirname(rel), target, rel)
        if not os.path.isabs(target):
            if inside in (".", rel) or rel.startswith(inside + "/"):
                raise ExecutionError(f"output {rel!r} is a symlink to {target!r}, a directory containing it: refused")
            _check_link_target(view, inside, rel, target)
            sink.symlink(target, into, dst_name, rel)
            return
        resolved = view.resolve(inside, rel)
        if resolved is None:
            raise ExecutionError(f"output {rel!r} is a dangling symlink ({target!r})")
        real_parent, real_name, real_info = resolved
        try:
            walk_entry(view, real_parent, real_name, real_info, sink, into, dst_name, rel, ancestors)
        finally:
            os.close(real_parent)
    elif stat.S_ISREG(info.st_mode):
        try:
            fd = os.open(name, _FILE_READ, dir_fd=parent)
        except OSError as exc:
            raise ExecutionError(f"output {rel!r} cannot be read: {exc.strerror}") from None
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise ExecutionError(f"output {rel!r} is a {file_kind(opened.st_mode)}: refused")
            sink.file(fd, opened, into, dst_name, rel)
        finally:
            os.close(fd)
    elif stat.S_ISDIR(info.st_mode):
        _walk_directory(view, parent, name, sink, into, dst_name, rel, ancestors)
    else:
        raise ExecutionError(f"output {rel!r} is a {file_kind(info.st_mode)}: refused")


def _check_link_target(view: OutputView, inside: str, rel: str, target: str) -> None:
    """A kept relative link must lead, inside the view, to a file or directory (not a device, not dangling)."""
    resolved = view.resolve(inside, rel)
    if resolved is None:
        return  # dangling relative links inside an output dir are kept as they are (Bazel checks declared ones)
    parent, _name, info = resolved
    os.close(parent)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ExecutionError(f"output {rel!r} is a symlink ({target!r}) to a {file_kind(info.st_mode)}: refused")


def _walk_directory(
    view: OutputView,
    parent: int,
    name: str,
    sink: OutputSink[H],
    into: H,
    dst_name: str,
    rel: str,
    ancestors: frozenset[tuple[int, int]],
) -> None:
    try:
        src = os.open(name, _DIR_READ, dir_fd=parent)
    except OSError as exc:
        raise ExecutionError(f"output directory {rel!r} cannot be read: {exc.strerror}") from None
    try:
        here = os.fstat(src)
        key = (here.st_dev, here.st_ino)
        if len(ancestors) >= MAX_OUTPUT_DEPTH:
            raise ExecutionError(
                f"output {rel[:200]!r}... is nested deeper than {MAX_OUTPUT_DEPTH} directories: refused"
            )
        if key in ancestors:
            raise ExecutionError(f"output {rel!r} leads back into a directory that contains it (a loop): refused")
        view.visits[key] = visits = view.visits.get(key, 0) + 1
        if visits > MAX_DIRECTORY_VISITS:  # links fanning out level after level: the copy would grow exponentially
            raise ExecutionError(
                f"output {rel[:200]!r} reaches a directory copied {MAX_DIRECTORY_VISITS} times already: refused"
            )
        directory = sink.directory(into, dst_name, rel)
        complete = False
        try:
            for entry_name in sorted(os.listdir(src)):
                inner = f"{rel}/{entry_name}"
                entry_info = os.stat(entry_name, dir_fd=src, follow_symlinks=False)
                walk_entry(view, src, entry_name, entry_info, sink, directory, entry_name, inner, ancestors | {key})
            complete = True
        finally:
            sink.close(directory, complete=complete)
    except PermissionError as exc:
        raise ExecutionError(f"output directory {rel!r} has an entry that cannot be read: {exc.strerror}") from None
    finally:
        os.close(src)


@contextlib.contextmanager
def _destination_parent(root_fd: int, rel: str) -> Iterator[tuple[int, str]]:
    """The destination's parent directory as a descriptor (created as needed), following no link."""
    opened = _open_parent(root_fd, rel, rel, create=True)
    assert opened is not None  # created as needed: never missing
    fd, name = opened
    try:
        yield fd, name
    finally:
        os.close(fd)


def _open_parent(root_fd: int, rel: str, what: str, *, create: bool) -> tuple[int, str] | None:
    """(descriptor of `rel`'s parent under `root_fd`, its last name), following no link at any component; a
    missing parent is made (`create`) or the answer is None."""
    parts = rel.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIR_PATH, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    child = os.open(part, _DIR_PATH, dir_fd=fd)
                except OSError as exc:
                    raise _parent_error(exc, what, part) from None
            except OSError as exc:
                raise _parent_error(exc, what, part) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


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
