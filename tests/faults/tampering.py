"""What the fault suites share: an outsider's in-place write to a CAS blob."""

from __future__ import annotations

import os
from pathlib import Path


def tamper_in_place(path: Path, data: bytes) -> None:
    """An outsider's same-size write with mode and mtime restored afterwards (only ctime and inotify can tell)."""
    info = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate(len(data))
    os.chmod(path, info.st_mode & 0o777)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
