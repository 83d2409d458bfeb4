"""Tests for treemat.fsprims: the copy fallbacks, modes, and the dead-writer sweeps (no root needed)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat import fsprims

from ..support.waiting import wait_for

PAYLOAD = os.urandom(3 << 20) + b"tail"


@pytest.fixture
def fds(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(source fd holding PAYLOAD, empty destination fd at tmp_path/dst)."""
    src = tmp_path / "src"
    src.write_bytes(PAYLOAD)
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        yield src_fd, dst_fd
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_copy_fd_copies_everything(fds: tuple[int, int], tmp_path: Path) -> None:
    fsprims.copy_fd(*fds)
    assert (tmp_path / "dst").read_bytes() == PAYLOAD


def test_copy_fd_falls_back_when_copy_file_range_fails(
    fds: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    fsprims.copy_fd(*fds)
    assert (tmp_path / "dst").read_bytes() == PAYLOAD


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="Linux only")
def test_copy_fd_finishes_a_copy_file_range_that_stops_short_or_fails_midway(
    fds: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.copy_file_range
    calls: list[int] = []

    def flaky(src: int, dst: int, count: int) -> int:
        calls.append(count)
        if len(calls) == 1:
            return real(src, dst, 1000)  # a short step
        raise OSError(errno.EIO, "gave up midway")

    monkeypatch.setattr(os, "copy_file_range", flaky)
    fsprims.copy_fd(*fds)
    assert len(calls) == 2
    assert (tmp_path / "dst").read_bytes() == PAYLOAD


@pytest.mark.parametrize("executable", [False, True])
def test_copy_and_reflink_create_a_new_file_with_the_mode(tmp_path: Path, executable: bool) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    mode = fsprims.blob_mode(executable)
    fsprims.copy(src, tmp_path / "copy", mode)
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == mode
    with pytest.raises(FileExistsError):
        fsprims.copy(src, tmp_path / "copy", mode)
    try:
        fsprims.reflink(src, tmp_path / "reflink", mode)
    except OSError:
        assert not (tmp_path / "reflink").exists(), "a failed reflink leaves no file behind"
    else:
        assert (tmp_path / "reflink").read_bytes() == b"x" * 100


def test_blob_modes_and_file_kinds() -> None:
    assert (fsprims.blob_mode(False), fsprims.blob_mode(True)) == (0o440, 0o550)
    assert fsprims.file_kind(stat.S_IFIFO | 0o600) == "FIFO"
    assert fsprims.file_kind(stat.S_IFREG | 0o600) == "regular file"


def test_sweep_unlocked_files_spares_live_writers_and_young_files(tmp_path: Path) -> None:
    for name in ("1-dead", "2-live", "3-young", "scratch"):
        (tmp_path / name).write_bytes(b"partial")
    live = os.open(tmp_path / "2-live", os.O_RDWR)
    fcntl.flock(live, fcntl.LOCK_EX)
    try:
        # everything is younger than an hour: only the age check stops the sweep
        assert fsprims.sweep_unlocked_files(tmp_path, grace_ns=3600 * 10**9, wanted=lambda _name: True) == 0
        swept = fsprims.sweep_unlocked_files(
            tmp_path, grace_ns=0, wanted=lambda name: name[:1].isdigit() and name != "3-young"
        )
        assert swept == 1
    finally:
        os.close(live)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2-live", "3-young", "scratch"]


def test_sweep_dead_owners_removes_only_entries_of_dead_processes(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    for name in (f"{dead_pid}-a", f".trash-{dead_pid}-b", f"{os.getpid()}-mine", "1-init", "notapid"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"")
        os.chmod(tmp_path / name, 0o555)  # read-only trees are removed too
    assert fsprims.sweep_dead_owners(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{os.getpid()}-mine", "1-init", "notapid"])


def test_sweep_dead_owners_takes_the_entries_of_a_zombie(tmp_path: Path) -> None:
    """A dead process its parent has not reaped (a stager service killed and left to an init that reaps late) owns
    nothing: its exec dirs are swept (they once stayed until the zombie was reaped, pinning their blobs)."""
    zombie = subprocess.Popen(["true"])  # not waited for until the end: a zombie meanwhile
    try:
        state = Path(f"/proc/{zombie.pid}/stat")
        if not state.exists():
            pytest.skip("no procfs")
        wait_for(lambda: state.read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z", what="the child to be a zombie")
        (tmp_path / f"{zombie.pid}-1-abc").mkdir()
        assert fsprims.sweep_dead_owners(tmp_path) == 1
        assert not any(tmp_path.iterdir())
    finally:
        zombie.wait()


def test_remove_tree_takes_files_symlinks_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    fsprims.remove_tree(tmp_path / "link")
    assert (tmp_path / "file").exists()
    fsprims.remove_tree(tmp_path / "file")
    fsprims.remove_tree(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="statfs(2) magic numbers are Linux")
def test_filesystem_type_is_statfs_magic_without_a_subprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = int(
        subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], capture_output=True, text=True, check=True).stdout, 16
    )
    monkeypatch.setattr(subprocess, "run", None)  # must not fork (it may run while a temp blob is being written)
    assert fsprims.filesystem_type(tmp_path) == expected
    assert fsprims.filesystem_type("/proc") == 0x9FA0  # PROC_SUPER_MAGIC
    assert fsprims.filesystem_type(tmp_path / "missing") is None
    assert fsprims.is_btrfs(tmp_path) == (expected == 0x9123683E)
    assert fsprims.is_btrfs(tmp_path / "missing") is False
