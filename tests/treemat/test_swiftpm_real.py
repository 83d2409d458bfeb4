"""`treemat import` on what real packages have (apple/swift-collections, swift-argument-parser, swift-atomics,
...): dump-package JSON excerpts in the shape swift 6.3 prints them, one test per finding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treemat.swiftpm_import import plan_import, starlark_string

from ..support.swiftpm_dumps import build_text, dump, rule_of, target, tree


def test_sources_with_spaces_are_kept_and_resources_with_spaces_reported(tmp_path: Path) -> None:
    # swift-argument-parser: `Sources/ArgumentParser/Parsable Properties/Flag.swift`; swift-collections:
    # `BitSet+SetAlgebra union.swift`. Bazel labels take a space; Bazel 4's runfiles manifest does not.
    root = tree(
        tmp_path / "pkg",
        {
            "Package.swift": "",
            "Sources/A/Parsable Properties/Flag.swift": "",
            "Sources/A/Unmanaged extensions.swift": "",
            "Sources/A/Resources/a b.txt": "",
        },
    )
    data: dict[str, Any] = dump("P", [target("A", resources=[{"path": "Resources", "rule": {"process": {}}}])])
    result = plan_import(root, root_data=data)
    rule = rule_of(build_text(result, root), "A")
    assert starlark_string("Sources/A/Parsable Properties/Flag.swift") in rule
    assert starlark_string("Sources/A/Unmanaged extensions.swift") in rule
    assert "a b.txt" not in rule
    assert [u.item for u in result.untranslated if "a b.txt" in u.item]
