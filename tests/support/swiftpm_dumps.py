"""Dump-package JSON excerpts (the shape swift 6.3 prints) and file trees for `treemat import`'s unit tests."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from treemat.swiftpm_import import ImportResult


def setting(tool: str, kind: str, value: Any, platforms: list[str] | None = None, config: str | None = None) -> Any:
    entry: dict[str, Any] = {"tool": tool, "kind": {kind: {"_0": value}}}
    if platforms is not None or config is not None:
        entry["condition"] = {"platformNames": platforms or [], **({"config": config} if config else {})}
    return entry


def target(name: str, kind: str = "regular", deps: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "dependencies": deps or [], "exclude": [], "resources": [], **extra}


def dump(name: str, targets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "toolsVersion": {"_version": "5.9.0"}, "targets": targets, "products": [], **extra}


def tree(root: Path, files: Mapping[str, str]) -> Path:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def build_text(result: ImportResult, directory: Path) -> str:
    return result.files[directory.resolve() / "BUILD.bazel"]


def rule_of(text: str, name: str) -> str:
    """The rule call named `name` in a rendered BUILD file."""
    match = re.search(rf'^\w+\(\n    name = "{re.escape(name)}",\n.*?^\)\n', text, re.S | re.M)
    assert match, f"no rule {name} in:\n{text}"
    return match.group(0)
