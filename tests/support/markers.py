"""Skip markers shared by the suites (each names what to install)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from .cluster import ClusterError, pg_bin


def _postgresql_present() -> bool:
    try:
        pg_bin()
    except ClusterError:
        return False
    return True


requires_postgresql = pytest.mark.skipif(
    not _postgresql_present(), reason="PostgreSQL server binaries missing (apt-get install postgresql)"
)


def give_to_another_user(path: Path, uid: int = 1000) -> None:
    """chown `path` to `uid`, or skip: that needs root, and a uid the user namespace maps (`bazel test`'s
    sandbox maps only the test's own: EINVAL)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    try:
        os.chown(path, uid, uid)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EPERM):
            raise
        pytest.skip(f"uid {uid} cannot own a file here ({exc.strerror}: a user namespace that does not map it)")
