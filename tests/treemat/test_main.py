"""__main__.py, the py_binary's entry point: what it does before dispatching."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_compiled_modules_go_to_the_user_cache_where_bazel_clean_cannot_remove_them(tmp_path: Path) -> None:
    """Run as a program (as Bazel runs the py_binary), imported modules are compiled into
    $XDG_CACHE_HOME/treemat/pycache, not into a __pycache__ beside them in the runfiles tree."""
    copy = tmp_path / "runfiles"  # a copy of the package, standing in for a runfiles tree
    shutil.copytree(TOOLS / "treemat", copy / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(copy))
    done = subprocess.run(
        [sys.executable, str(copy / "treemat" / "__main__.py"), "--help"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    cached = {path.name.split(".")[0] for path in (tmp_path / "cache" / "treemat" / "pycache").rglob("*.pyc")}
    assert {"cli", "errors"} <= cached
    assert not list(copy.rglob("__pycache__")), "nothing is written into the (runfiles) tree"
