"""Shared fixtures: real filesystems (loop-mounted xfs/btrfs images, tmpfs) and CAS helpers.

Mounting needs root and loop devices; where that is impossible (an unprivileged run, Bazel's sandbox) the
fixtures skip with the reason, and everything else still runs on the default filesystem.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.layout import Root

from ..support.mounts import mounted_image


@pytest.fixture(scope="session")
def xfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a fresh loop-mounted xfs (reflink=1) filesystem."""
    yield from mounted_image(tmp_path_factory, "xfs")


@pytest.fixture(scope="session")
def btrfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on a fresh loop-mounted btrfs filesystem."""
    yield from mounted_image(tmp_path_factory, "btrfs")


@pytest.fixture()
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, for disk-full tests."""
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()[:200]}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture()
def store(tmp_path: Path) -> ContentStore:
    """A fresh CAS under tmp_path/root."""
    return ContentStore(Root(tmp_path / "root"), counters=Counters())
