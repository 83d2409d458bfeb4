"""A rules_swift 3.x workspace, built three ways: rules_swift's own worker, treemat, Bazel's sandbox.

`treemat bench --rules-swift` and the e2e test (tests/e2e/test_rules_swift_e2e.py) generate the same
workspace: rules_swift 3.6.1 and its five offline fixtures (../shared/third_party/rules_swift-3.6.1/, extracted
under the workspace), a library, a chain of modules each importing the one below, a wide module with many
sources on top of the chain (hundreds of inputs per compile), a binary and a swift_test (without test
discovery: the discoverer's two dependencies are `#error` placeholders, see test_discoverer_placeholders). It
runs on Bazel 7.7.1 in WORKSPACE mode (tools/bazel7.sh's chroot). One line of the WORKSPACE picks the mode:
`local_repository` (rules_swift as it is) or `treemat_rules_swift` (rules/rules_swift.bzl).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from treemat.benchreport import BenchReport, BenchSample

FIXTURES = {  # tarball stem -> (repository name, directory inside the tarball)
    "bazel_skylib-1.7.1": ("bazel_skylib", "bazel_skylib"),
    "apple_support-1.23.1": ("build_bazel_apple_support", "apple_support"),
    "rules_cc-0.2.14": ("rules_cc", "rules_cc"),
    "bazel_features-v1.30.0": ("bazel_features", "bazel_features"),
    "rules_swift-3.6.1": ("build_bazel_rules_swift", "rules_swift"),
    "nlohmann_json-v3.6.1": ("com_github_nlohmann_json", "nlohmann_json"),
}
MODES = ("native", "treemat")
STRATEGIES = {  # strategy -> (WORKSPACE mode, Bazel flags)
    "rules_swift-worker": ("native", ["--strategy=SwiftCompile=worker"]),
    "treemat": ("treemat", ["--strategy=SwiftCompile=worker"]),
    "sandboxed": ("native", ["--strategy=SwiftCompile=sandboxed"]),
}
OUTPUT_MNEMONICS = "SwiftCompile|SwiftModuleWrap|SwiftAutolinkExtract|CppLink|CppArchive"
EDITED = "Wide/S000.swift"

_FEATURES_BZL = '''\
"""@bazel_features_version and @bazel_features_globals for Bazel 7.7.1: Debian's Bazel has no embedded
version (native.bazel_version is ""), so bazel_features would assume a newer one."""

load("@bazel_features//private:globals.bzl", "GLOBALS", "LEGACY_GLOBALS")
load("@bazel_features//private:parse.bzl", "parse_version")

_VERSION = "7.7.1"

def _version_impl(rctx):
    rctx.file("BUILD.bazel", 'exports_files(["version.bzl"])\\n')
    rctx.file("version.bzl", "version = '%s'\\n" % _VERSION)

def _globals_impl(rctx):
    v = parse_version(_VERSION)
    lines = ["globals = struct("]
    for g, since in GLOBALS.items():
        lines.append("    %s = %s," % (g, g if v >= parse_version(since) else "None"))
    for g, until in LEGACY_GLOBALS.items():
        value = g if v < parse_version(until) else "None"
        lines.append("    %s = getattr(getattr(native, 'legacy_globals', None), '%s', %s)," % (g, g, value))
    lines.append(")")
    rctx.file("BUILD.bazel", 'exports_files(["globals.bzl"])\\n')
    rctx.file("globals.bzl", "\\n".join(lines) + "\\n")

_version_repo = repository_rule(_version_impl)
_globals_repo = repository_rule(_globals_impl)

def bazel7_features():
    _version_repo(name = "bazel_features_version")
    _globals_repo(name = "bazel_features_globals")

# rules_swift's swift_test names //tools/test_discoverer (a private exec attribute), a swift_binary depending on
# these two: analysis needs the repositories, a build with `discover_tests = False` never builds them. Their one
# module fails to compile, loudly, if the discoverer is ever built by mistake.
_PLACEHOLDER_BUILD = """\\
load("@build_bazel_rules_swift//swift:swift_library.bzl", "swift_library")

swift_library(
    name = "{module}",
    srcs = ["Placeholder.swift"],
    module_name = "{module}",
    visibility = ["//visibility:public"],
)
"""

def _placeholder_impl(rctx):
    rctx.file("BUILD.bazel", _PLACEHOLDER_BUILD.format(module = rctx.attr.module))
    rctx.file("Placeholder.swift", '#error("placeholder: the test discoverer of rules_swift is not built offline")\\n')

_placeholder_repo = repository_rule(_placeholder_impl, attrs = {"module": attr.string()})

def test_discoverer_placeholders():
    _placeholder_repo(name = "com_github_apple_swift_argument_parser", module = "ArgumentParser")
    _placeholder_repo(name = "com_github_apple_swift_docc_symbolkit", module = "SymbolKit")
'''

_BAZELRC = """\
common --noenable_bzlmod
build --repo_env=CC=/opt/swift/usr/bin/clang
build --action_env=PATH=/opt/swift/usr/bin:/usr/bin:/bin
build --noshow_progress
"""


@dataclass(frozen=True, slots=True)
class Shape:
    """How big the generated workspace is."""

    chain: int = 32  # modules in the chain
    wide: int = 150  # sources of the wide module on top of it

    @property
    def modules(self) -> int:
        """Swift modules in the workspace (Lib, the chain, Wide, App, LibTests)."""
        return self.chain + 4


def extract_fixtures(tarballs: Path, into: Path) -> Path:
    """The six fixture tarballs of `tarballs` extracted under `into` (once); returns `into`."""
    for stem in FIXTURES:
        dest = into / stem
        if (dest / ".extracted").exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs / f"{stem}.tar.gz") as archive:
            archive.extractall(dest, filter="data")
        (dest / ".extracted").write_text("")
    return into


def mode_line(mode: str, rules_swift: str) -> str:
    """The one WORKSPACE line that differs: rules_swift as it is, or through treemat."""
    if mode == "native":
        return f'local_repository(name = "build_bazel_rules_swift", path = "{rules_swift}")  # rules_swift: native'
    return f'treemat_rules_swift(name = "build_bazel_rules_swift", path = "{rules_swift}")  # rules_swift: treemat'


def write_workspace(workspace: Path, fixtures: Path, treemat: Path, mode: str, shape: Shape) -> None:
    """The whole workspace in `mode` (native | treemat), sources included."""
    paths = {stem: fixtures / stem / inner for stem, (_name, inner) in FIXTURES.items()}
    lines = ['workspace(name = "rswift_bench")', ""]
    for stem, (name, _inner) in FIXTURES.items():
        if name == "build_bazel_rules_swift":
            continue
        if name == "com_github_nlohmann_json":
            lines.append(f'new_local_repository(name = "{name}", path = "{paths[stem]}", build_file = "//:json.BUILD")')
        else:
            lines.append(f'local_repository(name = "{name}", path = "{paths[stem]}")')
    lines += [
        'local_repository(name = "platforms", path = "/usr/share/bazel/tools/platforms")',
        'local_repository(name = "rules_python", path = "/usr/share/bazel/rules/python")',
        'local_repository(name = "rules_java", path = "/usr/share/bazel/rules/java")',
        f'local_repository(name = "treemat", path = "{treemat}")',
        "",
        'load("@treemat//rules:rules_swift.bzl", "treemat_rules_swift")',
        "",
        "# rules_swift: the one line below",
        mode_line(mode, str(paths["rules_swift-3.6.1"])),
        "",
        'load("//:features.bzl", "bazel7_features", "test_discoverer_placeholders")',
        "bazel7_features()",
        "test_discoverer_placeholders()  # before swift_rules_dependencies(), which then keeps them",
        'load("@bazel_features//:deps.bzl", "bazel_features_deps")',
        "bazel_features_deps()",
        'load("@build_bazel_rules_swift//swift:repositories.bzl", "swift_rules_dependencies")',
        "swift_rules_dependencies()",
        'load("@build_bazel_rules_swift//swift:extras.bzl", "swift_rules_extra_dependencies")',
        "swift_rules_extra_dependencies()",
        'load("@rules_cc//cc:extensions.bzl", "compatibility_proxy_repo")',
        "compatibility_proxy_repo()",
        'load("@treemat//rules:repositories.bzl", "treemat_dependencies")',
        "treemat_dependencies()",
    ]
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "WORKSPACE").write_text("\n".join(lines) + "\n")
    (workspace / "BUILD.bazel").write_text("")
    (workspace / "features.bzl").write_text(_FEATURES_BZL)
    overlay = paths["rules_swift-3.6.1"] / "third_party" / "com_github_nlohmann_json" / "BUILD.overlay"
    (workspace / "json.BUILD").write_text(overlay.read_text())
    (workspace / ".bazelrc").write_text(_BAZELRC)
    _write_sources(workspace, shape)


def set_mode(workspace: Path, mode: str) -> None:
    """Switch the WORKSPACE's one rules_swift line to `mode`."""
    text = (workspace / "WORKSPACE").read_text()
    path = re.search(r'path = "([^"]+)"\)  # rules_swift: ', text)
    assert path is not None, "not a workspace written by write_workspace"
    lines = [
        line for line in text.splitlines() if not line.endswith(("# rules_swift: native", "# rules_swift: treemat"))
    ]
    at = lines.index("# rules_swift: the one line below") + 1
    lines.insert(at, mode_line(mode, path.group(1)))
    (workspace / "WORKSPACE").write_text("\n".join(lines) + "\n")


def _library(name: str, srcs: list[str], deps: list[str]) -> str:
    return (
        f'swift_library(\n    name = "{name}",\n    srcs = {srcs!r},\n    module_name = "{name}",\n'
        f'    deps = {deps!r},\n    visibility = ["//visibility:public"],\n)\n'
    ).replace("'", '"')


_SWIFT_TEST_BUILD = """\
load("@build_bazel_rules_swift//swift:swift.bzl", "swift_test")

# Offline on Linux: no test discovery (it needs rules_swift's //tools/test_discoverer, which needs
# swift-argument-parser and swift-docc-symbolkit); main.swift runs the XCTest cases itself.
swift_test(
    name = "LibTests",
    srcs = ["main.swift"],
    discover_tests = False,
    deps = ["//Lib"],
)
"""
_SWIFT_TEST_MAIN = """\
import Lib
import XCTest

final class LibTests: XCTestCase {
    static let allTests = [("testGreeting", testGreeting), ("testCounter", testCounter)]

    func testGreeting() { XCTAssertEqual(greeting("test"), "hello, test") }

    func testCounter() {
        var counter = Counter()
        XCTAssertEqual(counter.bump(), 1)
        XCTAssertEqual(counter.bump(), 2)
    }
}

XCTMain([testCase(LibTests.allTests)])
"""


def _write_sources(workspace: Path, shape: Shape) -> None:
    load = 'load("@build_bazel_rules_swift//swift:swift.bzl", "swift_binary", "swift_library")\n\n'
    files: dict[str, str] = {
        "Lib/BUILD.bazel": load + _library("Lib", ["Greeting.swift", "Count.swift"], []),
        "Lib/Greeting.swift": 'public func greeting(_ name: String) -> String { "hello, \\(name)" }\n',
        "Lib/Count.swift": "public struct Counter { public var value = 0; public init() {}\n"
        "  public mutating func bump() -> Int { value += 1; return value } }\n",
    }
    below = "//Lib"
    for level in range(shape.chain):
        name = f"C{level:02d}"
        prev = "Lib" if level == 0 else f"C{level - 1:02d}"
        call = 'greeting("c")' if level == 0 else f"level{level - 1}()"
        files[f"{name}/BUILD.bazel"] = load + _library(name, ["A.swift", "B.swift"], [below])
        files[f"{name}/A.swift"] = f'import {prev}\npublic func level{level}() -> String {{ {call} + "{level}" }}\n'
        files[f"{name}/B.swift"] = f"public struct Box{level} {{ public let n = {level}; public init() {{}} }}\n"
        below = f"//{name}"
    top = f"C{shape.chain - 1:02d}" if shape.chain else "Lib"
    wide = [f"S{i:03d}.swift" for i in range(shape.wide)]
    files["Wide/BUILD.bazel"] = load + _library("Wide", wide, [below])
    for index, source in enumerate(wide):
        files[f"Wide/{source}"] = f"import {top}\npublic func wide{index}(_ x: Int) -> Int {{ x + {index} }}\n"
    files["App/BUILD.bazel"] = load + 'swift_binary(\n    name = "App",\n    srcs = ["main.swift"],\n'
    files["App/BUILD.bazel"] += '    deps = ["//Lib", "//Wide"],\n)\n'
    files["App/main.swift"] = 'import Lib\nimport Wide\nvar c = Counter()\nprint(greeting("app"), wide0(c.bump()))\n'
    files["LibTests/BUILD.bazel"] = _SWIFT_TEST_BUILD
    files["LibTests/main.swift"] = _SWIFT_TEST_MAIN
    for rel, text in files.items():
        path = workspace / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def edit_one_source(workspace: Path, generation: int) -> None:
    """Change one function body of the wide module (its interface stays): one source to recompile."""
    path = workspace / EDITED
    text = re.sub(r"x \+ \d+ \}", f"x + {1000 + generation} }}", path.read_text())
    path.write_text(text)


# ----------------------------------------------------------------------------------- running Bazel


def bazel(workspace: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """`bazel ARGS` in `workspace` (its own output base), output captured; raises with the tail on failure."""
    run = subprocess.run(["bazel", *args], cwd=workspace, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"bazel {' '.join(args)} failed:\n{run.stderr[-6000:]}")
    return run


def timed_build(workspace: Path, flags: list[str], targets: tuple[str, ...] = ("//...",)) -> float:
    """Seconds `bazel build` takes (the server already up)."""
    started = time.perf_counter()
    bazel(workspace, "build", *flags, *targets)
    return time.perf_counter() - started


def clean_for(workspace: Path, strategy: str) -> list[str]:
    """`bazel clean`, the WORKSPACE put in the strategy's mode and rules_swift's worker built; its flags."""
    mode, flags = STRATEGIES[strategy]
    set_mode(workspace, mode)
    bazel(workspace, "clean")
    bazel(workspace, "build", *flags, "@build_bazel_rules_swift//tools/worker")
    return flags


def declared_outputs(workspace: Path) -> dict[str, str]:
    """sha256 of every output built for the Swift, link and archive actions of //... (bazel-bin)."""
    query = bazel(workspace, "aquery", f'mnemonic("{OUTPUT_MNEMONICS}", //...)', "--output=text")
    paths = sorted(
        {p for line in re.findall(r"^\s*Outputs: \[(.*)\]", query.stdout, re.MULTILINE) for p in line.split(", ")}
    )
    execroot = Path(bazel(workspace, "info", "execution_root").stdout.strip())
    hashes: dict[str, str] = {}
    for raw in paths:
        rel = raw.removesuffix(" (TreeArtifact)")
        path = execroot / rel
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                hashes[str(child.relative_to(execroot))] = hashlib.sha256(child.read_bytes()).hexdigest()
        elif path.is_file():  # not every action is run for //... (a swift_binary's own archive is not)
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def run_rules_swift_bench(
    workspace: Path,
    *,
    rounds: int,
    strategies: tuple[str, ...] = tuple(STRATEGIES),
    progress: Callable[[str], None] = lambda _msg: None,
) -> BenchReport:
    """Clean build and edit-one-source rebuild of //... per strategy, `rounds` rounds (the order alternates)."""
    report = new_report()
    modules = len([p for p in workspace.iterdir() if (p / "BUILD.bazel").exists()])
    bazel(workspace, "build", *clean_for(workspace, strategies[0]), "//...")  # warm-up: server, fetches, analysis
    for round_index in range(rounds):
        order = strategies if round_index % 2 == 0 else tuple(reversed(strategies))
        for strategy in order:
            flags = clean_for(workspace, strategy)
            clean = timed_build(workspace, flags)
            edit_one_source(workspace, round_index * len(strategies) + order.index(strategy))
            edit = timed_build(workspace, flags)
            report.samples.append(BenchSample(strategy, modules, round_index, 1000 * clean))
            report.samples.append(BenchSample(strategy + "+edit", modules, round_index, 1000 * edit))
            progress(f"{strategy}: clean {clean:.1f} s, edit {edit:.1f} s")
    return report


def new_report(samples: list[BenchSample] | None = None) -> BenchReport:
    """An empty (or `samples`) report laid out for the rules_swift bench."""
    return BenchReport(
        samples=samples or [],
        bazel="7.7.1",
        metric="bazel build //... wall time",
        unit="modules",
        order=list(STRATEGIES),
        baselines=["rules_swift-worker", "sandboxed"],
        goals="goal: treemat no slower than rules_swift's own worker",
    )


def report_from_json(data: dict[str, object]) -> BenchReport:
    """The report `BenchReport.to_json` wrote (to draw its chart where matplotlib is, outside the chroot)."""
    samples = data.get("samples")
    assert isinstance(samples, list)
    return new_report([BenchSample(**sample) for sample in samples])
