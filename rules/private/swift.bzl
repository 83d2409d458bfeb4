"""swift_library / swift_binary / swift_test over the registered Swift toolchain, staged through treemat.

Outputs are deterministic and independent of where the tool runs: each module is compiled whole-module
(`-wmo`) to one object at a fixed path (swiftc's own temp-file names would leak into the object), and
`-file-prefix-map {EXEC_ROOT}=.` strips the exec directory from debug info. swiftc's module cache goes to
`{TOOL_CACHE}`, which treemat keeps across actions.
"""

load(":providers.bzl", "SwiftModuleInfo", "SwiftToolchainInfo")
load(":staged_action.bzl", "TREEMAT_ATTRS", "escape_tool_arg", "treemat_action", "treemat_args")

SWIFT_TOOLCHAIN_TYPE = str(Label("//rules:swift_toolchain_type"))

_PYTHON_TOOLCHAIN_TYPE = "@bazel_tools//tools/python:toolchain_type"

_NO_SWIFTC = ("treemat: no swiftc found (set SWIFTC, put swiftc on PATH, or install Swift under /opt/swift, " +
              "then `bazel sync --configure` or restart Bazel); cannot build {}")

# -c opt|dbg|fastbuild -> swiftc optimisation and debug flags.
_MODE_FLAGS = {
    "opt": ["-O"],
    "dbg": ["-Onone", "-g"],
    "fastbuild": ["-Onone"],
}

def _toolchain(ctx):
    swift = ctx.toolchains[SWIFT_TOOLCHAIN_TYPE].swift
    if not swift.swiftc:
        fail(_NO_SWIFTC.format(ctx.label))
    return swift

def _module_name(ctx):
    if ctx.attr.module_name:
        return ctx.attr.module_name
    name = ctx.label.name
    for char in ["-", ".", "/", "+"]:
        name = name.replace(char, "_")
    return name

def _package_name(ctx):
    # Like SwiftPM, where every target of a package shares its package name: by default all modules of one
    # Bazel repository form one Swift package, so `package` declarations are visible across them.
    if ctx.attr.package_name:
        return ctx.attr.package_name
    return ctx.label.workspace_name or ctx.workspace_name

def _dirname(file):
    return file.dirname

def _expand(ctx, values):
    targets = ctx.attr.swiftc_inputs + ctx.attr.data
    return [ctx.expand_location(value, targets) for value in values]

def _named_files(ctx, expanded):
    """Files of swiftc_inputs and data whose path appears in `expanded` flags ($(location), $(execpath) and
    $(rootpath) all leave one there): the action that gets the flags needs them as inputs, or it works only
    where the execroot is at hand (local) and fails on the worker or in a sandbox."""
    if not expanded:
        return []
    text = "\n".join(expanded)
    named = []
    for target in ctx.attr.swiftc_inputs + ctx.attr.data:
        for file in target.files.to_list():
            if file.path in text or file.short_path in text:
                named.append(file)
    return named

def _deps_info(ctx):
    return [dep[SwiftModuleInfo] for dep in ctx.attr.deps]

def _compile(ctx, *, swift, module_name, parse_as_library, enable_testing, emit_module, symbol_graph_dir = None):
    """Registers the SwiftCompile action; returns (object File, .swiftmodule File or None)."""
    deps = _deps_info(ctx)
    transitive_modules = depset(transitive = [d.transitive_swiftmodules for d in deps])
    object_file = ctx.actions.declare_file("{}_objs/{}.o".format(ctx.label.name, module_name))
    swiftmodule = None
    outputs = [object_file]
    if emit_module:
        swiftmodule = ctx.actions.declare_file("{}_module/{}.swiftmodule".format(ctx.label.name, module_name))
        outputs.append(swiftmodule)
    output_dirs = [symbol_graph_dir] if symbol_graph_dir else []
    request = treemat_args(ctx, outputs, output_dirs = output_dirs)
    request.add(swift.swiftc)
    request.add_all(["-module-name", module_name, "-package-name", _package_name(ctx)])
    if ctx.attr.swift_version:
        request.add_all(["-swift-version", ctx.attr.swift_version])
    request.add_all(["-wmo", "-num-threads", "0"])
    request.add_all(_MODE_FLAGS[ctx.var["COMPILATION_MODE"]])
    if enable_testing:
        request.add("-enable-testing")
    if parse_as_library:
        request.add("-parse-as-library")
    request.add_all(ctx.attr.defines, format_each = "-D%s")
    request.add_all(["-file-prefix-map", "{EXEC_ROOT}=.", "-module-cache-path", "{TOOL_CACHE}/swift-module-cache"])
    request.add_all(transitive_modules, map_each = _dirname, uniquify = True, before_each = "-I")
    copts = _expand(ctx, ctx.attr.copts)
    request.add_all(copts, map_each = escape_tool_arg)
    request.add_all(["-c", "-o", object_file])
    if swiftmodule:
        request.add_all(["-emit-module", "-emit-module-path", swiftmodule])
    if symbol_graph_dir:
        request.add_all(["-emit-symbol-graph", "-symbol-graph-minimum-access-level", "internal"])
        request.add("-emit-symbol-graph-dir")
        request.add_all([symbol_graph_dir], expand_directories = False)
    request.add_all(ctx.files.srcs)
    treemat_action(
        ctx,
        mnemonic = "SwiftCompile",
        args = request,
        inputs = depset(
            ctx.files.srcs + ctx.files.swiftc_inputs + _named_files(ctx, copts) + [swift.identity],
            transitive = [transitive_modules],
        ),
        outputs = outputs + output_dirs,
        progress_message = "Compiling Swift module {} ({} sources)".format(module_name, len(ctx.files.srcs)),
    )
    return object_file, swiftmodule

def _link(ctx, *, swift, objects, deps, executable):
    request = treemat_args(ctx, [executable])
    request.add(swift.swiftc)
    if ctx.var["COMPILATION_MODE"] == "dbg":
        request.add("-g")
    request.add_all(["-file-prefix-map", "{EXEC_ROOT}=."])
    request.add_all(objects)
    request.add_all(_transitive_linkopts(ctx, deps), map_each = escape_tool_arg)
    request.add_all(["-o", executable])
    treemat_action(
        ctx,
        mnemonic = "SwiftLink",
        args = request,
        inputs = depset([swift.identity], transitive = [objects, _transitive_link_inputs(ctx, deps)]),
        outputs = [executable],
        progress_message = "Linking Swift executable {}".format(ctx.label),
    )

def _transitive_linkopts(ctx, deps):
    return depset(_expand(ctx, ctx.attr.linkopts), transitive = [d.transitive_linkopts for d in deps])

def _transitive_link_inputs(ctx, deps):
    """Files named in the linkopts of this module and its dependencies (inputs of every link they reach)."""
    return depset(
        _named_files(ctx, _expand(ctx, ctx.attr.linkopts)),
        transitive = [d.transitive_link_inputs for d in deps],
    )

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

def _swift_library_impl(ctx):
    swift = _toolchain(ctx)
    module_name = _module_name(ctx)
    object_file, swiftmodule = _compile(
        ctx,
        swift = swift,
        module_name = module_name,
        parse_as_library = True,
        enable_testing = _enable_testing(ctx),
        emit_module = True,
    )
    deps = _deps_info(ctx)
    return [
        DefaultInfo(files = depset([swiftmodule, object_file]), runfiles = _runfiles(ctx)),
        SwiftModuleInfo(
            module_name = module_name,
            swiftmodule = swiftmodule,
            transitive_swiftmodules = depset([swiftmodule], transitive = [d.transitive_swiftmodules for d in deps]),
            transitive_objects = depset([object_file], transitive = [d.transitive_objects for d in deps]),
            transitive_linkopts = _transitive_linkopts(ctx, deps),
            transitive_link_inputs = _transitive_link_inputs(ctx, deps),
        ),
    ]

def _swift_binary_impl(ctx):
    swift = _toolchain(ctx)
    module_name = _module_name(ctx)

    # A module with main.swift has top-level code there; any other module is parsed as a library, so `@main`
    # works (swiftc: "'main' attribute cannot be used in a module that contains top-level code").
    object_file, _ = _compile(
        ctx,
        swift = swift,
        module_name = module_name,
        parse_as_library = not _has_main_swift(ctx),
        enable_testing = False,
        emit_module = False,
    )
    deps = _deps_info(ctx)
    executable = ctx.actions.declare_file(ctx.label.name)
    objects = depset([object_file], transitive = [d.transitive_objects for d in deps])
    _link(ctx, swift = swift, objects = objects, deps = deps, executable = executable)
    return [DefaultInfo(executable = executable, files = depset([executable]), runfiles = _runfiles(ctx))]

def _swift_test_impl(ctx):
    swift = _toolchain(ctx)
    module_name = _module_name(ctx)
    symbol_graphs = ctx.actions.declare_directory("{}_symbol_graphs".format(ctx.label.name))
    test_object, test_module = _compile(
        ctx,
        swift = swift,
        module_name = module_name,
        parse_as_library = True,
        enable_testing = True,  # the generated runner `@testable import`s the test module
        emit_module = True,
        symbol_graph_dir = symbol_graphs,
    )

    # Linux has no XCTest runtime discovery: find XCTestCase subclasses and their test methods in the test
    # module's symbol graph and generate an `@main` runner that runs Swift Testing, then XCTest.
    runner_src = ctx.actions.declare_file("{}_runner/main.swift".format(ctx.label.name))
    # A plain script run by the Python toolchain's interpreter (the one treemat itself runs with): staging
    # a py_binary's runfiles tree is not something the worker does.
    python = ctx.toolchains[_PYTHON_TOOLCHAIN_TYPE].py3_runtime
    interpreter = python.interpreter.path if python.interpreter else python.interpreter_path
    script = ctx.file._discovery
    treemat_action(
        ctx,
        mnemonic = "SwiftTestDiscovery",
        executable = interpreter,
        arguments = [
            script.path,
            "--module",
            module_name,
            "--symbol-graph-dir",
            symbol_graphs.path,
            "--output",
            runner_src.path,
        ],
        inputs = [symbol_graphs, script] + ([python.interpreter] if python.interpreter else []),
        outputs = [runner_src],
        progress_message = "Discovering tests of {}".format(ctx.label),
    )
    runner_module = module_name + "_Runner"
    runner_object = ctx.actions.declare_file("{}_runner/{}.o".format(ctx.label.name, runner_module))
    request = treemat_args(ctx, [runner_object])
    request.add(swift.swiftc)
    request.add_all(["-module-name", runner_module, "-wmo", "-num-threads", "0", "-parse-as-library"])
    request.add_all(_MODE_FLAGS[ctx.var["COMPILATION_MODE"]])
    request.add_all(["-swift-version", "5"])  # generated code, whatever the tests' language mode
    request.add_all(["-file-prefix-map", "{EXEC_ROOT}=.", "-module-cache-path", "{TOOL_CACHE}/swift-module-cache"])
    deps = _deps_info(ctx)
    all_modules = depset([test_module], transitive = [d.transitive_swiftmodules for d in deps])
    request.add_all(all_modules, map_each = _dirname, uniquify = True, before_each = "-I")
    request.add_all(["-c", "-o", runner_object, runner_src])
    treemat_action(
        ctx,
        mnemonic = "SwiftCompile",
        args = request,
        inputs = depset([runner_src, swift.identity], transitive = [all_modules]),
        outputs = [runner_object],
        progress_message = "Compiling test runner of {}".format(ctx.label),
    )
    executable = ctx.actions.declare_file(ctx.label.name)
    objects = depset([test_object, runner_object], transitive = [d.transitive_objects for d in deps])
    _link(ctx, swift = swift, objects = objects, deps = deps, executable = executable)
    return [
        DefaultInfo(executable = executable, files = depset([executable]), runfiles = _runfiles(ctx)),
        testing.TestEnvironment(ctx.attr.env),
    ]

_COMMON_ATTRS = dict(TREEMAT_ATTRS, **{
    "srcs": attr.label_list(allow_files = [".swift"], doc = "Swift sources of this module."),
    "deps": attr.label_list(providers = [SwiftModuleInfo], doc = "swift_library modules this one imports."),
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

Sources are parsed as a library (no top-level code). `-c opt` compiles with `-O`, `-c dbg` with `-Onone -g`,
fastbuild with `-Onone`; outside `-c opt` the module is built with `-enable-testing` so tests can
`@testable import` it.""",
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
    toolchains = _TOOLCHAINS + [_PYTHON_TOOLCHAIN_TYPE],
    test = True,
    doc = """A Swift test module and its runner, run by `bazel test`.

`srcs` hold XCTest cases (`XCTestCase` subclasses with `func test...()`, sync or async) and/or Swift Testing
tests (`@Test`, `@Suite`). The module is compiled with `-enable-testing` and its symbol graph; a generated
`@main` runner runs the Swift Testing tests (found at run time) and then the XCTest cases (found in the symbol
graph, since Linux XCTest has no runtime discovery). The test fails if any test of either library fails.
`--test_filter` is passed to both libraries.""",
)
