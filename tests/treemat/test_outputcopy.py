"""Tests for treemat.outputcopy: an output is copied as it was when opened, or the copy fails."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.errors import ExecutionError
from treemat.outputcopy import copy_open_file


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A 1 MiB output (data, a hole, data) open for reading, its mtime in the past, and a destination dir."""
    source = tmp_path / "source"
    with source.open("wb") as handle:
        handle.write(b"a" * 4096)
        handle.seek(1 << 20)
        handle.write(b"z" * 4096)
    os.utime(source, ns=(10**9, 10**9))
    (tmp_path / "into").mkdir()
    fd = os.open(source, os.O_RDONLY)
    try:
        yield fd, tmp_path
    finally:
        os.close(fd)


def _copy(fd: int, info: os.stat_result, tmp_path: Path) -> bytes:
    into = os.open(tmp_path / "into", os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_open_file(fd, info, into, "copy", "out/x")
    finally:
        os.close(into)
    return (tmp_path / "into" / "copy").read_bytes()


def test_an_unchanged_output_is_copied_whole_with_its_hole(opened: tuple[int, Path]) -> None:
    fd, tmp_path = opened
    assert _copy(fd, os.fstat(fd), tmp_path) == b"a" * 4096 + bytes((1 << 20) - 4096) + b"z" * 4096


def test_an_output_that_shrank_while_copied_fails_instead_of_being_padded_with_zeros(
    opened: tuple[int, Path],
) -> None:
    """A process still writing the output (a tool's leftover child where no pid namespace ended it) truncated it
    after it was opened: the copy was padded with zeros to the first size, and the action succeeded."""
    fd, tmp_path = opened
    info = os.fstat(fd)
    os.truncate(tmp_path / "source", 10)
    with pytest.raises(ExecutionError, match="'out/x' changed while it was copied"):
        _copy(fd, info, tmp_path)


def test_an_output_rewritten_in_place_while_copied_fails(opened: tuple[int, Path]) -> None:
    """The same size, other bytes: the copy would mix the two; its modification time tells."""
    fd, tmp_path = opened
    info = os.fstat(fd)
    with (tmp_path / "source").open("r+b") as handle:
        handle.write(b"b" * 4096)
    with pytest.raises(ExecutionError, match="changed while it was copied"):
        _copy(fd, info, tmp_path)
