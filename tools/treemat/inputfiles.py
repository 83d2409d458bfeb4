"""Execroot paths into input-tree entries, for the inputs the stager's memo cannot vouch for.

A regular file's blob comes from one call to the guard (`obtain`: admitted, or ingested and verified against
Bazel's digest when the CAS lacks it). A directory input is walked: regular files are ingested, in-tree
relative symlinks kept, anything else refused by name. What a path is not (missing, a FIFO, a device) is an
ExecutionError naming it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from treemat.blobguard import BlobGuard
from treemat.blobstate import BlobIdentity, StagedBlobs
from treemat.digest import Digest
from treemat.errors import ExecutionError
from treemat.fsprims import file_kind
from treemat.inputmemo import InputMemo
from treemat.tree import FileNode, InputTree

MAX_INPUT_DEPTH = 256  # directories nested in one directory input


class InputFiles:
    """One normalized input path under an execroot: a regular file's node and blob, or a directory input's entries."""

    def __init__(self, guard: BlobGuard, memo: InputMemo) -> None:
        self.guard = guard
        self.memo = memo  # blob sizes: read before an admission, learnt after one

    def read_input(
        self, tree: InputTree, execroot: Path, path: str, expected: str | None, staged: StagedBlobs
    ) -> tuple[FileNode, BlobIdentity | None] | None:
        """Stat `path`: a regular file's node (its blob admitted or ingested, and verified against `expected`) and
        blob inode, for the caller to add; a directory input added to `tree` entry by entry (None); else refused.
        Every blob inode goes into `staged` (identity -> (a path, its key))."""
        full = f"{execroot}/{path}"
        info = stat_input(full, path)
        if stat.S_ISDIR(info.st_mode):
            self._add_directory(tree, execroot, path, staged)
            return None
        if not stat.S_ISREG(info.st_mode):
            raise ExecutionError(f"input {path!r} is a {file_kind(info.st_mode)}: refused (not a regular file)")
        executable = bool(info.st_mode & 0o111)
        digest, identity = self._obtain(full, expected, executable, path)
        if identity is not None:
            staged.setdefault(identity, (path, (digest.hash, executable)))
        return FileNode(digest, executable, source=full), identity

    def _add_directory(self, tree: InputTree, execroot: Path, path: str, staged: StagedBlobs) -> None:
        """A directory input (source directory / tree artifact): files, empty dirs and in-tree symlinks.

        Every entry has a defined answer: regular files are ingested (hashed), symlinks that stay inside the
        directory are kept as symlinks, and anything else (a symlink leaving it, a FIFO, socket or device) is
        refused with an error naming it. Nothing is silently dropped.
        """
        top = os.path.join(execroot, path)
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, execroot)
            if rel_dir.count("/") - path.count("/") >= MAX_INPUT_DEPTH:  # (os.walk recurses, a descriptor a level)
                raise ExecutionError(
                    f"directory input {path!r} is nested deeper than {MAX_INPUT_DEPTH} directories: refused"
                )
            if not filenames and not dirnames:
                tree.add_directory(rel_dir)
            for name in [*dirnames, *filenames]:
                full = os.path.join(dirpath, name)
                rel = f"{rel_dir}/{name}"
                info = os.lstat(full)
                if stat.S_ISDIR(info.st_mode):
                    continue  # walked into
                if stat.S_ISLNK(info.st_mode):
                    tree.add_symlink(rel, _inner_symlink_target(full, rel, path))
                elif stat.S_ISREG(info.st_mode):
                    executable = bool(info.st_mode & 0o111)
                    digest, identity = self._obtain(full, None, executable, rel)
                    if identity is not None:
                        staged.setdefault(identity, (rel, (digest.hash, executable)))
                    tree.add_file(rel, FileNode(digest, executable, source=full))
                else:
                    raise ExecutionError(
                        f"input {rel!r} (inside directory input {path!r}) is a {file_kind(info.st_mode)}: refused"
                    )

    def _obtain(
        self, full: str | Path, expected: str | None, executable: bool, path: str
    ) -> tuple[Digest, BlobIdentity | None]:
        """The blob's digest and inode (None for the empty file), from the guard in one call (which ingests, and
        verifies, the execroot file if the CAS lacks it)."""
        key = (expected, executable) if expected is not None else None
        obtained = self.guard.obtain(full, expected, executable, self.memo.size(key) if key is not None else None)
        if obtained is None:
            raise ExecutionError(f"input {path!r}: its blob vanished or was rejected right after ingest")
        size = obtained[0].size
        if size:
            self.memo.learn_size(key or (obtained[0].hash, executable), size)
        return obtained


def stat_input(full: str | Path, path: str) -> os.stat_result:
    """`os.stat` of an input's execroot path; ExecutionError naming the input where it cannot be read."""
    try:
        return os.stat(full)
    except FileNotFoundError:
        raise ExecutionError(f"input {path!r} does not exist in the execroot") from None
    except OSError as exc:
        raise ExecutionError(f"input {path!r}: {exc.strerror}") from None


def _inner_symlink_target(full: str, rel: str, top: str) -> str:
    """A symlink inside a directory input is kept only if it is relative and stays inside that directory."""
    target = os.readlink(full)
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    if os.path.isabs(target) or not (resolved == top or resolved.startswith(top.rstrip("/") + "/")):
        raise ExecutionError(
            f"input {rel!r} is a symlink to {target!r}, outside directory input {top!r}: refused "
            "(only relative symlinks that stay inside a directory input are staged)"
        )
    return target
