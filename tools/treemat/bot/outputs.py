"""An action's outputs as REAPI messages: the bot's sink for the worker's output walker (treemat.outputs).

The walker (through bot/stager.py) applies the worker's rules to every entry of the command's view: no link is
followed on the way, relative links are kept only when they stay inside the input root, absolute links into it
are resolved there, anything leaving it, any device, FIFO or socket, any loop and any unreadable entry is
refused with the worker's one-line error. This sink only stores each file in the local CAS (to be uploaded) and
builds the OutputFile / OutputSymlink / OutputDirectory (Tree) messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treemat.bot.remote_cas import to_proto
from treemat.bot.rpc import re_pb2
from treemat.bot.stager import Digest, ExecutionError, LocalStager, StagedAction, digest_bytes, normalize_path

Blobs = dict[str, tuple[Digest, "Path | bytes"]]


@dataclass(slots=True)
class _Dir:
    """A Directory message being built, with the directories built under it."""

    message: Any = field(default_factory=lambda: re_pb2.Directory())
    parent: _Dir | None = None
    name: str = ""
    subdirs: list[_Dir] = field(default_factory=list)
    digest: Digest | None = None


class ReapiSink:
    """Files into the local CAS (and `blobs`, for upload); directories and links into Directory messages."""

    def __init__(self, stager: LocalStager, blobs: Blobs) -> None:
        self.stager = stager
        self.blobs = blobs

    def file(self, fd: int, info: os.stat_result, into: _Dir, name: str, rel: str) -> None:
        executable = bool(info.st_mode & 0o111)
        digest = self.stager.put_fd(fd, executable=executable, what=f"output {rel!r}")
        source: Path | bytes = b"" if digest.is_empty else self.stager.blob_path(digest, executable)
        self.blobs[digest.hash] = (digest, source)
        into.message.files.add(name=name, digest=to_proto(digest), is_executable=executable)

    def symlink(self, target: str, into: _Dir, name: str, rel: str) -> None:
        into.message.symlinks.add(name=name, target=target)

    def directory(self, into: _Dir, name: str, rel: str) -> _Dir:
        return _Dir(parent=into, name=name)

    def close(self, directory: _Dir, *, complete: bool) -> None:
        if not complete or directory.parent is None:
            return
        data = directory.message.SerializeToString(deterministic=True)
        directory.digest = digest_bytes(data)
        directory.parent.subdirs.append(directory)
        directory.parent.message.directories.add(name=directory.name, digest=to_proto(directory.digest))


def collect(staged: StagedAction, command: Any, result: Any, blobs: Blobs) -> None:
    """Fill `result` (an ActionResult) with the declared outputs the command created; their blobs go to `blobs`.

    ExecutionError (the worker's one-line message) if an output is refused.
    """
    workdir = command.working_directory
    v21 = bool(command.output_paths)
    files = list(command.output_paths) if v21 else list(command.output_files)
    dirs = set() if v21 else set(command.output_directories)
    sink = ReapiSink(staged.stager, blobs)
    for rel in [*files, *sorted(dirs)]:
        top = _Dir()
        if not staged.walk_output(in_root(workdir, rel), sink, top, "out"):
            continue  # not created: omitted (the client decides)
        message = top.message
        if not v21 and not message.symlinks and bool(top.subdirs) != (rel in dirs):  # REAPI: FAILED_PRECONDITION
            kind, declared = ("directory", "file") if top.subdirs else ("regular file", "directory")
            raise ExecutionError(f"output {rel!r} is a {kind}, declared a {declared}: refused")
        if message.files:
            (node,) = message.files
            result.output_files.add(path=rel, digest=node.digest, is_executable=node.is_executable)
        elif message.symlinks:
            target = message.symlinks[0].target
            kind = "output_symlinks" if v21 else "output_directory_symlinks" if rel in dirs else "output_file_symlinks"
            getattr(result, kind).add(path=rel, target=target)
        elif top.subdirs:
            (root,) = top.subdirs
            tree = re_pb2.Tree(root=root.message)
            children: dict[str, Any] = {}
            _descendants(root, children)
            tree.children.extend(children[key] for key in sorted(children))
            data = tree.SerializeToString(deterministic=True)
            digest = digest_bytes(data)
            blobs[digest.hash] = (digest, data)
            result.output_directories.add(path=rel, tree_digest=to_proto(digest))


def _descendants(directory: _Dir, into: dict[str, Any]) -> None:
    for sub in directory.subdirs:
        assert sub.digest is not None
        into[sub.digest.hash] = sub.message
        _descendants(sub, into)


def in_root(workdir: str, rel: str) -> str:
    """An output path (relative to the working directory, both checked by the runner) as a path in the input root."""
    return normalize_path(f"{workdir}/{rel}" if workdir else rel)
