"""Input trees: a validated, hierarchical description of the files an action may read.

Every path is relative and `/`-separated; `.`/`..` components, absolute paths, NUL bytes, a file beneath a
file or symlink, and symlinks whose target leaves the tree are refused with ManifestError, so a tree can
never write or point outside the directory it is materialized into.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from treemat.digest import Digest
from treemat.errors import DigestError, ManifestError

MAX_PATH_BYTES = 4096  # PATH_MAX: no longer path can be opened by name, in the execroot or an exec dir
MAX_PATH_DEPTH = 512  # components: trees, walks and makedirs recurse a level per component


class FileNode:
    """A regular file: its content digest and exec bit; `source` is where to ingest it from if needed (not part
    of what the file is: two nodes of one digest and bit are equal)."""

    __slots__ = ("digest", "executable", "source")

    def __init__(self, digest: Digest, executable: bool = False, source: str | os.PathLike[str] | None = None) -> None:
        self.digest = digest
        self.executable = executable
        self.source = source

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileNode) and self.digest == other.digest and self.executable == other.executable

    def __hash__(self) -> int:
        return hash((self.digest, self.executable))

    def __repr__(self) -> str:
        return f"FileNode({self.digest!r}, executable={self.executable})"


class SymlinkNode(NamedTuple):
    """A relative symlink that stays inside the tree."""

    target: str


class DirectoryNode:
    """A directory: named files, symlinks and subdirectories (names are single path components)."""

    __slots__ = ("dirs", "files", "symlinks")

    def __init__(
        self,
        files: dict[str, FileNode] | None = None,
        symlinks: dict[str, SymlinkNode] | None = None,
        dirs: dict[str, DirectoryNode] | None = None,
    ) -> None:
        self.files: dict[str, FileNode] = {} if files is None else files
        self.symlinks: dict[str, SymlinkNode] = {} if symlinks is None else symlinks
        self.dirs: dict[str, DirectoryNode] = {} if dirs is None else dirs

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DirectoryNode)
            and self.files == other.files
            and self.symlinks == other.symlinks
            and self.dirs == other.dirs
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: not a dict key

    def __repr__(self) -> str:
        return f"DirectoryNode(files={self.files!r}, symlinks={self.symlinks!r}, dirs={self.dirs!r})"

    def walk(self, prefix: str = "") -> Iterator[tuple[str, DirectoryNode]]:
        """Yield `(relative path, node)` for this directory and every descendant, parents first."""
        yield prefix, self
        for name in sorted(self.dirs):
            yield from self.dirs[name].walk(f"{prefix}/{name}" if prefix else name)

    def iter_files(self, prefix: str = "") -> Iterator[tuple[str, FileNode]]:
        """Yield `(relative path, FileNode)` for every file beneath this directory."""
        for dir_path, node in self.walk(prefix):
            for name in sorted(node.files):
                yield (f"{dir_path}/{name}" if dir_path else name), node.files[name]

    def iter_symlinks(self, prefix: str = "") -> Iterator[tuple[str, SymlinkNode]]:
        """Yield `(relative path, SymlinkNode)` for every symlink beneath this directory."""
        for dir_path, node in self.walk(prefix):
            for name in sorted(node.symlinks):
                yield (f"{dir_path}/{name}" if dir_path else name), node.symlinks[name]

    def count_files(self) -> int:
        """Number of files (not symlinks or directories) beneath this directory."""
        return sum(len(node.files) for _, node in self.walk())

    def total_bytes(self) -> int:
        """Sum of file sizes beneath this directory."""
        return sum(f.digest.size for _, f in self.iter_files())


def normalize_path(raw: str) -> str:
    """Validate a relative tree path and return it in canonical form (no trailing slash)."""
    if not isinstance(raw, str) or not raw:
        raise ManifestError(f"path must be a non-empty string, got {raw!r}")
    if "\0" in raw:
        raise ManifestError(f"path contains a NUL byte: {raw!r}")
    if not raw.isascii():
        try:
            os.fsencode(raw)
        except UnicodeEncodeError:
            raise ManifestError(f"path is not a file name (a lone surrogate: not valid UTF-8): {raw!r}") from None
    if raw.startswith("/"):
        raise ManifestError(f"absolute path not allowed in an input tree: {raw!r}")
    if len(raw) > MAX_PATH_BYTES or raw.count("/") >= MAX_PATH_DEPTH:
        raise ManifestError(
            f"path longer than {MAX_PATH_BYTES} bytes or {MAX_PATH_DEPTH} components: refused: {raw[:200]!r}..."
        )
    parts = [part for part in raw.split("/") if part not in ("",)]
    if not parts:
        raise ManifestError(f"path names the tree root: {raw!r}")
    for part in parts:
        if part in (".", ".."):
            raise ManifestError(f"path component {part!r} not allowed: {raw!r}")
    return "/".join(parts)


def check_symlink_target(link_path: str, target: str) -> str:
    """Refuse absolute or escaping symlink targets; return the target unchanged."""
    if not target or "\0" in target:
        raise ManifestError(f"symlink {link_path!r} has an empty or NUL-containing target")
    if target.startswith("/"):
        raise ManifestError(f"symlink {link_path!r} -> {target!r}: absolute targets escape the exec root")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    if resolved == ".." or resolved.startswith("../"):
        raise ManifestError(f"symlink {link_path!r} -> {target!r} points outside the tree")
    return target


class InputTree:
    """A whole input tree, built entry by entry with validation."""

    def __init__(self) -> None:
        self.root = DirectoryNode()
        self._dirs: dict[str, DirectoryNode] = {}  # parent path -> node, for paths already walked

    def _parent_for(self, path: str) -> tuple[DirectoryNode, str]:
        """Create (as needed) and return the parent directory of `path`, plus the leaf name."""
        parent_path, _, leaf = path.rpartition("/")
        known = self._dirs.get(parent_path)
        if known is not None:
            return known, leaf
        *parents, leaf = path.split("/")
        node = self.root
        walked: list[str] = []
        for name in parents:
            walked.append(name)
            if name in node.files or name in node.symlinks:
                raise ManifestError(
                    f"{path!r} needs {'/'.join(walked)!r} to be a directory, but it is a file or symlink"
                )
            node = node.dirs.setdefault(name, DirectoryNode())
        self._dirs[parent_path] = node
        return node, leaf

    def add_file(self, raw_path: str, file: FileNode, *, normalized: bool = False) -> None:
        """Add a file; re-adding the same path with the same digest and mode is allowed.

        `normalized=True` skips `normalize_path` for a path the caller has already normalized.
        """
        path = raw_path if normalized else normalize_path(raw_path)
        parent, leaf = self._parent_for(path)
        if leaf in parent.dirs or leaf in parent.symlinks:
            raise ManifestError(f"{path!r} is listed both as a file and as a directory or symlink")
        existing = parent.files.get(leaf)
        if existing is not None and existing != file:
            raise ManifestError(f"{path!r} is listed twice with different content or mode")
        parent.files[leaf] = file

    def add_symlink(self, raw_path: str, target: str) -> None:
        """Add a relative symlink that must resolve inside the tree."""
        path = normalize_path(raw_path)
        check_symlink_target(path, target)
        parent, leaf = self._parent_for(path)
        if leaf in parent.dirs or leaf in parent.files:
            raise ManifestError(f"{path!r} is listed both as a symlink and as a file or directory")
        existing = parent.symlinks.get(leaf)
        if existing is not None and existing.target != target:
            raise ManifestError(f"symlink {path!r} is listed twice with different targets")
        parent.symlinks[leaf] = SymlinkNode(target)

    def add_directory(self, raw_path: str) -> None:
        """Add a (possibly empty) directory."""
        path = normalize_path(raw_path)
        parent, leaf = self._parent_for(path)
        if leaf in parent.files or leaf in parent.symlinks:
            raise ManifestError(f"{path!r} is listed both as a directory and as a file or symlink")
        parent.dirs.setdefault(leaf, DirectoryNode())

    def holds(self, path: str) -> bool:
        """Whether the normalized `path` is in the tree (a file, symlink or directory, or below a file)."""
        node = self.root
        *parents, leaf = path.split("/")
        for name in parents:
            if name in node.files or name in node.symlinks:
                return True
            child = node.dirs.get(name)
            if child is None:
                return False
            node = child
        return leaf in node.files or leaf in node.symlinks or leaf in node.dirs

    def iter_files(self) -> Iterator[tuple[str, FileNode]]:
        """Every `(path, FileNode)` in the tree, sorted by directory then name."""
        return self.root.iter_files()

    def count_files(self) -> int:
        """Number of files in the tree."""
        return self.root.count_files()


def _resolve_inside(tree: InputTree, link_path: str, target: str, hops: int = 40) -> None:
    """Follow a symlink through the tree model; ManifestError if the chain leaves the root or loops."""
    parts = link_path.split("/")[:-1]
    pending = target.split("/")
    seen = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ManifestError(f"symlink {link_path!r} -> {target!r} points outside the tree")
            parts.pop()
            continue
        node: DirectoryNode | None = tree.root
        for name in parts:
            node = node.dirs.get(name) if node else None
        link = node.symlinks.get(part) if node else None
        if link is not None:
            seen += 1
            if seen > hops:
                raise ManifestError(f"symlink {link_path!r} -> {target!r}: too many levels of links (a loop?)")
            if link.target.startswith("/"):
                raise ManifestError(f"symlink {link_path!r} -> {target!r} reaches an absolute link")
            pending = link.target.split("/") + pending
            continue
        parts.append(part)


def check_symlinks(tree: InputTree) -> None:
    """Refuse any symlink whose chain, followed through the tree, leaves the root or loops."""
    for path, link in tree.root.iter_symlinks():
        _resolve_inside(tree, path, link.target)


def load_manifest(source: str | os.PathLike[str] | list[Any] | dict[str, Any]) -> InputTree:
    """Build an InputTree from the JSON manifest format (see docs/architecture.md).

    `source` is a path to a JSON file, or the already-parsed JSON value.
    """
    import json

    from treemat.digest import Digest as _Digest

    if isinstance(source, (str, os.PathLike)):
        try:
            data: Any = json.loads(Path(source).read_text())
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {source}: {exc.strerror}") from None
        except ValueError as exc:
            raise ManifestError(f"manifest {source} is not valid JSON: {exc}") from None
    else:
        data = source
    entries = data.get("inputs") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ManifestError('manifest must be a JSON list of entries or {"inputs": [...]}')
    tree = InputTree()
    for index, entry in enumerate(entries):
        where = f"manifest entry #{index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ManifestError(f"{where}: must be an object with a string 'path'")
        where = f"{where} ({entry['path']!r})"
        try:
            _check_entry_types(entry)
            if "symlink" in entry:
                tree.add_symlink(entry["path"], entry["symlink"])
            elif entry.get("directory"):
                tree.add_directory(entry["path"])
            else:
                raw = entry.get("digest")
                if isinstance(raw, dict):
                    digest = _Digest(raw["hash"].lower(), raw["sizeBytes"] if "sizeBytes" in raw else raw["size"])
                elif isinstance(raw, str):
                    digest = _Digest.parse(raw)
                else:
                    raise ManifestError("needs a 'digest' ('<sha256>/<size>'), 'symlink' or 'directory'")
                source_path = entry.get("source")
                tree.add_file(
                    entry["path"],
                    FileNode(digest, entry.get("executable", False), Path(source_path) if source_path else None),
                )
        except KeyError as exc:
            raise ManifestError(f"{where}: digest object lacks {exc}") from None
        except (ManifestError, DigestError, ValueError, TypeError) as exc:
            raise ManifestError(f"{where}: {exc}") from None
    check_symlinks(tree)
    return tree


_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "path": (str,),
    "digest": (str, dict),
    "executable": (bool,),
    "source": (str,),
    "symlink": (str,),
    "directory": (bool,),
}


def _check_entry_types(entry: dict[str, Any]) -> None:
    """Wrong JSON types are errors, never coerced: `"executable": "false"` is not false, nor true."""
    for key, value in entry.items():
        allowed = _ENTRY_TYPES.get(key)
        if allowed is None:
            raise ManifestError(f"unknown key {key!r} (expected one of {', '.join(sorted(_ENTRY_TYPES))})")
        if not isinstance(value, allowed) or (allowed == (bool,) and not isinstance(value, bool)):
            raise ManifestError(f"{key!r} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
    digest = entry.get("digest")
    if isinstance(digest, dict):
        size = digest.get("sizeBytes", digest.get("size"))
        if not isinstance(digest.get("hash"), str) or isinstance(size, bool) or not isinstance(size, int):
            raise ManifestError(f"digest object needs a string 'hash' and an integer 'sizeBytes', got {digest!r}")
