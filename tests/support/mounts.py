"""Loop-mounted filesystem images (xfs with reflink, btrfs) for tests that need a real one; root only.

Where mounting is impossible (an unprivileged run, Bazel's sandbox) the callers skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount_image(tmp_root: Path, fs: str, size_mb: int) -> Path:
    """A fresh `fs` image of `size_mb` loop-mounted under `tmp_root`; skips (saying why) where that cannot be."""
    mkfs = shutil.which(f"mkfs.{fs}")
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {fs} image needs root")
    if mkfs is None:
        pytest.skip(f"mkfs.{fs} not installed (apt-get install {'xfsprogs' if fs == 'xfs' else 'btrfs-progs'})")
    image = tmp_root / f"{fs}.img"
    mountpoint = tmp_root / f"{fs}-mnt"
    mountpoint.mkdir()
    with image.open("wb") as handle:
        handle.truncate(size_mb << 20)
    args = [mkfs, "-q", "-f", str(image)] if fs in ("xfs", "btrfs") else [mkfs, str(image)]
    if fs == "xfs":
        args.insert(1, "-m")
        args.insert(2, "reflink=1")
    made = subprocess.run(args, capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.{fs} failed: {made.stderr.strip()[:200]}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount a {fs} image here: {mounted.stderr.strip()[:200]}")
    return mountpoint


def mounted_image(factory: pytest.TempPathFactory, fs: str) -> Iterator[Path]:
    """Mounted under /var/tmp where it is writable, not pytest's /tmp: a mount below the host's /tmp keeps the
    sandbox from showing the host's /tmp to tools (the kernel refuses to clone it; sandboxd falls back to an
    empty /tmp). Under Bazel's sandbox /var/tmp is read-only: there the images skip (no mounting) anyway."""
    try:
        base = Path(tempfile.mkdtemp(prefix=f"treemat-test-{fs}-", dir="/var/tmp"))
    except OSError:
        base = factory.mktemp(fs)
    try:
        mountpoint = mount_image(base, fs, 512)
        yield mountpoint
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
