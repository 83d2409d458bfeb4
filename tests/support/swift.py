"""Where the real swiftc is: on PATH, else the toolchain under /opt/swift (or $TREEMAT_SWIFT_DIR); None if none."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SWIFT_DIR = Path(os.environ.get("TREEMAT_SWIFT_DIR", "/opt/swift"))


def find_swiftc() -> str | None:
    """The swiftc the tests drive, or None (the swift-marked tests then skip, saying so)."""
    found = shutil.which("swiftc")
    if found:
        return found
    candidate = SWIFT_DIR / "usr" / "bin" / "swiftc"
    return str(candidate) if candidate.exists() else None


SWIFTC = find_swiftc()
NO_SWIFTC = "no swiftc on PATH or under /opt/swift"
