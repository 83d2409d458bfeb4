"""Tests for treemat.backends on real filesystems: probing, reflink COW isolation, btrfs snapshots."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from treemat.backends import BackendProbe, Method, place_file
from treemat.fsprims import (
    clone_tree,
    create_subvolume,
    delete_subvolume,
    is_btrfs,
    is_subvolume,
    make_dirs_writable,
    make_tree_readonly,
    remove_tree,
)


def _blob(directory: Path, data: bytes, mode: int = 0o440) -> Path:
    path = directory / "blob"
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("method", [Method.HARDLINK, Method.COPY])
@pytest.mark.parametrize("executable", [False, True])
def test_place_file_content_and_mode(tmp_path: Path, method: Method, executable: bool) -> None:
    src = _blob(tmp_path, b"payload", 0o550 if executable else 0o440)
    dst = tmp_path / "out"
    place_file(method, src, dst, executable=executable)
    assert dst.read_bytes() == b"payload"
    assert stat.S_IMODE(dst.stat().st_mode) == (0o550 if executable else 0o440)
    assert (dst.stat().st_ino == src.stat().st_ino) == (method is Method.HARDLINK)


def test_place_file_refuses_existing_destination(tmp_path: Path) -> None:
    src = _blob(tmp_path, b"x")
    dst = tmp_path / "out"
    dst.write_bytes(b"old")
    for method in (Method.HARDLINK, Method.COPY):
        with pytest.raises(FileExistsError):
            place_file(method, src, dst, executable=False)
    assert dst.read_bytes() == b"old"


def test_probe_on_one_filesystem_prefers_fast_methods_and_caches(tmp_path: Path) -> None:
    probe = BackendProbe()
    methods = probe.methods_for(tmp_path, tmp_path)
    assert methods[-1] is Method.COPY
    assert Method.HARDLINK in methods, "same filesystem: hardlinks must work"
    assert probe.methods_for(tmp_path, tmp_path) is methods, "probed once per filesystem pair"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".treemat-probe")]


def test_probe_respects_forced_order(tmp_path: Path) -> None:
    assert BackendProbe(prefer=[Method.COPY]).methods_for(tmp_path, tmp_path) == [Method.COPY]
    order = BackendProbe(prefer=[Method.HARDLINK]).methods_for(tmp_path, tmp_path)
    assert order == [Method.HARDLINK, Method.COPY]


def test_probe_across_filesystems_has_no_hardlink(tmp_path: Path, tiny_tmpfs: Path) -> None:
    methods = BackendProbe().methods_for(tmp_path, tiny_tmpfs)
    assert Method.HARDLINK not in methods, "EXDEV: hardlinks cannot cross filesystems"
    assert methods[-1] is Method.COPY


def test_reflink_on_xfs_is_copy_on_write(xfs_dir: Path) -> None:
    work = xfs_dir / "reflink"
    work.mkdir()
    assert BackendProbe().methods_for(work, work)[0] is Method.REFLINK
    src = _blob(work, b"A" * 65536)
    dst = work / "clone"
    place_file(Method.REFLINK, src, dst, executable=True)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o550
    os.chmod(dst, 0o644)
    with dst.open("r+b") as handle:
        handle.write(b"B")
    assert src.read_bytes() == b"A" * 65536, "writing a reflinked copy must never reach the CAS blob"


def test_btrfs_subvolume_snapshot_round_trip(btrfs_dir: Path) -> None:
    assert is_btrfs(btrfs_dir)
    subvol = btrfs_dir / "cached"
    create_subvolume(subvol)
    assert is_subvolume(subvol)
    (subvol / "dir").mkdir()
    (subvol / "dir" / "f.txt").write_bytes(b"cached content")
    os.chmod(subvol / "dir" / "f.txt", 0o444)
    make_tree_readonly(subvol)
    snap = btrfs_dir / "exec" / "snap"
    snap.parent.mkdir()
    assert clone_tree(subvol, snap)
    make_dirs_writable(snap)
    assert (snap / "dir" / "f.txt").read_bytes() == b"cached content"
    assert stat.S_IMODE((snap / "dir").stat().st_mode) == 0o755
    assert stat.S_IMODE((snap / "dir" / "f.txt").stat().st_mode) == 0o444
    (snap / "dir" / "new-output").write_bytes(b"outputs can be created")
    assert not (subvol / "dir" / "new-output").exists(), "a snapshot is independent of its source"
    remove_tree(snap.parent)
    assert not snap.parent.exists()
    make_dirs_writable(subvol)
    delete_subvolume(subvol)
    assert not subvol.exists()


def test_clone_tree_declines_where_unsupported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    if is_subvolume(src):
        pytest.skip("tmp dir happens to be a btrfs subvolume root")
    assert clone_tree(src, tmp_path / "dst") is False
    assert not (tmp_path / "dst").exists()


def test_remove_tree_handles_read_only_trees(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x")
    os.chmod(root / "a" / "b" / "f", 0o444)
    os.symlink("b/f", root / "a" / "link")
    make_tree_readonly(root)
    remove_tree(root)
    assert not root.exists()
