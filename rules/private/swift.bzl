"""swift_library / swift_binary / swift_test over the registered Swift toolchain, staged through treemat.

Outputs are deterministic and independent of where the tool runs: each module is compiled whole-module
(`-wmo`) to one object at a fixed path (swiftc's own temp-file names would leak into the object), and
`-file-prefix-map {EXEC_ROOT}=.` strips the exec directory from debug info. swiftc's module cache goes to
`{TOOL_CACHE}`, which treemat keeps across actions. Every file swiftc writes is declared (the .swiftdoc beside
each .swiftmodule) or not written (`-avoid-emit-module-source-info`); a swift_test's symbol graph stays inside
its compile action.

The actions (the one argument builder for every compile, the link) are in swift_actions.bzl. C interop
(cc_interop.bzl): cc_library / swift_c_module targets in `deps` are clang modules; their transitive
compilation context reaches every compile, their libraries every link.
"""

load(":cc_interop.bzl", "clang_module_aspect")
load(":providers.bzl", "SwiftModuleInfo")
load(":resources.bzl", "RESOURCE_ATTRS", "resource_bundle")
load(":staged_action.bzl", "TREEMAT_ATTRS")
load(
    ":swift_actions.bzl",
    "PYTHON_TOOLCHAIN_TYPE",
    "compile",
    "compile_context",
    "link",
    "transitive_link_inputs",
    "transitive_linkopts",
)

SWIFT_TOOLCHAIN_TYPE = str(Label("//rules:swift_toolchain_type"))

# The one explanation of a missing swiftc: failed at analysis (swift.bzl) and printed at loading (defs.bzl).
NO_SWIFTC = ("treemat: no swiftc found (set SWIFTC, put swiftc on PATH, or install Swift under /opt/swift, " +
              "then `bazel sync --configure` or restart Bazel); cannot build {}")

def _toolchain(ctx):
    swift = ctx.toolchains[SWIFT_TOOLCHAIN_TYPE].swift
    if not swift.swiftc:
        fail(NO_SWIFTC.format(ctx.label))
    return swift

def _module_name(ctx):
    if ctx.attr.module_name:
        return ctx.attr.module_name
    name = ctx.label.name
    for char in ["-", ".", "/", "+"]:
        name = name.replace(char, "_")
    return name

def _runfiles(ctx, extra_files = []):
    runfiles = ctx.runfiles(files = ctx.files.data + extra_files)
    for target in ctx.attr.deps + ctx.attr.data:
        runfiles = runfiles.merge(target[DefaultInfo].default_runfiles)
    return runfiles

def _has_main_swift(ctx):
    return len([f for f in ctx.files.srcs if f.basename == "main.swift"]) > 0

def _enable_testing(ctx):
    # As SwiftPM and rules_swift do: `@testable import` works in debug builds, not in optimised ones.
    return ctx.var["COMPILATION_MODE"] != "opt"

def _sources(ctx, bundle):
    return ctx.files.srcs + ([bundle.accessor] if bundle.accessor else [])

def _swift_library_impl(ctx):
    swift = _toolchain(ctx)
    module_name = _module_name(ctx)
    context = compile_context(ctx)
    bundle = resource_bundle(ctx, module_name)
    object_file, swiftmodule, swiftdoc = compile(
        ctx,
        swift = swift,
        context = context,
        module_name = module_name,
        srcs = _sources(ctx, bundle),
        parse_as_library = True,
        enable_testing = _enable_testing(ctx),
        emit_module = True,
    )
    deps = context.deps
    return [
        DefaultInfo(files = depset([swiftmodule, object_file]), runfiles = _runfiles(ctx, bundle.files)),
        SwiftModuleInfo(
            module_name = module_name,
            swiftmodule = swiftmodule,
            transitive_swiftmodules = depset([swiftmodule], transitive = [d.transitive_swiftmodules for d in deps]),
            transitive_swiftdocs = depset([swiftdoc], transitive = [d.transitive_swiftdocs for d in deps]),
            transitive_objects = depset([object_file], transitive = [d.transitive_objects for d in deps]),
            transitive_linkopts = transitive_linkopts(ctx, deps),
            transitive_link_inputs = transitive_link_inputs(ctx, deps),
            cc_info = context.interop.cc_info,
            transitive_module_maps = context.interop.module_maps,
            superseded_module_maps = context.interop.superseded_module_maps,
            links_cxx = context.interop.links_cxx,
        ),
    ]

def _executable_runfiles(ctx, c_libraries, bundle, extra_files = []):
    # Shared C libraries are loaded at run time.
    return _runfiles(ctx, extra_files = c_libraries.shared_libraries + bundle.files + extra_files)

def _own_sources(ctx):
    # A test's own sources, which its tests read beside `#filePath` as under `swift test` (swift-nio's
    # NIOFSIntegrationTests open their own .swift file): `#filePath` is execroot-relative here and a test runs at
    # the root of its runfiles. Bazel 4's runfiles manifest cannot hold a path with a space: those stay out.
    return [f for f in ctx.files.srcs if " " not in f.short_path]

def _swift_binary_impl(ctx):
    swift = _toolchain(ctx)
    module_name = _module_name(ctx)
    context = compile_context(ctx)
    bundle = resource_bundle(ctx, module_name)

    # A module with main.swift has top-level code there; any other module is parsed as a library, so `@main`
    # works (swiftc: "'main' attribute cannot be used in a module that contains top-level code").
    object_file, _, _ = compile(
        ctx,
        swift = swift,
        context = context,
        module_name = module_name,
        srcs = _sources(ctx, bundle),
        parse_as_library = not _has_main_swift(ctx),
        enable_testing = False,
        emit_module = False,
    )
    executable = ctx.actions.declare_file(ctx.label.name)
    c_libraries = link(ctx, swift = swift, own_objects = [object_file], context = context, executable = executable)
    return [DefaultInfo(
        executable = executable,
        files = depset([executable]),
        runfiles = _executable_runfiles(ctx, c_libraries, bundle),
    )]

def _swift_test_impl(ctx):
    swift = _toolchain(ctx)
    module_name = _module_name(ctx)
    context = compile_context(ctx)

    # Linux has no XCTest runtime discovery: the test module's compile also emits its symbol graph (into a
    # temporary directory of the action, never an output) and swift_test_discovery.py writes an `@main` runner
    # from the XCTestCase subclasses and test methods it lists; the runner runs Swift Testing, then XCTest.
    runner_source = ctx.actions.declare_file("{}_runner/main.swift".format(ctx.label.name))
    bundle = resource_bundle(ctx, module_name)
    test_object, test_module, test_doc = compile(
        ctx,
        swift = swift,
        context = context,
        module_name = module_name,
        srcs = _sources(ctx, bundle),
        parse_as_library = True,
        enable_testing = True,  # the generated runner `@testable import`s the test module
        emit_module = True,
        runner_source = runner_source,
    )

    # The runner imports the test module, so it is compiled with everything that module's compile had (copts,
    # swiftc_inputs, Swift and C modules), by the same argument builder.
    runner_object, _, _ = compile(
        ctx,
        swift = swift,
        context = context,
        module_name = module_name + "_Runner",
        srcs = [runner_source],
        parse_as_library = True,
        enable_testing = False,
        emit_module = False,
        swift_version = "5",  # generated code, whatever the tests' language mode
        extra_modules = depset([test_module, test_doc]),
        progress_message = "Compiling test runner of {}".format(ctx.label),
    )
    executable = ctx.actions.declare_file(ctx.label.name)
    c_libraries = link(
        ctx,
        swift = swift,
        own_objects = [test_object, runner_object],
        context = context,
        executable = executable,
    )
    return [
        DefaultInfo(
            executable = executable,
            files = depset([executable]),
            runfiles = _executable_runfiles(ctx, c_libraries, bundle, extra_files = _own_sources(ctx)),
        ),
        testing.TestEnvironment(ctx.attr.env),
    ]

_COMMON_ATTRS = dict(TREEMAT_ATTRS, **RESOURCE_ATTRS)
_COMMON_ATTRS.update({
    "srcs": attr.label_list(allow_files = [".swift"], doc = "Swift sources of this module."),
    "deps": attr.label_list(
        providers = [[SwiftModuleInfo], [CcInfo]],
        aspects = [clang_module_aspect],
        doc = "What this module imports and links: swift_library modules, cc_library targets (anything with " +
              "CcInfo; each gets a generated clang module map, named by its `swift_module=NAME` tag or after " +
              "its label) and swift_c_module targets (a package's own module map). Their Swift and C modules " +
              "reach every compile that imports this module, their libraries every link.",
    ),
    "data": attr.label_list(
        allow_files = True,
        doc = "Files needed at run time: runfiles of this target and of every binary or test depending on it.",
    ),
    "swiftc_inputs": attr.label_list(
        allow_files = True,
        doc = "Extra inputs of the compile (files referenced from copts with $(location), resources, " +
              "SDK-like trees); staged read-only with the sources. A file of swiftc_inputs or data named " +
              "in linkopts is an input of every link the linkopts reach.",
    ),
    "module_name": attr.string(
        doc = "The module name (what `import` uses). Default: the target name, with -, ., /, + turned into _.",
    ),
    "package_name": attr.string(
        doc = "The Swift package name (`-package-name`), which scopes `package` declarations. Default: the " +
              "Bazel repository's name, so all modules of a repository share `package` access, as the " +
              "targets of one SwiftPM package do.",
    ),
    "copts": attr.string_list(
        doc = "Extra swiftc flags, after the rule's own ($(location) expanded over swiftc_inputs and data; " +
              "the files named are inputs of the compile). " +
              "Upcoming and experimental features go here: `-enable-upcoming-feature X`, " +
              "`-enable-experimental-feature X`.",
    ),
    "defines": attr.string_list(
        doc = "Compilation conditions for `#if`: each NAME becomes `-DNAME`.",
    ),
    "linkopts": attr.string_list(
        doc = "Extra flags for the swiftc link of every executable or test this module ends up in " +
              "($(location) expanded over swiftc_inputs and data; the files named are link inputs).",
    ),
    "swift_version": attr.string(
        values = ["", "4", "4.2", "5", "6"],
        doc = "Language mode (`-swift-version`): \"5\" or \"6\" (strict concurrency). Empty: the compiler's " +
              "default (5 for swiftc 6.x).",
    ),
})

_TOOLCHAINS = [SWIFT_TOOLCHAIN_TYPE]

swift_library = rule(
    implementation = _swift_library_impl,
    attrs = _COMMON_ATTRS,
    toolchains = _TOOLCHAINS,
    doc = """A Swift module: one whole-module SwiftCompile action produces its .swiftmodule and one object.

Sources are parsed as a library (no top-level code). `-c opt` compiles with `-O -DNDEBUG`, `-c dbg` with
`-Onone -g -DDEBUG`, fastbuild with `-Onone -DDEBUG` (rules_swift's flags); outside `-c opt` the module is
built with `-enable-testing` so tests can `@testable import` it.""",
)

swift_binary = rule(
    implementation = _swift_binary_impl,
    attrs = _COMMON_ATTRS,
    toolchains = _TOOLCHAINS,
    executable = True,
    doc = """A Swift executable: its main module is compiled (SwiftCompile) and linked with its deps (SwiftLink).

The entry point is either a `main.swift` with top-level code, or a type marked `@main` in any source (the
module is then compiled with `-parse-as-library`, as SwiftPM does).""",
)

swift_test = rule(
    implementation = _swift_test_impl,
    attrs = dict(_COMMON_ATTRS, **{
        "env": attr.string_dict(doc = "Environment variables set when the test runs."),
        "_discovery": attr.label(
            default = Label("//rules/private:swift_test_discovery.py"),
            allow_single_file = True,
            doc = "Generates the test runner from the test module's symbol graph.",
        ),
    }),
    toolchains = _TOOLCHAINS + [PYTHON_TOOLCHAIN_TYPE],
    test = True,
    doc = """A Swift test module and its runner, run by `bazel test`.

`srcs` hold XCTest cases (`XCTestCase` subclasses with `func test...()`, sync or async) and/or Swift Testing
tests (`@Test`, `@Suite`). The module is compiled with `-enable-testing` and its symbol graph; a generated
`@main` runner runs the Swift Testing tests (found at run time) and then the XCTest cases (found in the symbol
graph, since Linux XCTest has no runtime discovery). The test fails if any test of either library fails.
`--test_filter` is passed to both libraries, a regex as `swift test --filter`'s (`Class/testMethod` works).
The `srcs` are runfiles too (but for a path with a space, which Bazel 4's runfiles cannot hold), so a test
reading its own source beside `#filePath` finds it as under `swift test`.""",
)
