"""Skip markers shared by the suites (each names what to install)."""

from __future__ import annotations

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
