"""C interop end to end: Swift with C (and C++) modules across three repositories, with real Bazel and swiftc.

A fresh workspace set up as docs/bazel.md says (`local_repository(treemat)` + `treemat_dependencies()`, the
documented .bazelrc block) depends on two more local repositories, made for the test in the shape of real
Swift packages with C targets:

- `@numerics`: a C target with its own module map (`include/module.modulemap`, as SwiftPM C targets have it),
  declared with `swift_c_module`; `RealModule` imports it; `ComplexModule` uses `RealModule`'s `package` API
  (one repository, one package);
- `@algorithms`: `Algorithms` imports `@numerics`'s modules and a C++ `cc_library` whose module map is
  generated (its module name derived from its label); a module that uses `RealModule`'s `package` API from
  this other repository must not compile;
- the main workspace: `stats` (a binary importing only `Algorithms`: the C modules two repositories down reach
  its compile) and `AlgorithmsTests`, an XCTest suite calling the C code directly.

`bazel test //...` passes on the worker (Bazel's default order, and `--config=treemat`), with
`--spawn_strategy=local` and with `--spawn_strategy=sandboxed`, and every file the builds declare (bazel-bin
of all three repositories: Swift and C objects, archives, .swiftmodule/.swiftdoc, module maps, the generated
test runner, executables) is byte-identical across them. A header a cc_library does not declare compiles
under `local` (the execroot has the whole source tree) and fails on the worker and in Bazel's sandbox.

Inside tools/bazel7.sh's chroot (TREEMAT_BAZEL7_CHROOT set) the same runs on Bazel 7.7.1 in WORKSPACE mode.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..support.bazel import run_bazel

REPO = Path(__file__).resolve().parents[2]
SWIFTC = shutil.which("swiftc") or ("/opt/swift/usr/bin/swiftc" if Path("/opt/swift/usr/bin/swiftc").exists() else None)
MNEMONICS = ("SwiftCompile", "SwiftLink", "TreematRun")
IN_BAZEL7_CHROOT = bool(os.environ.get("TREEMAT_BAZEL7_CHROOT"))

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.swift,
    pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (tools/setup.sh installs it)"),
    pytest.mark.skipif(SWIFTC is None, reason="no swiftc on PATH or under /opt/swift"),
]

NUMERICS = {
    "WORKSPACE": 'workspace(name = "numerics")\n',
    "BUILD.bazel": """\
        load("@treemat//rules:defs.bzl", "swift_c_module", "swift_library")

        package(default_visibility = ["//visibility:public"])

        cc_library(
            name = "NumericsShims_c",
            srcs = ["Sources/_NumericsShims/newton.c"],
            hdrs = ["Sources/_NumericsShims/include/_NumericsShims.h"],
            defines = ["NUMERICS_NEWTON_STEPS=32"],
            includes = ["Sources/_NumericsShims/include"],
            linkopts = ["-lm"],
        )

        # The package's own module map, as a SwiftPM C target ships it.
        swift_c_module(
            name = "_NumericsShims",
            module_map = "Sources/_NumericsShims/include/module.modulemap",
            deps = [":NumericsShims_c"],
        )

        swift_library(
            name = "RealModule",
            srcs = ["Sources/RealModule/Real.swift"],
            deps = [":_NumericsShims"],
        )

        swift_library(
            name = "ComplexModule",
            srcs = ["Sources/ComplexModule/Complex.swift"],
            deps = [":RealModule"],
        )
        """,
    "Sources/_NumericsShims/include/module.modulemap": """\
        module _NumericsShims {
            header "_NumericsShims.h"
            export *
        }
        """,
    "Sources/_NumericsShims/include/_NumericsShims.h": """\
        #include <math.h>

        #ifndef NUMERICS_NEWTON_STEPS
        #error "NUMERICS_NEWTON_STEPS is a define of the library: it reaches every compile of this header"
        #endif

        static inline double _numerics_hypot(double x, double y) { return hypot(x, y); }

        /// Square root by NUMERICS_NEWTON_STEPS Newton steps.
        double numerics_sqrt_newton(double x);

        static const int numerics_newton_steps = NUMERICS_NEWTON_STEPS;
        """,
    "Sources/_NumericsShims/newton.c": """\
        #include "_NumericsShims.h"

        double numerics_sqrt_newton(double x) {
            if (x <= 0) return 0;
            double guess = x > 1 ? x : 1;
            for (int i = 0; i < NUMERICS_NEWTON_STEPS; i++) guess = (guess + x / guess) / 2;
            return guess;
        }
        """,
    "Sources/RealModule/Real.swift": """\
        import _NumericsShims

        public enum Real {
            public static func hypot(_ x: Double, _ y: Double) -> Double { _numerics_hypot(x, y) }
            public static func sqrt(_ x: Double) -> Double { numerics_sqrt_newton(x) }

            /// For the modules of this package (repository) only.
            package static var unitRoundoff: Double { Double.ulpOfOne / 2 }
        }
        """,
    "Sources/ComplexModule/Complex.swift": """\
        import RealModule

        public struct Complex: Equatable {
            public var real: Double
            public var imaginary: Double
            public init(_ real: Double, _ imaginary: Double) { (self.real, self.imaginary) = (real, imaginary) }
            public var length: Double { Real.hypot(real, imaginary) }
            public func isClose(to other: Complex) -> Bool {
                Real.hypot(real - other.real, imaginary - other.imaginary) <= 4 * Real.unitRoundoff * length
            }
        }
        """,
}

ALGORITHMS = {
    "WORKSPACE": 'workspace(name = "algorithms")\n',
    "BUILD.bazel": """\
        load("@treemat//rules:defs.bzl", "swift_library")

        package(default_visibility = ["//visibility:public"])

        swift_library(
            name = "Algorithms",
            srcs = ["Sources/Algorithms/Algorithms.swift"],
            deps = [
                "//kernels:ckernels",
                "@numerics//:ComplexModule",
                "@numerics//:RealModule",
            ],
        )

        # `package` API of another repository (another Swift package): must not compile.
        swift_library(
            name = "PackageLeak",
            srcs = ["Sources/PackageLeak/Leak.swift"],
            tags = ["manual"],
            deps = ["@numerics//:RealModule"],
        )
        """,
    "kernels/BUILD.bazel": """\
        # A C++ library with a C interface; no swift_module tag: Swift imports it as kernels_ckernels. Its header
        # is included as <ckernels/kernels.h> (a _virtual_includes copy, which the module map must name).
        cc_library(
            name = "ckernels",
            srcs = ["dot.cc"],
            hdrs = ["include/kernels.h"],
            include_prefix = "ckernels",
            strip_include_prefix = "include",
            visibility = ["//visibility:public"],
        )
        """,
    "kernels/include/kernels.h": """\
        #include <stddef.h>
        #ifdef __cplusplus
        extern "C" {
        #endif
        double kernels_dot(const double *a, const double *b, size_t count);
        #ifdef __cplusplus
        }
        #endif
        """,
    "kernels/dot.cc": """\
        #include <ckernels/kernels.h>
        #include <numeric>
        #include <vector>

        extern "C" double kernels_dot(const double *a, const double *b, size_t count) {
            std::vector<double> left(a, a + count), right(b, b + count);
            return std::inner_product(left.begin(), left.end(), right.begin(), 0.0);
        }
        """,
    "Sources/Algorithms/Algorithms.swift": """\
        import ComplexModule
        import RealModule
        import kernels_ckernels

        public func norm(_ vector: [Double]) -> Double {
            Real.sqrt(vector.withUnsafeBufferPointer { kernels_dot($0.baseAddress, $0.baseAddress, $0.count) })
        }

        public func farthest(_ points: [Complex]) -> Complex? {
            points.max { $0.length < $1.length }
        }
        """,
    "Sources/PackageLeak/Leak.swift": """\
        import RealModule

        public let leaked = Real.unitRoundoff
        """,
}

MAIN = {
    "BUILD.bazel": """\
        load("@treemat//rules:defs.bzl", "swift_binary", "swift_library", "swift_test")

        # Imports only Algorithms: _NumericsShims and kernels_ckernels are two repositories down.
        swift_binary(
            name = "stats",
            srcs = ["Sources/stats/main.swift"],
            deps = ["@algorithms//:Algorithms"],
        )

        swift_test(
            name = "AlgorithmsTests",
            srcs = ["Tests/AlgorithmsTests/AlgorithmsTests.swift"],
            deps = [
                "@algorithms//:Algorithms",
                "@numerics//:ComplexModule",
                "@numerics//:_NumericsShims",
            ],
        )

        # leaky.h includes a header that is in the source tree but declared by no target.
        cc_library(
            name = "leaky",
            hdrs = ["leaky/leaky.h"],
            tags = ["manual"],
        )

        swift_library(
            name = "UsesLeaky",
            srcs = ["Sources/UsesLeaky/UsesLeaky.swift"],
            tags = ["manual"],
            deps = [":leaky"],
        )

        # The same compile under another name, built with `local` (whose success must not be a cache hit for
        # the worker and sandboxed builds of UsesLeaky).
        swift_library(
            name = "UsesLeakyLocally",
            srcs = ["Sources/UsesLeaky/UsesLeaky.swift"],
            tags = ["manual"],
            deps = [":leaky"],
        )
        """,
    "Sources/stats/main.swift": """\
        import Algorithms

        print("norm:", norm([3, 4, 12]))
        """,
    "Tests/AlgorithmsTests/AlgorithmsTests.swift": """\
        import _NumericsShims
        import Algorithms
        import ComplexModule
        import XCTest

        final class AlgorithmsTests: XCTestCase {
            func testNormThroughCxxAndC() {
                XCTAssertEqual(norm([3, 4, 12]), 13, accuracy: 1e-12)
            }

            func testCallsTheCModuleDirectly() {
                XCTAssertEqual(_numerics_hypot(5, 12), 13)
                XCTAssertEqual(numerics_sqrt_newton(2) * numerics_sqrt_newton(2), 2, accuracy: 1e-12)
                XCTAssertEqual(numerics_newton_steps, 32)  // the library's define reached swiftc's clang
            }

            func testFarthest() async {
                XCTAssertEqual(farthest([Complex(1, 1), Complex(-3, 4), Complex(0, 2)]), Complex(-3, 4))
            }
        }
        """,
    "leaky/leaky.h": '#include "leaky/undeclared.h"\n',
    "leaky/undeclared.h": "static inline int leaky_value(void) { return 7; }\n",
    "Sources/UsesLeaky/UsesLeaky.swift": """\
        import leaky

        public let value = leaky_value()
        """,
}


def _doc_block(heading: str) -> str:
    """The first fenced code block after `### heading` in docs/bazel.md."""
    text = (REPO / "docs" / "bazel.md").read_text()
    match = re.search(rf"^### {re.escape(heading)}\n.*?^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    assert match, f"docs/bazel.md has no code block under '### {heading}'"
    return match.group(1)


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))


@dataclass
class Workspace:
    path: Path
    output_base: Path
    env: dict[str, str]

    def bazel(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_bazel(self.path, self.output_base, *args, env=self.env, timeout=900, check=check)

    def declared_outputs(self) -> dict[str, str]:
        """sha256 of every file under bazel-bin (this repository's and the external ones'), runfiles aside."""
        bin_dir = Path(self.bazel("info", "bazel-bin").stdout.strip())
        digests = {}
        for path in sorted(bin_dir.rglob("*")):
            relative = path.relative_to(bin_dir)
            if any(part.endswith((".runfiles", ".runfiles_manifest")) for part in relative.parts):
                continue
            if path.is_file() and not path.is_symlink():
                digests[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    base = tmp_path_factory.mktemp("cinterop")
    _write_tree(base / "numerics", NUMERICS)
    _write_tree(base / "algorithms", ALGORITHMS)
    main = base / "main"
    _write_tree(main, MAIN)
    workspace_file = 'workspace(name = "main")\n\n' + _doc_block("WORKSPACE").replace("/path/to/treemat", str(REPO))
    for name in ("numerics", "algorithms"):
        workspace_file += f'\nlocal_repository(name = "{name}", path = "{base / name}")\n'
    (main / "WORKSPACE").write_text(workspace_file)
    root = base / "treemat-root"
    roots = "".join(f"build --worker_extra_flag={m}=--root={root}\n" for m in MNEMONICS)
    flavor = "common --noenable_bzlmod\n" if IN_BAZEL7_CHROOT else ""
    (main / ".bazelrc").write_text("build --nosandbox_debug\n" + _doc_block(".bazelrc") + roots + flavor)
    ws = Workspace(main, base / "output_base", dict(os.environ))
    try:
        yield ws
    finally:
        ws.bazel("shutdown", check=False)


STRATEGIES = {
    "worker": ["--config=treemat"],
    "local": ["--spawn_strategy=local"],
    "sandboxed": ["--spawn_strategy=sandboxed"],
}


@pytest.fixture(scope="module")
def builds(workspace: Workspace) -> dict[str, dict[str, str]]:
    """A clean `bazel test //...` per strategy; the declared outputs of each."""
    results = {}
    for name, flags in STRATEGIES.items():
        workspace.bazel("clean")
        run = workspace.bazel("test", *flags, "//...", check=False)
        assert run.returncode == 0, f"bazel test {flags} failed:\n{run.stderr[-6000:]}"
        testlogs = Path(workspace.bazel("info", "bazel-testlogs").stdout.strip())
        log = (testlogs / "AlgorithmsTests" / "test.log").read_text()
        for case in ("testNormThroughCxxAndC", "testCallsTheCModuleDirectly", "testFarthest"):
            assert f"Test Case 'AlgorithmsTests.{case}' passed" in log, log
        results[name] = workspace.declared_outputs()
    return results


def test_binary_two_repositories_above_the_c_modules_runs(
    workspace: Workspace, builds: dict[str, dict[str, str]]
) -> None:
    bin_dir = Path(workspace.bazel("info", "bazel-bin").stdout.strip())
    run = subprocess.run([str(bin_dir / "stats")], capture_output=True, text=True, check=True)
    assert run.stdout == "norm: 13.0\n"


def test_declared_outputs_byte_identical_across_strategies(builds: dict[str, dict[str, str]]) -> None:
    worker = builds["worker"]
    wanted = [
        "stats",
        "AlgorithmsTests",
        "AlgorithmsTests_runner/main.swift",
        "AlgorithmsTests_objs/AlgorithmsTests.autolink",
        "stats_objs/stats.autolink",
        "AlgorithmsTests_runner/AlgorithmsTests_Runner.o",
        "AlgorithmsTests_module/AlgorithmsTests.swiftdoc",
        "external/numerics/RealModule_module/RealModule.swiftmodule",
        "external/numerics/RealModule_module/RealModule.swiftdoc",
        "external/algorithms/kernels/ckernels.swift.modulemap",
        "external/algorithms/kernels/libckernels.a",
        "external/numerics/libNumericsShims_c.a",
    ]
    absent = [name for name in wanted if name not in worker]
    assert not absent, f"not built: {absent} (have {sorted(worker)})"
    assert not [name for name in worker if name.endswith((".swiftsourceinfo", ".symbols.json"))], sorted(worker)
    for name in ("local", "sandboxed"):
        other = builds[name]
        only, missing = set(other) - set(worker), set(worker) - set(other)
        assert not only and not missing, f"{name}: only there {only}, missing {missing}"
        differing = [path for path in worker if other[path] != worker[path]]
        assert not differing, f"{name} outputs differ from the worker's: {differing}"


def test_generated_module_map_is_named_after_the_label(workspace: Workspace, builds: dict[str, dict[str, str]]) -> None:
    bin_dir = Path(workspace.bazel("info", "bazel-bin").stdout.strip())
    text = (bin_dir / "external/algorithms/kernels/ckernels.swift.modulemap").read_text()
    assert text.startswith('module "kernels_ckernels" {\n    export *\n'), text
    virtual = "external/algorithms/kernels/_virtual_includes/ckernels/ckernels/kernels.h"
    assert text.count("header ") == 1 and f'header "../../../../../../bazel-out/k8-fastbuild/bin/{virtual}"' in text, (
        text
    )


def test_package_access_stays_within_one_repository(workspace: Workspace, builds: dict[str, dict[str, str]]) -> None:
    # ComplexModule (same repository as RealModule) used `package` API above; another repository cannot.
    leak = workspace.bazel("build", "--config=treemat", "@algorithms//:PackageLeak", check=False)
    assert leak.returncode != 0
    assert "'unitRoundoff' is inaccessible due to 'package' protection level" in leak.stderr, leak.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["worker", "sandboxed"])
def test_an_undeclared_header_fails_where_inputs_are_staged(
    workspace: Workspace, builds: dict[str, dict[str, str]], strategy: str
) -> None:
    run = workspace.bazel("build", *STRATEGIES[strategy], "//:UsesLeaky", check=False)
    assert run.returncode != 0, f"{strategy}: a header no target declares must not be found"
    assert "'leaky/undeclared.h' file not found" in run.stderr, run.stderr[-3000:]


def test_an_undeclared_header_is_found_under_local(workspace: Workspace, builds: dict[str, dict[str, str]]) -> None:
    """What the two tests above guard against: `local` runs in the execroot, which has the whole source tree."""
    workspace.bazel("build", *STRATEGIES["local"], "//:UsesLeakyLocally")
