"""The consumer workspace the adoption end-to-end test builds: its BUILD file and its Swift sources
(a library, an app, XCTest and swift-testing targets, one deliberate failure each).
"""

from __future__ import annotations

BUILD = """\
load("@treemat//rules:defs.bzl", "swift_binary", "swift_library", "swift_test", "treemat_run")
load("//:count.bzl", "count_words")

sh_binary(
    name = "upper",
    srcs = ["upper.sh"],
)

# skylib run_binary style: $(location) over srcs, outs and tool.
treemat_run(
    name = "shout",
    srcs = ["words.txt"],
    outs = ["shout.txt"],
    args = ["$(location words.txt)", "$(location shout.txt)"],
    tool = ":upper",
)

# A user's own rule routing its action through treemat_action.
count_words(
    name = "count",
    src = "words.txt",
)

swift_library(
    name = "Greeting",
    srcs = ["Sources/Greeting/Greeting.swift", "Sources/Greeting/CAbs.swift"],
    copts = ["-enable-experimental-feature", "Extern"],
    defines = ["LOUD"],
    swift_version = "6",
)

swift_library(
    name = "Banner",
    srcs = ["Sources/Banner/Banner.swift"],
    deps = [":Greeting"],
)

swift_binary(
    name = "greet",
    srcs = ["Sources/greet/Greet.swift", "Sources/greet/Options.swift"],
    deps = [":Banner", ":Greeting"],
)

swift_test(
    name = "XCTestCases",
    srcs = ["Tests/XCTestCases/GreetingXCTests.swift"],
    deps = [":Greeting"],
)

swift_test(
    name = "SwiftTestingCases",
    srcs = ["Tests/SwiftTestingCases/GreetingTests.swift"],
    deps = [":Banner", ":Greeting"],
)
"""

SOURCES = {
    "words.txt": "staged by treemat\n",
    "upper.sh": """\
        #!/bin/sh
        tr a-z A-Z < "$1" > "$2"
        """,
    "count.bzl": """\
        load("@treemat//rules:defs.bzl", "TREEMAT_ATTRS", "treemat_action")

        def _count_words_impl(ctx):
            out = ctx.actions.declare_file(ctx.label.name + ".txt")
            treemat_action(
                ctx,
                mnemonic = "TreematRun",
                executable = "/bin/sh",
                arguments = ["-c", 'wc -w < "$1" > "$2"', "count", ctx.file.src.path, out.path],
                inputs = [ctx.file.src],
                outputs = [out],
            )
            return [DefaultInfo(files = depset([out]))]

        count_words = rule(
            implementation = _count_words_impl,
            attrs = dict(TREEMAT_ATTRS, src = attr.label(allow_single_file = True)),
        )
        """,
    "Sources/Greeting/Greeting.swift": """\
        public struct Greeting: Sendable {
            public let name: String
            public init(name: String) { self.name = name }

            public var text: String {
                #if LOUD
                return "HELLO, \\(name.uppercased())!"
                #else
                return "Hello, \\(name)."
                #endif
            }

            /// Visible in every module of this Bazel repository (the default package name), not outside it.
            package var width: Int { Int(cAbs(Int32(-text.count))) }
        }
        """,
    "Sources/Greeting/CAbs.swift": """\
        // Needs -enable-experimental-feature Extern (copts).
        @_extern(c, "abs")
        func cAbs(_ value: Int32) -> Int32
        """,
    "Sources/Banner/Banner.swift": """\
        import Greeting

        public func banner(_ greeting: Greeting) -> String {
            let rule = String(repeating: "=", count: greeting.width)  // `package` member of another module
            return "\\(rule)\\n\\(greeting.text)\\n\\(rule)"
        }
        """,
    "Sources/greet/Greet.swift": """\
        import Banner
        import Greeting

        @main
        struct Greet {
            static func main() {
                let options = Options(CommandLine.arguments.dropFirst())
                print(banner(Greeting(name: options.name)))
            }
        }
        """,
    "Sources/greet/Options.swift": """\
        struct Options {
            var name = "world"
            init<S: Sequence>(_ arguments: S) where S.Element == String {
                if let first = arguments.first(where: { _ in true }) { name = first }
            }
        }
        """,
    "Tests/XCTestCases/GreetingXCTests.swift": """\
        import XCTest
        import Greeting

        final class GreetingXCTests: XCTestCase {
            func testPasses() {
                XCTAssertEqual(Greeting(name: "ada").text, "HELLO, ADA!")
            }

            func testFailsOnPurpose() async {
                XCTAssertEqual(Greeting(name: "ada").text, "hello, ada", "deliberate failure")
            }
        }
        """,
    "Tests/SwiftTestingCases/GreetingTests.swift": """\
        import Testing
        import Banner
        import Greeting

        @Test func bannerPasses() {
            #expect(banner(Greeting(name: "x")).hasPrefix("=========\\n"))
        }

        @Test func bannerFailsOnPurpose() {
            #expect(Greeting(name: "x").width == 1, "deliberate failure")
        }
        """,
}
