"""The treemat root's layout: made once at open, repaired only after a failure, spelled only in layout.py."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from treemat.executor import ActionRequest, RequestInput
from treemat.flagfile import ActionSpec
from treemat.layout import Root

from ..support.stacks import make_executor


def _copy_action(execroot: Path, output: str) -> ActionRequest:
    data = (execroot / "in.txt").read_bytes()
    spec = ActionSpec(argv=["cp", "in.txt", output], outputs=[output])
    return ActionRequest(spec, [RequestInput("in.txt", hashlib.sha256(data).hexdigest())], execroot)


def test_a_warm_action_makes_no_directory_of_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root's subdirectories are made once, at open: an action used to try a mkdir of each (8 syscalls)."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    (execroot / "in.txt").write_text("in\n")
    executor = make_executor(tmp_path / "root")
    assert executor.execute(_copy_action(execroot, "out/a")).exit_code == 0
    subdirs = {str(tmp_path / "root" / name) for name in Root.SUBDIRS}
    made: list[str] = []
    real_mkdir = os.mkdir

    def mkdir(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if os.fspath(path) in subdirs:
            made.append(os.fspath(path))
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir)
    result = executor.execute(_copy_action(execroot, "out/b"))
    assert result.exit_code == 0, result.output
    assert made == []


def test_a_subdirectory_deleted_under_a_running_executor_is_made_again(tmp_path: Path) -> None:
    """`rm -rf <root>/cas <root>/tmp <root>/exec` between two actions: the second still succeeds (repair)."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    (execroot / "in.txt").write_text("in\n")
    executor = make_executor(tmp_path / "root")
    assert executor.execute(_copy_action(execroot, "out/a")).exit_code == 0
    executor.close()  # a pooled exec dir would keep the action from needing exec/
    for name in ("cas", "tmp", "exec"):
        shutil.rmtree(tmp_path / "root" / name)
    result = executor.execute(_copy_action(execroot, "out/b"))
    assert result.exit_code == 0, result.output
    assert all((tmp_path / "root" / name).is_dir() for name in Root.SUBDIRS)
