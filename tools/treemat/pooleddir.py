"""What a pooled exec dir holds (execpool.py keeps them): its files, directories and watches, and what a patch of
it did."""

from __future__ import annotations

from pathlib import Path

from treemat.blobstate import NO_BLOB, BlobIdentity, GuardMark, StagedFile
from treemat.manifest import InputManifest

DirSignature = tuple[int, int, int]  # (inode, mtime_ns, ctime_ns)


class PooledDir:
    """A finished exec dir and exactly what it holds."""

    __slots__ = (
        "children",
        "dirs",
        "dirty",
        "exec_bits_seen",
        "files",
        "key",
        "manifest",
        "mark",
        "patching",
        "path",
        "pinned",
        "unwatched",
        "watches",
    )

    def __init__(
        self,
        path: Path,
        key: str,
        files: dict[str, StagedFile] | None = None,
        dirs: dict[str, DirSignature] | None = None,
        children: dict[str, int] | None = None,
        pinned: set[str] | None = None,
        manifest: InputManifest | None = None,
        mark: GuardMark | None = None,
    ) -> None:
        self.path = path
        self.key = key
        self.files: dict[str, StagedFile] = {} if files is None else files
        self.dirs: dict[str, DirSignature] = {} if dirs is None else dirs  # "" is the exec dir itself
        self.children: dict[str, int] = {} if children is None else children  # entries directly in each dir
        self.pinned: set[str] = set() if pinned is None else pinned  # output dirs / parents (kept even if empty)
        self.manifest = manifest  # the inputs of the request it was last staged for
        self.mark = mark  # the guard's mark before the dir was last staged (None: check everything)
        self.exec_bits_seen: int | None = None  # the execroot watch's generation when exec bits were last read
        self.watches: dict[str, int] = {}  # dir -> inotify watch descriptor
        self.patching = False  # events now are our own doing
        self.dirty = False  # something changed a directory while we were not patching it
        self.unwatched = False  # some directory could not be watched: verified by lstat signatures instead

    def on_directory_event(self, lost: bool = False) -> None:
        """A watched directory changed: unless we are patching it ourselves, the dir can no longer be trusted;
        a lost watch (`lost`: queue overflow, IN_IGNORED) makes it dirty even while we patch."""
        if lost or not self.patching:
            self.dirty = True

    def count_children(self) -> None:
        """Compute `children` from `files`, `dirs` and `pinned` (for a freshly staged dir)."""
        counts: dict[str, int] = dict.fromkeys(self.dirs, 0)
        for path in self.files:
            parent = parent_of(path)
            counts[parent] = counts.get(parent, 0) + 1
        for rel in self.dirs:
            if rel:
                counts[parent_of(rel)] += 1
        for rel in self.pinned:
            counts[rel] = counts.get(rel, 0) + 1
        self.children = counts

    def keys(self) -> list[tuple[str, bool]]:
        """Every blob (hash, executable) the dir links."""
        return [staged.key() for staged in self.files.values() if staged.identity != NO_BLOB]

    def identities(self) -> set[BlobIdentity]:
        """Every blob inode the dir holds."""
        return {staged.identity for staged in self.files.values()}


class PatchReport:
    """What a patch did; `relinked` are the blobs whose link count (and so ctime) it changed."""

    __slots__ = ("linked", "made_dirs", "relinked", "removed_dirs", "unlinked")

    def __init__(self) -> None:
        self.relinked: list[tuple[str, bool]] = []
        self.linked = 0
        self.unlinked = 0
        self.made_dirs = 0
        self.removed_dirs = 0


def parent_of(path: str) -> str:
    """The directory a relative path is in ("" for the exec dir itself)."""
    return path.rpartition("/")[0]
