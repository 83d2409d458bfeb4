"""Driving a real Bazel in a test's own workspace: one output base per workspace, output captured, a timeout."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run_bazel(
    workspace: Path,
    output_base: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 1200,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`bazel --output_base=... ARGS` in `workspace`; with `check`, a failure asserts with Bazel's stderr tail."""
    run = subprocess.run(
        ["bazel", f"--output_base={output_base}", *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check:
        assert run.returncode == 0, f"bazel {' '.join(args)} failed:\n{run.stderr[-6000:]}"
    return run
