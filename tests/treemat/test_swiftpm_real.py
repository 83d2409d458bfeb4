"""`treemat import` on what real packages have (apple/swift-collections, swift-argument-parser, swift-atomics,
...): dump-package JSON excerpts in the shape swift 6.3 prints them, one test per finding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treemat.swiftpm_import import plan_import, starlark_string

from ..support.swiftpm_dumps import build_text, dump, rule_of, setting, target, tree


def test_sources_with_spaces_are_kept_and_resources_with_spaces_bundled_not_runfiles(tmp_path: Path) -> None:
    # swift-argument-parser: `Sources/ArgumentParser/Parsable Properties/Flag.swift`; swift-collections:
    # `BitSet+SetAlgebra union.swift`. Bazel labels take a space; Bazel 4's runfiles manifest does not, but the
    # resource bundle is one directory there.
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
    assert '"Sources/A/Resources/a b.txt": "a b.txt"' in rule and "data" not in rule
    assert [u.item for u in result.untranslated if "a b.txt" in u.item]


def test_c_targets_come_with_the_bazelrc_line_that_compiles_them_with_clang(tmp_path: Path) -> None:
    # swift-nio's CNIOAtomics.h: `struct catmc_atomic_int * _Nonnull ...`: SwiftPM compiles it with clang, the
    # auto-configured C toolchain (gcc) rejects it.
    root = tree(tmp_path / "pkg", {"Package.swift": "", "Sources/C/include/c.h": "", "Sources/C/c.c": ""})
    assert plan_import(root, root_data=dump("P", [target("C")])).bazelrc == "build --repo_env=CC=clang\n"
    swift_only = tree(tmp_path / "swift", {"Package.swift": "", "Sources/S/s.swift": ""})
    assert plan_import(swift_only, root_data=dump("P", [target("S")])).bazelrc == ""


def test_c_settings_of_a_swift_target_reach_its_clang_importer_and_swift_settings_of_c_are_ignored(
    tmp_path: Path,
) -> None:
    # SwiftPM passes a Swift target's cSettings defines and unsafe flags to swiftc as `-Xcc`; swift-nio sets
    # swiftSettings (MemberImportVisibility) on its C targets, which SwiftPM ignores: nothing to report.
    root = tree(tmp_path / "pkg", {"Package.swift": "", "Sources/C/include/c.h": "", "Sources/S/s.swift": ""})
    data = dump(
        "P",
        [
            target("C", settings=[setting("swift", "enableUpcomingFeature", "MemberImportVisibility")]),
            target(
                "S",
                deps=[{"byName": ["C", None]}],
                settings=[setting("c", "define", "FAST=1"), setting("cxx", "unsafeFlags", ["-fno-exceptions"])],
            ),
        ],
    )
    result = plan_import(root, root_data=data)
    text = build_text(result, root)
    assert '"-Xcc",\n        "-DFAST=1",\n        "-Xcc",\n        "-fno-exceptions",' in rule_of(text, "S")
    assert "MemberImportVisibility" not in rule_of(text, "C")
    assert result.untranslated == []


def test_swiftpm_s_own_conditions_are_defined(tmp_path: Path) -> None:
    # `swift build -v`: swiftc gets -DSWIFT_PACKAGE (and, with no resource bundle, which treemat never makes,
    # -DSWIFT_MODULE_RESOURCE_BUNDLE_UNAVAILABLE), clang -DSWIFT_PACKAGE=1; swift-nio and swift-system branch on
    # `#if SWIFT_PACKAGE`. (DEBUG comes from the rules outside -c opt, as rules_swift defines it.)
    root = tree(tmp_path / "pkg", {"Package.swift": "", "Sources/C/include/c.h": "", "Sources/S/s.swift": ""})
    text = build_text(plan_import(root, root_data=dump("P", [target("C"), target("S")])), root)
    assert 'defines = [\n        "SWIFT_PACKAGE",\n        "SWIFT_MODULE_RESOURCE_BUNDLE_UNAVAILABLE",\n    ]' in (
        rule_of(text, "S")
    )
    assert 'local_defines = ["SWIFT_PACKAGE=1"]' in rule_of(text, "C")


def test_a_test_target_s_excluded_files_are_its_runfiles(tmp_path: Path) -> None:
    # swift-argument-parser: `.testTarget(name: "ArgumentParserUnitTests", exclude: ["Snapshots"])`, its tests
    # read `Snapshots/` beside `#filePath` (as `swift test` runs them, from the source tree).
    root = tree(
        tmp_path / "pkg",
        {
            "Package.swift": "",
            "Sources/L/l.swift": "",
            "Sources/L/notes.md": "",
            "Tests/T/t.swift": "",
            "Tests/T/Snapshots/testHelp().txt": "",
            "Tests/T/Snapshots/.hidden": "",
        },
    )
    data = dump("P", [target("L", exclude=["notes.md"]), target("T", "test", exclude=["Snapshots"])])
    text = build_text(plan_import(root, root_data=data), root)
    assert 'data = ["Tests/T/Snapshots/testHelp().txt"]' in rule_of(text, "T")
    assert "notes.md" not in text, "a library's excluded files stay out"
