"""Tests for treemat.flagfile: the rules <-> treemat contract and one-shot mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from treemat.errors import ProtocolError
from treemat.flagfile import MAX_FLAGFILE_BYTES, parse_action_args, read_flagfile, request_arguments

from ..support.harness import worker_env


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


def test_request_arguments(tmp_path: Path) -> None:
    flagfile = tmp_path / "f.params"
    flagfile.write_text("--output=o\n--\necho\nhello world\n")
    assert request_arguments(["@" + str(flagfile)]) == ["--output=o", "--", "echo", "hello world"]
    with pytest.raises(ProtocolError, match="cannot read flagfile"):
        request_arguments(["@" + str(tmp_path / "missing")])


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


def test_tool_arguments_starting_with_at_are_never_expanded(tmp_path: Path) -> None:
    """Bazel's expansion of the one flagfile is all there is: @rpath-style and response-file args stay verbatim."""
    rsp = tmp_path / "args.rsp"
    rsp.write_text("SHOULD-NOT-APPEAR\n")
    expanded_by_bazel = ["--output=o", "--", "ld", "-rpath", "@executable_path/Frameworks", f"@{rsp}", "@/dev/zero"]
    spec = parse_action_args(request_arguments(expanded_by_bazel))
    assert spec.argv == ["ld", "-rpath", "@executable_path/Frameworks", f"@{rsp}", "@/dev/zero"]


def test_escaped_at_arguments_are_unescaped_in_both_modes(tmp_path: Path) -> None:
    flagfile = tmp_path / "request.params"
    flagfile.write_text("--output=o\n--\nld\n-rpath\n@@loader_path/../lib\n@@tool.rsp\n")
    spec = parse_action_args(request_arguments([f"@{flagfile}"]))
    assert spec.argv == ["ld", "-rpath", "@loader_path/../lib", "@tool.rsp"]
    as_bazel_passes_it = ["--output=o", "--", "ld", "@@loader_path/../lib"]
    assert parse_action_args(request_arguments(as_bazel_passes_it)).argv == ["ld", "@loader_path/../lib"]


def test_flagfile_must_be_a_bounded_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="not a regular file"):
        request_arguments(["@/dev/zero"])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ProtocolError, match="not a regular file"):
        request_arguments([f"@{fifo}"])  # must not block
    big = tmp_path / "big.params"
    with open(big, "wb") as handle:
        handle.truncate(MAX_FLAGFILE_BYTES + 1)
    with pytest.raises(ProtocolError, match="limit"):
        request_arguments([f"@{big}"])


def test_flagfile_lines_split_only_at_newline(tmp_path: Path) -> None:
    """Bazel writes one argument per `\\n`; str.splitlines also split at U+2028, U+0085, VT, FF, FS...: 8
    arguments reached the tool as 16."""
    awkward = ["a\u2028b", "c\u0085d", "e\x0bf", "g\x0ch", "i\x1cj", "k\x1dl", "m\x1en", "o\u2029p"]
    path = tmp_path / "args.params"
    path.write_bytes(("\n".join(["--", *awkward]) + "\r\n").encode())
    assert read_flagfile(str(path)) == ["--", *awkward]


@pytest.mark.parametrize("output", ["/".join(["o" * 200] * 30), "/".join(["o"] * 3000)])
def test_oneshot_output_paths_too_long_or_deep_are_one_line_errors(tmp_path: Path, output: str) -> None:
    """One-shot mode made an output's parent with a traceback (ENAMETOOLONG; RecursionError in makedirs)."""
    flagfile = tmp_path / "long.params"
    flagfile.write_text(f"--output-dir={output}\n--\ntrue\n")
    run = [sys.executable, "-m", "treemat", f"@{flagfile}"]
    bad = subprocess.run(run, cwd=tmp_path, env=worker_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("treemat: error:") and bad.stderr.count("\n") == 1, bad
