"""The worker's shell launcher (rules/private/launcher.bzl) with an odd $0: rendered from the rule's template
with stand-in paths, so it runs without Bazel (tests/rules/launcher_test.sh checks the one Bazel writes)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAIN = "_main/tools/treemat/__main__.py"


def _launcher(where: Path) -> Path:
    """`where/launcher` and its runfiles tree, whose main prints GOOD and its arguments."""
    template = re.search(r'_SCRIPT = """(.*?)"""', (ROOT / "rules/private/launcher.bzl").read_text(), re.S)
    assert template is not None
    script = template.group(1).format(
        main=MAIN,
        main_dir=os.path.dirname(MAIN),
        python_path="$runfiles/_main/tools:",
        binary="//tools/treemat:treemat",
        binary_name="treemat",
        interpreter="'/usr/bin/env' 'python3'",
        flags=" -S",
    )
    launcher = where / "launcher"
    launcher.write_text(script)
    launcher.chmod(0o755)
    main = where / "launcher.runfiles" / MAIN
    main.parent.mkdir(parents=True)
    main.write_text("import sys\nprint('GOOD' if sys.flags.no_site else 'SITE', *sys.argv[1:])\n")
    return launcher


def _run(path: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(path), "a b"], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=20
    )


def test_a_launcher_reached_through_symlinks_runs_its_own_runfiles(tmp_path: Path) -> None:
    """A link to the launcher (named like the binary, or with a hostile RUNFILES_DIR about) looked for runfiles
    beside the link: it ran RUNFILES_DIR's main, or exec'd the binary's name beside the link (itself, forever)."""
    real = tmp_path / "bazel bin"  # a space in the path too
    real.mkdir()
    launcher = _launcher(real)
    hostile = tmp_path / "hostile" / os.path.dirname(MAIN)
    hostile.mkdir(parents=True)
    (hostile / "__main__.py").write_text("print('HOSTILE')\n")
    links = tmp_path / "bin"
    links.mkdir()
    (links / "treemat").symlink_to(f"../bazel bin/{launcher.name}")  # relative, named as the py_binary
    (links / "two").symlink_to(links / "treemat")  # two hops, absolute
    for link in (links / "treemat", links / "two"):
        for env in ({}, {"RUNFILES_DIR": str(tmp_path / "hostile")}):
            ran = _run(link, tmp_path, **env)
            assert ran.returncode == 0 and ran.stdout == "GOOD a b\n", (link, env, ran.stdout, ran.stderr)
    ran = _run(launcher, real, RUNFILES_DIR=str(tmp_path / "hostile"))  # its own runfiles win over RUNFILES_DIR
    assert ran.stdout == "GOOD a b\n", ran
