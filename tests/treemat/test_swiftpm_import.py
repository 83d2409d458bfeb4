"""`treemat import`'s translation, from dump-package JSON written here in the shape swift 6.3 prints it
(tests/e2e/test_swiftpm_import.py runs the real `swift package dump-package`)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treemat.cli import cli
from treemat.swiftpm import PackageImportError, parse_manifest
from treemat.swiftpm_import import MARK, plan_import, repo_name, starlark_string, write_import
from treemat.swiftpm_layout import label_safe

from ..support.swiftpm_dumps import build_text, dump, rule_of, setting, target, tree


@pytest.fixture()
def geometry(tmp_path: Path) -> Path:
    return tree(
        tmp_path / "geometry",
        {
            "Package.swift": "",
            "Sources/CShapes/include/CShapes.h": "",
            "Sources/CShapes/shapes.c": "",
            "Sources/CShapes/internal/inner.h": "",
            "Sources/CShapes/shapes.macros": "",
            "Sources/CShapes/broken.c": "",
            "Sources/CMapped/include/module.modulemap": "",
            "Sources/CMapped/include/mapped.h": "",
            "Sources/CMapped/mapped.c": "",
            "Sources/Geometry/Geometry.swift": "",
            "Sources/Geometry/Shapes/Shape.swift": "",
            "Sources/Geometry/NotListed.swift": "",
            "Sources/Geometry/.hidden.swift": "",
            "Sources/Geometry/Resources/unit.txt": "",
            "Sources/ShapesCLI/main.swift": "",
            "Tests/GeometryTests/T.swift": "",
        },
    )


GEOMETRY = dump(
    "Geometry",
    [
        target(
            "CShapes",
            exclude=["broken.c"],
            settings=[
                setting("c", "headerSearchPath", "internal"),
                setting("c", "define", "SCALE=2"),
                setting("c", "define", "APPLE_ONLY", ["macos", "ios"]),
                setting("c", "define", "LINUX_ONLY", ["linux"]),
                setting("c", "define", "NDEBUG", config="release"),
                setting("linker", "linkedLibrary", "m"),
            ],
        ),
        target("CMapped", deps=[{"byName": ["CShapes", None]}]),
        target(
            "Geometry",
            deps=[{"byName": ["CShapes", None]}, {"target": ["CMapped", None]}],
            sources=["Geometry.swift", "Shapes"],
            resources=[{"path": "Resources/unit.txt", "rule": {"copy": {}}}],
            settings=[
                setting("swift", "define", "GEOMETRY_LINUX", ["linux"]),
                setting("swift", "define", "GEOMETRY_APPLE", ["macos"]),
                setting("swift", "define", "DEBUG_ONLY", config="debug"),
                setting("swift", "unsafeFlags", ["-Ounchecked", "-wmo"], config="release"),
                setting("swift", "enableUpcomingFeature", "ExistentialAny"),
                setting("swift", "enableExperimentalFeature", "Extern"),
                setting("swift", "unsafeFlags", ["-enforce-exclusivity=checked"]),
                setting("swift", "swiftLanguageMode", "5"),
                setting("linker", "linkedFramework", "Foundation"),
            ],
        ),
        target("shapes-cli", "executable", [{"byName": ["Geometry", None]}], path="Sources/ShapesCLI"),
        target("GeometryTests", "test", [{"byName": ["Geometry", None]}, {"byName": ["shapes-cli", None]}]),
        target("Plugin", "plugin"),
    ],
    toolsVersion={"_version": "6.0.0"},
    products=[
        {"name": "Geometry", "targets": ["Geometry"], "type": {"library": ["automatic"]}},
        {"name": "shapes", "targets": ["shapes-cli"], "type": {"executable": None}},
        {"name": "Both", "targets": ["Geometry", "CShapes"], "type": {"library": ["automatic"]}},
        {"name": "GeometryPlugin", "targets": ["Plugin"], "type": {"plugin": None}},
    ],
)


def test_c_targets_swift_targets_and_settings(geometry: Path) -> None:
    result = plan_import(geometry, root_data=GEOMETRY)
    text = build_text(result, geometry)
    shapes = rule_of(text, "CShapes")
    assert shapes.startswith("cc_library(")
    assert '"Sources/CShapes/shapes.c"' in shapes and "broken.c" not in shapes, "exclude is honoured"
    assert '"Sources/CShapes/internal/inner.h"' in shapes, "private headers are srcs"
    assert 'hdrs = ["Sources/CShapes/include/CShapes.h"]' in shapes
    assert 'textual_hdrs = ["Sources/CShapes/shapes.macros"]' in shapes  # #include'd, neither source nor header
    assert "textual_hdrs" not in rule_of(text, "CMapped_cc"), "its module map is the swift_c_module's"
    assert '"Sources/CShapes/include",\n        "Sources/CShapes/internal",' in shapes, "public dir + headerSearchPath"
    assert '"SCALE=2"' in shapes and '"LINUX_ONLY"' in shapes and "APPLE_ONLY" not in shapes
    assert 'linkopts = ["-lm"]' in shapes and 'tags = ["swift_module=CShapes"]' in shapes
    # a C target with its own module map: a cc_library behind a swift_c_module; C deps reach the cc_library
    assert rule_of(text, "CMapped_cc").startswith("cc_library(")
    assert 'deps = [":CShapes"]' in rule_of(text, "CMapped_cc")
    mapped = rule_of(text, "CMapped")
    assert mapped.startswith("swift_c_module(") and '"Sources/CMapped/include/module.modulemap"' in mapped
    assert 'deps = [":CMapped_cc"]' in mapped and "mapped.h" not in mapped
    geometry_rule = rule_of(text, "Geometry")
    assert geometry_rule.startswith("swift_library(")
    assert '"Sources/Geometry/Geometry.swift",\n        "Sources/Geometry/Shapes/Shape.swift",\n    ]' in geometry_rule
    assert "NotListed" not in geometry_rule and ".hidden" not in geometry_rule, "sources and hidden files"
    assert 'deps = [\n        ":CShapes",\n        ":CMapped",\n    ]' in geometry_rule
    # .when(configuration:): SwiftPM's release is -c opt, its debug Bazel's fastbuild and dbg
    assert (
        text.count('config_setting(\n    name = "swiftpm_release",\n    values = {"compilation_mode": "opt"},\n)') == 1
    )
    assert (
        'defines = [\n        "SWIFT_PACKAGE",\n'  # it has a bundle: the rules define ..._AVAILABLE
        '        "GEOMETRY_LINUX",\n    ] + select({\n        ":swiftpm_release": [],\n'
        '        "//conditions:default": ["DEBUG_ONLY"],\n    }),'
    ) in geometry_rule
    assert (
        '    ] + select({\n        ":swiftpm_release": [\n            "-Ounchecked",\n            "-wmo",\n        ],\n'
        '        "//conditions:default": [],\n    }),'
    ) in geometry_rule
    assert (
        'local_defines = [\n        "SWIFT_PACKAGE=1",\n        "SCALE=2",\n        "LINUX_ONLY",\n    ] + select({'
        in shapes
    )
    assert '"-enable-upcoming-feature",\n        "ExistentialAny",' in geometry_rule
    assert '"-enable-experimental-feature",\n        "Extern",' in geometry_rule
    assert '"-enforce-exclusivity=checked"' in geometry_rule and 'swift_version = "5"' in geometry_rule
    assert 'package_name = "geometry"' in geometry_rule, "SwiftPM's package identity, not the Bazel repository"
    assert 'data = ["Sources/Geometry/Resources/unit.txt"]' in geometry_rule
    cli_rule = rule_of(text, "shapes-cli")
    assert cli_rule.startswith("swift_binary(") and 'module_name = "shapes_cli"' in cli_rule
    assert '"Sources/ShapesCLI/main.swift"' in cli_rule and 'swift_version = "6"' in cli_rule
    tests = rule_of(text, "GeometryTests")
    assert tests.startswith("swift_test(") and 'deps = [":Geometry"]' in tests
    assert text.endswith('\nalias(\n    name = "shapes",\n    actual = ":shapes-cli",\n)\n'), "one alias: the product"
    assert "Plugin" not in text and "size" not in tests, "the rules' default size unless asked"
    sized = build_text(plan_import(geometry, root_data=GEOMETRY, test_size="large"), geometry)
    assert rule_of(sized, "GeometryTests").endswith('    size = "large",\n)\n') and sized.count("size =") == 1
    assert text.startswith(MARK) and 'load("@treemat//rules:defs.bzl", "swift_binary", "swift_c_module",' in text
    # its resource in its bundle (Bundle.module, rules/private/resources.bzl), and in the runfiles as before
    assert 'resources = {\n        "Sources/Geometry/Resources/unit.txt": "unit.txt",\n    },' in geometry_rule
    assert 'data = ["Sources/Geometry/Resources/unit.txt"]' in geometry_rule
    lines = {u.line() for u in result.untranslated}
    assert lines == {
        "geometry/CShapes: cSettings define APPLE_ONLY: only for macos, ios (not linux): dropped",
        "geometry/Geometry: swiftSettings define GEOMETRY_APPLE: only for macos (not linux): dropped",
        "geometry/Geometry: linkerSettings linkedFramework Foundation: frameworks are Apple-only: dropped",
        "geometry/GeometryTests: dependency on executable target shapes-cli: not translated",
        "geometry/Plugin: plugin target not translated",
    }


@pytest.mark.parametrize(
    ("tools", "package_modes", "target_mode", "expected"),
    [
        ("6.0.0", None, None, "6"),
        ("5.9.0", None, None, "5"),
        ("4.2.0", None, None, "4.2"),
        ("5.9.0", ["4.2", "5"], None, "5"),
        ("6.0.0", ["5"], None, "5"),
        ("6.0.0", ["5", "6"], "5", "5"),
    ],
)
def test_language_mode(
    tmp_path: Path, tools: str, package_modes: list[str] | None, target_mode: str | None, expected: str
) -> None:
    tree(tmp_path / "p", {"Package.swift": "", "Sources/A/a.swift": ""})
    settings_ = [setting("swift", "swiftLanguageMode", target_mode)] if target_mode else []
    data = dump("P", [target("A", settings=settings_)], swiftLanguageVersions=package_modes)
    data["toolsVersion"] = {"_version": tools}
    assert f'swift_version = "{expected}"' in build_text(plan_import(tmp_path / "p", root_data=data), tmp_path / "p")


def test_language_standards_reach_c_targets_of_one_language(tmp_path: Path) -> None:
    files = {"Sources/CC/c.c": "", "Sources/Cxx/x.cpp": "", "Sources/Both/b.c": "", "Sources/Both/b.cc": ""}
    root = tree(tmp_path / "p", {"Package.swift": "", "Sources/Bad Name/a.swift": "", **files})
    data = dump("P", [target("CC"), target("Cxx"), target("Both"), target("Bad Name")])
    data.update(cLanguageStandard="gnu11", cxxLanguageStandard="c++17")
    result = plan_import(root, root_data=data)
    text = build_text(result, root)
    assert 'copts = ["-std=gnu11"]' in rule_of(text, "CC") and 'copts = ["-std=c++17"]' in rule_of(text, "Cxx")
    assert "copts" not in rule_of(text, "Both") and "Bad Name" not in text
    assert [u.line() for u in result.untranslated] == [
        "p/Bad Name: target name 'Bad Name' is not a valid Bazel target name: not translated",
        "p/Both: language standard: C and C++ sources in one target share one copts: not translated",
    ]


def test_settings_in_the_pre_5_9_dump_format_parse() -> None:
    manifest = parse_manifest(
        dump("P", [target("A", settings=[{"name": "define", "value": ["X"], "tool": "swift", "condition": None}])])
    )
    assert manifest.targets[0].settings[0].kind == "define" and manifest.targets[0].settings[0].values == ("X",)


def test_a_malformed_dump_is_one_error() -> None:
    with pytest.raises(PackageImportError, match="not a `swift package dump-package` document"):
        parse_manifest({"targets": []})


def _with_dependency(tmp_path: Path, dep_product: str = "FastMath") -> tuple[Path, Path, dict[str, Any]]:
    root = tree(tmp_path / "geometry", {"Package.swift": "", "Sources/G/g.swift": ""})
    dep = tree(tmp_path / "checkouts" / "fast-math", {"Package.swift": "", "Sources/FastMath/f.swift": ""})
    remote = {"sourceControl": [{"identity": "fast-math", "location": {"remote": [{"urlString": "https://x/y"}]}}]}
    deps = [{"product": [dep_product, "fast-math", None, None]}, {"byName": ["FastMath", None]}]
    return root, dep, dump("G", [target("G", deps=deps)], dependencies=[remote])


def test_dependency_products_become_labels_of_the_imported_checkout(tmp_path: Path) -> None:
    root, dep, data = _with_dependency(tmp_path)
    dep_dump = dump("FastMath", [target("FastMath")], products=[{"name": "FastMath", "targets": ["FastMath"]}])
    result = plan_import(root, {"fast-math": dep}, root_data=data, load=lambda _path: dep_dump)
    assert 'deps = ["@swiftpkg_fast_math//:FastMath"]' in build_text(result, root), "product and byName, once"
    assert 'package_name = "fast-math"' in result.files[dep.resolve() / "BUILD.bazel"]
    assert 'workspace(name = "swiftpkg_fast_math")' in result.files[dep.resolve() / "WORKSPACE.bazel"]
    assert 'module(name = "swiftpkg_fast_math"' in result.files[dep.resolve() / "MODULE.bazel"]
    assert f'name = "swiftpkg_fast_math",\n    path = "{dep.resolve()}",' in result.workspace
    assert 'bazel_dep(name = "swiftpkg_fast_math", version = "0.0.0")\nlocal_path_override(' in result.module
    assert result.untranslated == []


def test_a_dependency_without_checkout_is_reported_and_still_named(tmp_path: Path) -> None:
    root, _, data = _with_dependency(tmp_path)
    result = plan_import(root, root_data=data)
    assert 'deps = ["@swiftpkg_fast_math//:FastMath"]' in build_text(result, root)
    missing, by_name = result.untranslated
    assert "no local checkout, pass --dep fast-math=PATH" in missing.line() and result.workspace == ""
    assert by_name.item == "dependency on product FastMath of any package: not found", "byName needs the manifest"


def test_a_transitive_dependency_without_checkout_is_not_a_bazel_dep(tmp_path: Path) -> None:
    root, dep, data = _with_dependency(tmp_path)
    far = {"sourceControl": [{"identity": "far", "location": {"remote": [{"urlString": "https://x/far"}]}}]}
    products = [{"name": "FastMath", "targets": ["FastMath"]}]
    dep_dump = dump("FastMath", [target("FastMath")], products=products, dependencies=[far])
    result = plan_import(root, {"fast-math": dep}, root_data=data, load=lambda _path: dep_dump)
    assert "swiftpkg_far" not in result.files[dep.resolve() / "MODULE.bazel"] + result.module + result.workspace
    assert [u.line() for u in result.untranslated] == [
        "fast-math: dependency far (https://x/far): no local checkout, pass --dep far=PATH; its products are "
        "taken as targets of the same name"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = plan_import(root, {"fast-math": empty}, root_data=data)
    assert f"dependency fast-math ({empty} has no Package.swift)" in missing.untranslated[0].item


def test_an_unknown_product_is_reported(tmp_path: Path) -> None:
    root, dep, data = _with_dependency(tmp_path, dep_product="Missing")
    dep_dump = dump("FastMath", [target("FastMath")], products=[{"name": "FastMath", "targets": ["FastMath"]}])
    result = plan_import(root, {"fast-math": dep}, root_data=data, load=lambda _path: dep_dump)
    assert [u.item for u in result.untranslated] == ["dependency on product Missing of fast-math: not found"]


def test_untranslated_targets_of_a_product_are_reported(tmp_path: Path) -> None:
    root, dep, data = _with_dependency(tmp_path)
    products = [{"name": "FastMath", "targets": ["FastMath", "FastMathMacros"]}]
    dep_dump = dump("FastMath", [target("FastMath"), target("FastMathMacros", "macro")], products=products)
    result = plan_import(root, {"fast-math": dep}, root_data=data, load=lambda _path: dep_dump)
    assert 'deps = ["@swiftpkg_fast_math//:FastMath"]' in build_text(result, root)
    assert [u.line() for u in result.untranslated] == [
        "fast-math/FastMathMacros: macro target not translated",
        "geometry/G: product FastMath: its untranslated targets FastMathMacros dropped",
    ]


def test_an_unused_dep_is_an_error(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", {"Package.swift": "", "Sources/A/a.swift": ""})
    with pytest.raises(PackageImportError, match="--dep typo: no package in the graph depends on 'typo'"):
        plan_import(root, {"typo": tmp_path}, root_data=dump("P", [target("A")]))


def test_nested_bazel_package_and_c_on_swift_are_reported(tmp_path: Path) -> None:
    root = tree(
        tmp_path / "p",
        {
            "Package.swift": "",
            "Sources/A/a.swift": "",
            "Sources/A/BUILD": "",
            "Sources/C/c.c": "",
            "Sources/S/s.swift": "",
        },
    )
    data = dump("P", [target("A"), target("S"), target("C", deps=[{"byName": ["S", None]}])])
    lines = [u.line() for u in plan_import(root, root_data=data).untranslated]
    assert lines == [
        "p/A: Sources/A has a BUILD file (a Bazel package of its own): target not translated",
        "p/C: C target depends on Swift module S: dropped",
    ]


def test_second_run_changes_nothing_and_hand_written_files_are_refused(tmp_path: Path) -> None:
    root = tree(tmp_path / "p", {"Package.swift": "", "Sources/A/a.swift": ""})
    data = dump("P", [target("A")])
    first = plan_import(root, root_data=data)
    write_import(first)
    build = root / "BUILD.bazel"
    assert first.status == {build.resolve(): "written"}
    before = build.stat()
    second = plan_import(root, root_data=data)
    write_import(second)
    assert second.status == {build.resolve(): "unchanged"} and build.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in root.iterdir()) == ["BUILD.bazel", "Package.swift", "Sources"], "no temp files"
    for hand_written in ("BUILD.bazel", "BUILD"):
        build.unlink(missing_ok=True)
        (root / hand_written).write_text("# mine\n")
        with pytest.raises(PackageImportError, match=f"{hand_written}: written by hand"):
            write_import(plan_import(root, root_data=data))
        assert (root / hand_written).read_text() == "# mine\n"
        write_import(plan_import(root, root_data=data), force=True)
        assert build.read_text().startswith(MARK)
        (root / "BUILD").unlink(missing_ok=True)


@given(st.text(min_size=1, max_size=40))
def test_repo_names_are_valid_module_and_workspace_names(identity: str) -> None:
    name = repo_name(identity)
    assert re.fullmatch(r"[a-z]([a-z0-9._-]*[a-z0-9])?", name), name


@given(st.text(max_size=30))
def test_starlark_strings_round_trip_or_are_refused(value: str) -> None:
    try:
        literal = starlark_string(value)
    except ValueError:
        assert any(ord(c) < 32 and c not in "\n\t\r" for c in value) or "\x7f" in value
        return
    assert ast.literal_eval(literal) == value  # Starlark's escapes used here are Python's


_NAME = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and not n.startswith(".")
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_NAME, min_size=1, max_size=4, unique=True))
def test_every_source_is_a_valid_label_or_reported_and_reimport_is_identical(tmp_path: Path, names: list[str]) -> None:
    root = tmp_path / "pkg"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    tree(root, {"Package.swift": "", **{f"Sources/A/{n}.swift": "" for n in names}})
    data = dump("P", [target("A")])
    result = plan_import(root, root_data=data)
    text = build_text(result, root)
    for name in names:
        path = f"Sources/A/{name}.swift"
        if label_safe(path):
            assert starlark_string(path) in text
        else:
            assert any(repr(path) in u.item for u in result.untranslated), path
    write_import(result)
    again = plan_import(root, root_data=data)
    write_import(again)
    assert set(again.status.values()) == {"unchanged"} and again.files == result.files


def test_cli_help_json_and_one_line_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(cli, ["import", "--help"]).output
    assert "--dep NAME=PATH" in help_text and "--dump" in help_text and "--force" in help_text
    root = tree(tmp_path / "p", {"Package.swift": "", "Sources/A/a.swift": "", "Sources/B/b.swift": ""})
    dump_file = tmp_path / "dump.json"
    dump_file.write_text(
        json.dumps(dump("P", [target("A"), target("B", settings=[setting("c", "headerSearchPath", "inc")])]))
    )
    dry = runner.invoke(cli, ["import", "--dry-run", "--dump", str(dump_file), str(root)])
    assert dry.exit_code == 0 and f"would write: {root.resolve() / 'BUILD.bazel'}" in dry.stdout
    assert not (root / "BUILD.bazel").exists(), "--dry-run writes nothing"
    run = runner.invoke(cli, ["import", "--json", "--dump", str(dump_file), str(root)])
    assert run.exit_code == 0, run.output
    report = json.loads(run.output)
    assert report["files"] == [{"path": str(root.resolve() / "BUILD.bazel"), "status": "written"}]
    assert report["untranslated"] == [
        {
            "package": "p",
            "target": "B",
            "item": "cSettings headerSearchPath inc: C settings of a Swift target are not translated",
        }
    ]
    text = runner.invoke(cli, ["import", "--dump", str(dump_file), str(root)])
    assert text.exit_code == 0 and f"unchanged: {root.resolve() / 'BUILD.bazel'}" in text.stdout
    (root / "BUILD.bazel").write_text("# mine\n")
    for args, message in [
        (["import", "--dump", str(dump_file), str(root)], "BUILD.bazel: written by hand"),
        (["import", str(tmp_path / "nowhere")], "no Package.swift"),
        (["import", "--dep", "novalue", str(root)], "expected NAME=PATH"),
    ]:
        failed = runner.invoke(cli, args)
        assert failed.exit_code in (1, 2), failed.output
        errors = [line for line in failed.output.splitlines() if "rror" in line]
        assert len(errors) == 1 and message in errors[0], failed.output


def test_resources_land_in_the_bundle_as_swiftpm_puts_them(tmp_path: Path) -> None:
    from treemat.swiftpm import Target, bundle_path

    package = tmp_path / "p"
    for name in ("Data/a.json", "Data/deep/b.txt", "Assets/x/y.png", "one.txt", "inline.bin"):
        (package / "Sources/M" / name).parent.mkdir(parents=True, exist_ok=True)
        (package / "Sources/M" / name).write_text(name)
    target = Target(
        name="M",
        type="regular",
        resources=(("process", "Data"), ("copy", "Assets/x"), ("copy", "one.txt"), ("embedInCode", "inline.bin")),
    )
    placed = {f: bundle_path(package, target, f"Sources/M/{f}") for f in ("Data/a.json", "Data/deep/b.txt")}
    assert placed == {"Data/a.json": "a.json", "Data/deep/b.txt": "b.txt"}  # .process flattens
    assert bundle_path(package, target, "Sources/M/Assets/x/y.png") == "x/y.png"  # .copy keeps the directory
    assert bundle_path(package, target, "Sources/M/one.txt") == "one.txt"
    assert bundle_path(package, target, "Sources/M/inline.bin") is None  # no bundle: code


def test_a_system_library_target_is_its_module_map_over_its_headers(tmp_path: Path) -> None:
    # swift-async-algorithms' _CAsyncSequenceValidationSupport: `.systemLibrary` as a header-only C module
    root = tree(
        tmp_path / "p",
        {
            "Package.swift": "",
            "Sources/CSys/module.modulemap": 'module CSys [system] {\n  header "CSys.h"\n}\n',
            "Sources/CSys/CSys.h": "",
            "Sources/CXml/module.modulemap": "",
            "Sources/CXml/shim.h": "",
            "Sources/CNoMap/x.h": "",
            "Sources/S/s.swift": "",
        },
    )
    deps = [{"byName": [n, None]} for n in ("CSys", "CXml", "CNoMap")]
    data = dump(
        "P",
        [
            target("CSys", "system"),
            target("CXml", "system", pkgConfig="libxml-2.0"),
            target("CNoMap", "system"),
            target("S", deps=deps),
        ],
    )
    result = plan_import(root, root_data=data)
    text = build_text(result, root)
    module = rule_of(text, "CSys")
    assert module.startswith("swift_c_module(") and 'module_map = "Sources/CSys/module.modulemap"' in module
    assert 'deps = [":CSys_cc"]' in module
    library = rule_of(text, "CSys_cc")
    assert 'hdrs = ["Sources/CSys/CSys.h"]' in library and "srcs" not in library
    assert 'deps = [\n        ":CSys",\n        ":CXml",\n    ]' in rule_of(text, "S")
    assert [u.line() for u in result.untranslated] == [
        "p/CXml: pkgConfig 'libxml-2.0': its flags not translated (the system's default paths used)",
        "p/CNoMap: system library target without Sources/CNoMap/module.modulemap: not translated",
        "p/S: dependency on CNoMap, which is not translated: dropped",
    ]


def test_a_test_file_left_out_of_data_is_reported(tmp_path: Path) -> None:
    # swift-nio's NIOFSIntegrationTests exclude "Test Data", which Bazel 4's runfiles cannot carry
    root = tree(
        tmp_path / "p",
        {"Package.swift": "", "Tests/T/t.swift": "", "Tests/T/Test Data/a.txt": "", "Tests/T/Test Data/b.txt": ""},
    )
    result = plan_import(root, root_data=dump("P", [target("T", "test", exclude=["Test Data"])]))
    assert "data" not in rule_of(build_text(result, root), "T")
    assert [u.line() for u in result.untranslated] == [
        "p/T: excluded file 'Tests/T/Test Data/a.txt' and 1 more: not expressible as a runfile (or in a Bazel "
        "package of its own): not in the test's data"
    ]


def test_a_resource_with_a_space_is_in_the_bundle_not_in_the_runfiles(tmp_path: Path) -> None:
    # swift-certificates' X509Tests: `.copy("CSR Vectors/")` read through Bundle.module
    root = tree(tmp_path / "p", {"Package.swift": "", "Tests/T/t.swift": "", "Tests/T/CSR Vectors/a.pem": ""})
    resources = [{"path": "CSR Vectors", "rule": {"copy": {}}}]
    result = plan_import(root, root_data=dump("P", [target("T", "test", resources=resources)]))
    rule = rule_of(build_text(result, root), "T")
    assert 'resources = {\n        "Tests/T/CSR Vectors/a.pem": "CSR Vectors/a.pem",\n    },' in rule
    assert "data" not in rule
    assert [u.line() for u in result.untranslated] == [
        "p/T: resource 'Tests/T/CSR Vectors/a.pem': in the bundle only, not in the runfiles (`data`): Bazel 4's "
        "runfiles manifest cannot hold a space"
    ]
