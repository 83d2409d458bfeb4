"""The swift_test runner generator (rules/private/swift_test_discovery.py): which XCTest cases it finds in a
symbol graph, and, with a real swiftc, that the runner it writes runs both test libraries and fails when
either does."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ..support.swift import NO_SWIFTC, SWIFTC

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("discovery", REPO / "rules" / "private" / "swift_test_discovery.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _symbol(precise: str, kind: str, path: list[str], declaration: str = "") -> dict[str, object]:
    return {
        "identifier": {"precise": precise},
        "kind": {"identifier": kind},
        "pathComponents": path,
        "declarationFragments": [{"spelling": declaration}],
    }


def test_discovers_subclasses_through_a_base_class_and_async_methods(tmp_path: Path) -> None:
    discovery = _load()
    graph = {
        "symbols": [
            _symbol("base", "swift.class", ["Base"]),
            _symbol("derived", "swift.class", ["Derived"]),
            _symbol("plain", "swift.class", ["Plain"]),
            _symbol("d.sync", "swift.method", ["Derived", "testSync()"], "func testSync()"),
            _symbol("d.async", "swift.method", ["Derived", "testAsync()"], "func testAsync() async throws"),
            _symbol("d.helper", "swift.method", ["Derived", "helper()"], "func helper()"),
            _symbol("d.param", "swift.method", ["Derived", "testWith(_:)"], "func testWith(_ x: Int)"),
            _symbol("d.static", "swift.type.method", ["Derived", "testStatic()"], "static func testStatic()"),
            _symbol("p.test", "swift.method", ["Plain", "testNotXCTest()"], "func testNotXCTest()"),
        ],
        "relationships": [
            {"kind": "inheritsFrom", "source": "base", "target": "s:6XCTest0A4CaseC"},
            {"kind": "inheritsFrom", "source": "derived", "target": "base"},
            *[
                {"kind": "memberOf", "source": s, "target": "derived"}
                for s in ("d.sync", "d.async", "d.helper", "d.param", "d.static")
            ],
            {"kind": "memberOf", "source": "p.test", "target": "plain"},
        ],
    }
    (tmp_path / "M.symbols.json").write_text(json.dumps(graph))
    classes = discovery.discover(tmp_path)
    assert [(c.path, c.methods) for c in classes] == [(["Derived"], [("testAsync", True), ("testSync", False)])]
    source = discovery.render("M", classes)
    assert '("testAsync", asyncTest(testAsync))' in source and '("testSync", testSync)' in source
    assert "@testable import M" in source and "testCase(Derived.__treematAllTests0)" in source
    assert "let entries" in source and "var entries" not in source  # never mutated: a warning in every build


@pytest.mark.swift
@pytest.mark.skipif(SWIFTC is None, reason=NO_SWIFTC)
@pytest.mark.parametrize("failing", ["none", "xctest", "swift-testing"])
def test_generated_runner_runs_both_libraries_and_fails_when_either_fails(tmp_path: Path, failing: str) -> None:
    assert SWIFTC
    discovery = _load()
    source = tmp_path / "T.swift"
    source.write_text(
        "import Foundation\nimport XCTest\nimport Testing\n"
        "final class Cases: XCTestCase {\n"
        "    func testOne() { XCTAssertEqual(1, 1) }\n"
        f"    func testTwo() async {{ XCTAssertEqual(2, {3 if failing == 'xctest' else 2}) }}\n"
        # swift-argument-parser's AsyncCommandEndToEndTests: waits for the main queue (hung under an async main)
        "    @MainActor func testOnMain() async { await Task.yield(); XCTAssertTrue(Thread.isMainThread) }\n"
        "}\n"
        f"@Test func swiftTesting() {{ #expect(1 == {0 if failing == 'swift-testing' else 1}) }}\n"
        "@Test @MainActor func swiftTestingOnMain() async { await Task.yield(); #expect(Thread.isMainThread) }\n"
    )
    graphs = tmp_path / "graphs"
    common = ["-parse-as-library", "-wmo", "-num-threads", "0", "-module-cache-path", str(tmp_path / "mc")]
    subprocess.run(
        [SWIFTC, "-module-name", "T", *common, "-enable-testing", "-emit-module", "-emit-module-path",
         str(tmp_path / "T.swiftmodule"), "-emit-symbol-graph", "-emit-symbol-graph-dir", str(graphs),
         "-symbol-graph-minimum-access-level", "internal", "-c", "-o", str(tmp_path / "T.o"), str(source)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    runner = tmp_path / "runner" / "main.swift"
    assert discovery.main(["--module", "T", "--symbol-graph-dir", str(graphs), "--output", str(runner)]) == 0
    compiled = subprocess.run(
        [SWIFTC, "-module-name", "Runner", *common, "-I", str(tmp_path), "-c", "-o", str(tmp_path / "R.o"),
         str(runner)],
        check=True, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert "warning:" not in compiled.stdout + compiled.stderr  # the runner compiles without a warning
    subprocess.run([SWIFTC, "-o", str(tmp_path / "t"), str(tmp_path / "T.o"), str(tmp_path / "R.o")], check=True)
    run = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    output = run.stdout + run.stderr
    assert "Test Case 'Cases.testOne' passed" in output and "Test Case 'Cases.testOnMain' passed" in output
    assert "Test swiftTestingOnMain() passed" in output
    assert ("Test Case 'Cases.testTwo' failed" in output) == (failing == "xctest")
    assert "Test swiftTesting()" in output, "Swift Testing ran"
    assert (run.returncode != 0) == (failing != "none"), output
    if failing != "xctest":
        return
    # Bazel's --test_filter, as `swift test --filter`: `Class/testMethod` runs that case (it ran none, and passed)
    for selection, ran in (("Cases/testOne", ["testOne"]), ("T.Cases/testT", ["testTwo"]), ("Cases", None)):
        env = {**os.environ, "TESTBRIDGE_TEST_ONLY": selection}
        run = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
        output = run.stdout + run.stderr
        expected = ran or ["testOne", "testOnMain", "testTwo"]
        assert [
            m for m in ("testOne", "testOnMain", "testTwo") if f"Test Case 'Cases.{m}' started" in output
        ] == expected
        assert (run.returncode != 0) == ("testTwo" in expected), output


@pytest.mark.swift
@pytest.mark.skipif(SWIFTC is None, reason="no swiftc on PATH or under /opt/swift")
def test_compile_mode_compiles_discovers_and_leaves_no_symbol_graph(tmp_path: Path) -> None:
    """swift_test's form: the test module's swiftc command line after `--`; the symbol graph goes to a private
    temporary directory (its relationship order varies and it names absolute paths), the runner to --output."""
    assert SWIFTC
    discovery = _load()
    work = tmp_path / "work"
    work.mkdir()
    (work / "T.swift").write_text(
        "import XCTest\nfinal class Cases: XCTestCase {\n    func testOne() {}\n    func testTwo() async {}\n}\n"
    )
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    runner = work / "runner" / "main.swift"
    compile_argv = [SWIFTC, "-module-name", "T", "-parse-as-library", "-wmo", "-num-threads", "0",
                    "-module-cache-path", str(tmp_path / "mc"), "-enable-testing", "-emit-module", "-emit-module-path",
                    str(work / "T.swiftmodule"), "-avoid-emit-module-source-info", "-c", "-o", str(work / "T.o"),
                    str(work / "T.swift")]  # fmt: skip
    old_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(temporary)
    try:
        status = discovery.main(["--module", "T", "--output", str(runner), "--", *compile_argv])
    finally:
        if old_tmpdir is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = old_tmpdir
    assert status == 0
    source = runner.read_text()
    assert '("testOne", testOne)' in source and '("testTwo", asyncTest(testTwo))' in source
    assert sorted(p.name for p in work.iterdir()) == ["T.o", "T.swift", "T.swiftdoc", "T.swiftmodule", "runner"]
    assert list(temporary.iterdir()) == [], "the symbol graph directory is removed"

    # A failing compile fails the action with swiftc's status, and writes no runner.
    (work / "T.swift").write_text("this is not Swift\n")
    runner.unlink()
    assert discovery.main(["--module", "T", "--output", str(runner), "--", *compile_argv]) != 0
    assert not runner.exists()


@pytest.mark.swift
@pytest.mark.skipif(SWIFTC is None, reason=NO_SWIFTC)
def test_cases_whose_base_class_is_in_another_module_run(tmp_path: Path) -> None:
    """swift-collections: `final class DequeTests: CollectionTestCase`, the base an XCTestCase of the module
    _CollectionsTestSupport; the test module's symbol graph does not say what the base derives from. A class
    on a base of another module that is not an XCTestCase is left out (and the runner still compiles)."""
    assert SWIFTC
    discovery = _load()
    common = ["-parse-as-library", "-wmo", "-num-threads", "0", "-module-cache-path", str(tmp_path / "mc")]
    (tmp_path / "Support.swift").write_text(
        "import XCTest\nopen class SupportCase: XCTestCase {}\nopen class NotACase { public init() {} }\n"
    )
    subprocess.run(
        [SWIFTC, "-module-name", "Support", *common, "-emit-module", "-emit-module-path",
         str(tmp_path / "Support.swiftmodule"), "-c", "-o", str(tmp_path / "S.o"), str(tmp_path / "Support.swift")],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (tmp_path / "T.swift").write_text(
        "import XCTest\nimport Support\n"
        "final class Derived: SupportCase {\n    func testSync() {}\n    func testAsync() async {}\n}\n"
        "final class Plain: NotACase {\n    func testNotXCTest() {}\n}\n"
    )
    runner = tmp_path / "runner" / "main.swift"
    compile_argv = [SWIFTC, "-module-name", "T", *common, "-I", str(tmp_path), "-enable-testing", "-emit-module",
                    "-emit-module-path", str(tmp_path / "T.swiftmodule"), "-c", "-o", str(tmp_path / "T.o"),
                    str(tmp_path / "T.swift")]  # fmt: skip
    assert discovery.main(["--module", "T", "--output", str(runner), "--", *compile_argv]) == 0
    subprocess.run(
        [SWIFTC, "-module-name", "Runner", *common, "-I", str(tmp_path), "-c", "-o", str(tmp_path / "R.o"),
         str(runner)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    objects = [str(tmp_path / n) for n in ("S.o", "T.o", "R.o")]
    subprocess.run([SWIFTC, "-o", str(tmp_path / "t"), *objects], check=True)
    run = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Test Case 'Derived.testSync' passed" in output and "Test Case 'Derived.testAsync' passed" in output
    assert "Executed 2 tests" in output and "testNotXCTest" not in output
