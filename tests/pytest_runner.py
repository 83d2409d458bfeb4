"""Runs one pytest file as a Bazel py_test (Bazel 4 has no native pytest rule)."""

from __future__ import annotations

import os
import sys


def main() -> int:
    """pytest.main on the files named on the command line, with Bazel-friendly settings."""
    import pytest
    from hypothesis import settings

    settings.register_profile("bazel", database=None, deadline=None)
    settings.load_profile("bazel")
    os.environ.setdefault("TMPDIR", os.environ.get("TEST_TMPDIR", "/tmp"))
    args = ["-q", "-p", "no:cacheprovider", "--import-mode=importlib", "-o", "addopts=", *sys.argv[1:]]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
