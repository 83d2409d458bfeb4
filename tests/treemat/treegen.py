"""Hypothesis strategies and helpers shared by tree-shaped tests: random trees, CAS filling, read-back."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hypothesis import strategies as st
from treemat.cas import ContentStore
from treemat.digest import digest_bytes
from treemat.tree import FileNode, InputTree

NAMES = st.text(alphabet="abcdefgh_-.0123456789", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
Spec = dict[str, tuple[str, object]]  # path -> ("file", (bytes, exec)) | ("link", target) | ("dir", None)


@st.composite
def tree_specs(draw: st.DrawFn, max_entries: int = 25) -> Spec:
    """A random, valid tree: nested dirs, empty and non-empty files, exec bits, in-tree symlinks, empty dirs."""
    spec: Spec = {}
    dirs: list[str] = [""]
    for _ in range(draw(st.integers(1, max_entries))):
        parent = draw(st.sampled_from(dirs))
        name = draw(NAMES)
        path = f"{parent}/{name}" if parent else name
        if any(path == p or path.startswith(p + "/") or p.startswith(path + "/") for p in spec):
            continue
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "link"]))
        if kind == "file":
            data = draw(st.binary(max_size=300) | st.just(b""))
            spec[path] = ("file", (data, draw(st.booleans())))
        elif kind == "dir":
            spec[path] = ("dir", None)
            dirs.append(path)
        else:
            depth = path.count("/")
            target = draw(st.sampled_from(["x", "../" * depth + "top", "sub/y"]))
            spec[path] = ("link", target)
    return spec


def build_tree(spec: Spec, cas: ContentStore) -> InputTree:
    """Put the spec's blobs into the CAS and return the InputTree."""
    tree = InputTree()
    for path, (kind, value) in spec.items():
        if kind == "file":
            data, executable = value  # type: ignore[misc]
            digest = cas.ingest_bytes(data, executable=executable)
            assert digest == digest_bytes(data)
            tree.add_file(path, FileNode(digest, executable))
        elif kind == "dir":
            tree.add_directory(path)
        else:
            tree.add_symlink(path, str(value))
    return tree


def read_back(root: Path) -> Spec:
    """Describe what is on disk under root in the same form as a spec (dirs only when empty)."""
    found: Spec = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            info = full.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(info.st_mode):
                assert stat.S_IMODE(info.st_mode) == 0o755, f"{rel}: directories must be writable"
                if not os.listdir(full):
                    found[rel] = ("dir", None)
            else:
                mode = stat.S_IMODE(info.st_mode)
                assert mode in (0o440, 0o550), f"{rel}: input files must be read-only, got {oct(mode)}"
                found[rel] = ("file", (full.read_bytes(), mode == 0o550))
    return found


def expected_view(spec: Spec) -> Spec:
    """The spec as read_back would report it: directories only when they end up empty."""
    out: Spec = {}
    for path, entry in spec.items():
        if entry[0] == "dir" and any(p.startswith(path + "/") for p in spec):
            continue
        out[path] = entry
    return out
