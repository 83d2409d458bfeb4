"""Tests for treemat.flagfile: the rules <-> treemat contract and one-shot mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from treemat.errors import ProtocolError
from treemat.flagfile import expand_flagfiles, parse_action_args

from .workerharness import worker_env


def test_parse_action_args() -> None:
    spec = parse_action_args(["--output=a/b.o", "--output-dir=a/d", "--env=K=V=W", "--", "swiftc", "-I{EXEC_ROOT}/x"])
    assert spec.outputs == ["a/b.o"] and spec.output_dirs == ["a/d"] and spec.env == {"K": "V=W"}
    assert spec.argv_in("/e") == ["swiftc", "-I/e/x"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--output=x"],
        ["--bogus=1", "--", "t"],
        ["--env=novalue", "--", "t"],
        [
            "--",
        ],
    ],
)
def test_bad_arguments(args: list[str]) -> None:
    with pytest.raises(ProtocolError):
        parse_action_args(args)


def test_expand_flagfiles(tmp_path: Path) -> None:
    flagfile = tmp_path / "f.params"
    flagfile.write_text("--output=o\n--\necho\nhello world\n")
    assert expand_flagfiles(["@" + str(flagfile)]) == ["--output=o", "--", "echo", "hello world"]
    with pytest.raises(ProtocolError, match="cannot read flagfile"):
        expand_flagfiles(["@" + str(tmp_path / "missing")])


def test_oneshot_runs_tool_in_place(tmp_path: Path) -> None:
    flagfile = tmp_path / "req.params"
    flagfile.write_text(
        "--output=out/x.txt\n--env=GREETING=hi there\n--\nsh\n-c\necho $GREETING > out/x.txt; pwd >> out/x.txt\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "treemat", "--protocol=json", f"@{flagfile}"], cwd=tmp_path, env=worker_env()
    )
    assert result.returncode == 0
    assert (tmp_path / "out/x.txt").read_text().split("\n")[:2] == ["hi there", os.path.realpath(tmp_path)]


def test_oneshot_propagates_failure_and_bad_flagfile(tmp_path: Path) -> None:
    flagfile = tmp_path / "fail.params"
    flagfile.write_text("--\nsh\n-c\nexit 7\n")
    run = [sys.executable, "-m", "treemat"]
    assert subprocess.run([*run, f"@{flagfile}"], cwd=tmp_path, env=worker_env()).returncode == 7
    flagfile.write_text("no separator\n")
    bad = subprocess.run([*run, f"@{flagfile}"], cwd=tmp_path, env=worker_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "treemat: error:" in bad.stderr
