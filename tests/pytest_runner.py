"""Runs one pytest file as a Bazel py_test (Bazel 4 has no native pytest rule).

The package, the test file and pyproject.toml are located through Bazel's runfiles (the `bazel-runfiles`
library), never through `__file__`: the worker subprocesses the tests start import the same declared copy of
treemat (`TREEMAT_TOOLS_DIR`), and pytest reads its markers from the declared pyproject.toml.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def locate(path: str) -> Path:
    """A workspace-relative path -> its file in this test's runfiles."""
    from runfiles import runfiles  # pip: bazel-runfiles

    files = runfiles.Create()
    if files is None:
        raise SystemExit("pytest_runner: no runfiles (run it through `bazel test`)")
    found = files.Rlocation(f"{os.environ.get('TEST_WORKSPACE', 'treemat')}/{path}")
    if not found or not os.path.exists(found):
        raise SystemExit(f"pytest_runner: {path} is not in the runfiles (a missing data/deps entry?)")
    return Path(found)


def main() -> int:
    """pytest.main on the files named on the command line, with Bazel-friendly settings."""
    import pytest
    from hypothesis import settings

    settings.register_profile("bazel", database=None, deadline=None)
    settings.load_profile("bazel")
    os.environ.setdefault("TMPDIR", os.environ.get("TEST_TMPDIR", "/tmp"))
    os.environ["TREEMAT_TOOLS_DIR"] = str(locate("tools/treemat/__init__.py").parent.parent)
    config = locate("pyproject.toml")
    tests = [str(locate(arg)) for arg in sys.argv[1:]]
    args = ["-q", "-p", "no:cacheprovider", "--import-mode=importlib", "-c", str(config), "-o", "addopts=", *tests]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
