"""Exhausted limits and filesystem faults on the output and staging paths: a full execroot, a blob at the
filesystem's link limit, odd paths. Each asserts the one-line error, what is left behind, and that the worker
serves the next request."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.layout import Root

from ..support.harness import Worker, request


@pytest.fixture
def full_execroot(tmp_path: Path) -> Iterator[Path]:
    """An execroot on a 2 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(execroot)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield execroot
    finally:
        subprocess.run(["umount", "-l", str(execroot)], check=False)


@pytest.mark.parametrize("shape", ["file", "directory"])
def test_an_output_that_fills_the_execroot_leaves_no_partial_copy(
    full_execroot: Path, tmp_path: Path, shape: str
) -> None:
    execroot = full_execroot
    (execroot / "small.txt").write_text("small\n")
    root = tmp_path / "root"
    worker = Worker(execroot, root)
    write = "head -c 5000000 /dev/urandom > out/big"
    if shape == "directory":
        write = "mkdir out/big && echo a > out/big/a && head -c 5000000 /dev/urandom > out/big/b"
    worker.send(request(execroot, ["small.txt"], ["out/big"], ["sh", "-c", write]))
    full = worker.read()
    left = sorted(os.listdir(execroot / "out")) if (execroot / "out").exists() else []
    worker.send(request(execroot, ["small.txt"], ["out/ok"], ["cp", "small.txt", "out/ok"]))
    fine = worker.read()
    report = ContentStore(Root(root), counters=Counters()).verify_all()
    print(f"\n[execroot full] {full['output'].strip()!r}; left in out/: {left}; next exit {fine['exitCode']}")
    assert full["exitCode"] == 1
    assert full["output"].count("\n") == 1 and "'out/big'" in full["output"], full
    assert "No space left" in full["output"], full
    assert "big" not in left, "a partial output was left in the execroot"
    assert fine["exitCode"] == 0 and (execroot / "out/ok").read_text() == "small\n", fine
    assert report.corrupt == 0
    assert worker.close() == 0
