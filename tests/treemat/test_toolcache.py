"""Which command lines get a seeded tool cache, and under which key."""

from __future__ import annotations

import os
import shutil

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
