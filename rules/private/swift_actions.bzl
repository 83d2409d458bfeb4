"""The Swift rules' actions: one argument builder for every compile (library, binary, test module, test
runner) and the link, with the inputs each reads. Used by swift.bzl's rule implementations."""

load(
    ":cc_interop.bzl",
    "add_clang_importer_args",
    "c_interop",
    "clang_importer_inputs",
    "link_inputs",
)
load(":providers.bzl", "SwiftModuleInfo")
load(":staged_action.bzl", "escape_tool_arg", "treemat_action", "treemat_args")

# swift_test's compile runs the discovery script with the Python toolchain's interpreter.
PYTHON_TOOLCHAIN_TYPE = "@bazel_tools//tools/python:toolchain_type"

# -c opt|dbg|fastbuild -> swiftc optimisation and debug flags, and the conditions rules_swift (and SwiftPM's
# debug/release) define: `#if DEBUG` code (swift-collections' and swift-argument-parser's checks) compiles in
# outside `-c opt`.
_MODE_FLAGS = {
    "opt": ["-O", "-DNDEBUG"],
    "dbg": ["-Onone", "-g", "-DDEBUG"],
    "fastbuild": ["-Onone", "-DDEBUG"],
}

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
    return [dep[SwiftModuleInfo] for dep in ctx.attr.deps if SwiftModuleInfo in dep]

def compile_context(ctx):
    """What every compile of this target reads besides its own sources, and the flags that say so: the
    Swift modules and C modules its deps reach (transitively, across repositories), copts, swiftc_inputs."""
    deps = _deps_info(ctx)
    interop = c_interop(ctx.attr.deps)
    swiftmodules = depset(transitive = [d.transitive_swiftmodules for d in deps])
    swiftdocs = depset(transitive = [d.transitive_swiftdocs for d in deps])
    copts = _expand(ctx, ctx.attr.copts)
    return struct(
        deps = deps,
        interop = interop,
        swiftmodules = swiftmodules,
        swiftdocs = swiftdocs,
        copts = copts,
        inputs = depset(
            ctx.files.swiftc_inputs + _named_files(ctx, copts),
            transitive = [swiftmodules, swiftdocs, clang_importer_inputs(interop)],
        ),
    )

def _add_compile_args(
        request,
        ctx,
        swift,
        context,
        *,
        module_name,
        swift_version,
        parse_as_library,
        enable_testing,
        extra_modules):
    """The one swiftc argument builder: every compile (library, binary, test, test runner) gets its flags here."""
    request.add(swift.swiftc)
    request.add_all(["-module-name", module_name, "-package-name", _package_name(ctx)])
    if swift_version:
        request.add_all(["-swift-version", swift_version])
    request.add_all(["-wmo", "-num-threads", "0"])
    request.add_all(_MODE_FLAGS[ctx.var["COMPILATION_MODE"]])
    if enable_testing:
        request.add("-enable-testing")
    if parse_as_library:
        request.add("-parse-as-library")
    request.add_all(ctx.attr.defines, format_each = "-D%s")
    if getattr(ctx.attr, "resources", None):  # as SwiftPM: the module has Bundle.module (resources.bzl)
        request.add("-DSWIFT_MODULE_RESOURCE_BUNDLE_AVAILABLE")
    request.add_all(["-file-prefix-map", "{EXEC_ROOT}=.", "-module-cache-path", "{TOOL_CACHE}/swift-module-cache"])
    request.add_all(
        depset(transitive = [extra_modules, context.swiftmodules]),
        map_each = _dirname,
        uniquify = True,
        before_each = "-I",
    )
    add_clang_importer_args(request, context.interop)
    request.add_all(context.copts, map_each = escape_tool_arg)

def compile(
        ctx,
        *,
        swift,
        context,
        module_name,
        srcs,
        parse_as_library,
        enable_testing,
        emit_module,
        swift_version = None,
        extra_modules = None,
        runner_source = None,
        progress_message = None):
    """Registers a SwiftCompile action; returns (object File, .swiftmodule File or None, .swiftdoc or None).

    With `runner_source` (swift_test), the action compiles through swift_test_discovery.py, which adds a
    symbol graph in a private temporary directory and writes the test runner's source to `runner_source`.
    """
    subdir = "{}_runner".format(ctx.label.name) if extra_modules else "{}_objs".format(ctx.label.name)
    object_file = ctx.actions.declare_file("{}/{}.o".format(subdir, module_name))
    outputs = [object_file]
    swiftmodule, swiftdoc = None, None
    if emit_module:
        # swiftc writes the .swiftdoc beside the .swiftmodule whatever it is told: declared, so it is the same
        # file in every strategy (and an input of the compiles that import the module); the .swiftsourceinfo
        # (absolute paths) is not written at all.
        swiftmodule = ctx.actions.declare_file("{}_module/{}.swiftmodule".format(ctx.label.name, module_name))
        swiftdoc = ctx.actions.declare_file("{}_module/{}.swiftdoc".format(ctx.label.name, module_name))
        outputs.extend([swiftmodule, swiftdoc])
    if runner_source:
        outputs.append(runner_source)
    extra_modules = extra_modules or depset()
    request = treemat_args(ctx, outputs)
    tools = []
    if runner_source:
        python = ctx.toolchains[PYTHON_TOOLCHAIN_TYPE].py3_runtime
        request.add(python.interpreter.path if python.interpreter else python.interpreter_path)
        request.add(ctx.file._discovery)
        request.add_all(["--module", module_name, "--output", runner_source, "--"])
        tools = [ctx.file._discovery] + ([python.interpreter] if python.interpreter else [])
    _add_compile_args(
        request,
        ctx,
        swift,
        context,
        module_name = module_name,
        swift_version = ctx.attr.swift_version if swift_version == None else swift_version,
        parse_as_library = parse_as_library,
        enable_testing = enable_testing,
        extra_modules = extra_modules,
    )
    request.add_all(["-c", "-o", object_file])
    if swiftmodule:
        request.add_all(["-emit-module", "-emit-module-path", swiftmodule, "-avoid-emit-module-source-info"])
    request.add_all(srcs)
    treemat_action(
        ctx,
        mnemonic = "SwiftCompile",
        args = request,
        inputs = depset(srcs + tools + [swift.identity], transitive = [extra_modules, context.inputs]),
        outputs = outputs,
        progress_message = progress_message or "Compiling Swift module {} ({} sources)".format(module_name, len(srcs)),
    )
    return object_file, swiftmodule, swiftdoc

def _identifier(name):
    """`name` as a Swift identifier: other characters become `_`, and a leading digit gets one in front."""
    chars = [c if c.isalnum() or c == "_" else "_" for c in name.elems()]
    identifier = "".join(chars)
    return "_" + identifier if identifier[:1].isdigit() else identifier

def link(ctx, *, swift, own_objects, context, executable):
    """Registers SwiftLink: this target's objects, those of its Swift deps, then the C/C++ libraries reached
    (dependents first), then the linkopts of the Swift modules and of the C libraries; every file it reads is
    an input, every file it writes an output.

    swiftc writes the `swift-autolink-extract` list to `<directory of the first object>/<module name>.autolink`
    (a temporary file only when that directory is the working directory): this target's own object comes
    first, so the file lands in this target's `_objs` directory, where it is declared. The link's module name
    is given, not left to swiftc, which takes the executable's name, or `main` when that is no identifier
    (swift-argument-parser's `generate-manual`).
    """
    c_libraries = link_inputs(context.interop)
    objects = depset(own_objects, transitive = [d.transitive_objects for d in context.deps], order = "preorder")
    link_module = _identifier(executable.basename)
    autolink = ctx.actions.declare_file("{}_objs/{}.autolink".format(ctx.label.name, link_module))
    if own_objects[0].dirname != autolink.dirname:
        fail("internal: {}'s first object {} is not in {}".format(ctx.label, own_objects[0].path, autolink.dirname))
    request = treemat_args(ctx, [executable, autolink])
    request.add(swift.swiftc)
    request.add_all(["-module-name", link_module])
    if ctx.var["COMPILATION_MODE"] == "dbg":
        request.add("-g")
    request.add_all(["-file-prefix-map", "{EXEC_ROOT}=."])
    request.add_all(objects)
    request.add_all(c_libraries.files)
    request.add_all(transitive_linkopts(ctx, context.deps), map_each = escape_tool_arg)
    request.add_all(c_libraries.flags, map_each = escape_tool_arg)
    request.add_all(["-o", executable])
    treemat_action(
        ctx,
        mnemonic = "SwiftLink",
        args = request,
        inputs = depset(
            [swift.identity] + c_libraries.files + c_libraries.additional_inputs,
            transitive = [objects, transitive_link_inputs(ctx, context.deps)],
        ),
        outputs = [executable, autolink],
        # swiftc's clang driver finds the linker (`ld`) on PATH: without it, "posix_spawn failed: No such file
        # or directory". The compiles run swift-frontend by absolute path and get no shell environment.
        use_default_shell_env = True,
        progress_message = "Linking Swift executable {}".format(ctx.label),
    )
    return c_libraries

def transitive_linkopts(ctx, deps):
    return depset(_expand(ctx, ctx.attr.linkopts), transitive = [d.transitive_linkopts for d in deps])

def transitive_link_inputs(ctx, deps):
    """Files named in the linkopts of this module and its dependencies (inputs of every link they reach)."""
    return depset(
        _named_files(ctx, _expand(ctx, ctx.attr.linkopts)),
        transitive = [d.transitive_link_inputs for d in deps],
    )
