"""The layer order has one source, the import-linter contract in pyproject.toml; docs/architecture.md shows
it to readers, and this test keeps that copy identical and checks the contract covers every module."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

# under `bazel test` the runner points at the runfiles copy (tests/pytest_runner.py), else this checkout
TOOLS = Path(os.environ.get("TREEMAT_TOOLS_DIR") or Path(__file__).resolve().parents[2] / "tools")
REPO = TOOLS.parent
PACKAGE = TOOLS / "treemat"


def _contract_layers() -> list[str]:
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layered = [c for c in config["contracts"] if c["type"] == "layers" and c.get("containers") == ["treemat"]]
    assert len(layered) == 1 and layered[0]["exhaustive"] is True
    return [str(layer) for layer in layered[0]["layers"]]


def _doc_layers() -> list[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text[text.index("## Layers") :]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "docs/architecture.md has no code block under '## Layers'"
    return block.group(1).strip().splitlines()


def test_the_docs_show_the_contracts_layers() -> None:
    assert _doc_layers() == _contract_layers()


def test_contract_places_every_module() -> None:
    """(lint-imports checks the same, and that every placed module exists; this runs under `bazel test` too.)"""
    placed = {name.strip() for layer in _contract_layers() for name in layer.split("|")}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert modules <= placed, f"not in the import contract: {sorted(modules - placed)}"


def test_only_layout_spells_a_subdirectory_of_the_root() -> None:
    """Every path under TREEMAT_ROOT comes from layout.Root: no other module joins a root subdirectory's name."""
    names = "cas|tmp|quarantine|exec|verified|stats|dircache|tool-cache|replay|gc.lock|README.txt"
    spelled = re.compile(rf'root\)? / "({names})"')  # `root / "cas"`, `self.root / "exec"`, `Path(root) / "tmp"`
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "layout.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert offenders == []


def test_the_services_start_makes_no_dataclass() -> None:
    """What a cold service imports before its first reply defines plain classes and NamedTuples: making a
    dataclass compiles its methods with `exec` (0.4 ms each) and `dataclasses` imports `inspect`; 31 of them
    were 18 ms of a 52 ms start (docs/how-it-works.md)."""
    import subprocess

    probe = (
        "import sys, treemat.relay, treemat.servicespawn, treemat.service\n"
        "treemat.service.import_first_request()\n"
        "import treemat.backends, treemat.materializer, treemat.stack\n"
        "print(sorted(m for m in ('dataclasses', 'inspect') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TOOLS)}
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout
