"""Which command lines get a seeded tool cache, and under which key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from treemat.toolcache import swift_seed_recipe

SWIFTC = shutil.which("swiftc") or "/opt/swift/usr/bin/swiftc"
COMPILE = [SWIFTC, "-module-name", "M", "-Onone", "-module-cache-path", "{TOOL_CACHE}/swift-module-cache", "a.swift"]


@pytest.fixture(autouse=True)
def _needs_swiftc() -> None:
    if not os.path.exists(SWIFTC):
        pytest.fail(f"no swiftc at {SWIFTC}: the rules and these tests need one (install Swift under /opt/swift)")


def test_a_swiftc_compile_is_seeded() -> None:
    recipe = swift_seed_recipe(COMPILE)
    assert recipe is not None
    _, seed_argv = recipe
    assert seed_argv[0] == SWIFTC
    assert "-Onone" in seed_argv


def test_a_wrapper_running_swiftc_after_double_dash_gets_the_same_seed() -> None:
    # swift_test's compile: the discovery script runs swiftc, then writes the runner from the symbol graph.
    wrapped = ["/usr/bin/python3", "discovery.py", "--module", "M", "--output", "main.swift", "--", *COMPILE]
    direct = swift_seed_recipe(COMPILE)
    assert direct is not None
    assert swift_seed_recipe(wrapped) == direct


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["/bin/sh", "-c", "true"],
        ["/usr/bin/python3", "x.py", "--", "/bin/cc", "-c", "x.c"],
        ["/usr/bin/python3", "x.py", "--"],
        [SWIFTC, "-module-name", "M", "a.swift"],  # no module cache under {TOOL_CACHE}
    ],
)
def test_other_command_lines_are_not_seeded(argv: list[str]) -> None:
    assert swift_seed_recipe(argv) is None


def test_a_bare_compiler_name_is_the_one_on_the_tools_path_not_the_workers(tmp_path: Path) -> None:
    # a service serves relays with other PATHs: the seed must be keyed (and built) by the tool's own swiftc
    first, second = tmp_path / "toolchain-a", tmp_path / "toolchain-b"
    for directory in (first, second):  # two compilers of one name (their identity: path, size, mtime, inode)
        directory.mkdir()
        (directory / "swiftc").write_text(f'#!/bin/sh\nexec {SWIFTC} "$@"\n')
        (directory / "swiftc").chmod(0o755)
    bare = ["swiftc", *COMPILE[1:]]
    found_first, found_second = swift_seed_recipe(bare, str(first)), swift_seed_recipe(bare, str(second))
    assert found_first is not None and found_second is not None
    assert found_first[0] != found_second[0]
    assert swift_seed_recipe(bare, str(tmp_path / "nowhere")) is None
