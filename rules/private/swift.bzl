"""swift_library / swift_binary over a host swiftc, with every compile staged through treemat.

Outputs are deterministic and independent of where the tool runs: each module is compiled whole-module
(`-wmo`) to one object at a fixed path (swiftc's own temp-file names would leak into the object), and
`-file-prefix-map {EXEC_ROOT}=.` strips the exec directory from debug/coverage paths. swiftc's module cache
goes to `{TOOL_CACHE}`, which treemat keeps across actions (Bazel's local strategy keeps it in the execroot).
"""

load("@treemat_swift//:defs.bzl", "SWIFTC")
load(":staged_action.bzl", "TREEMAT_ATTRS", "treemat_request_args", "treemat_run_action")

SwiftModuleInfo = provider(
    doc = "A compiled Swift module.",
    fields = {
        "module_name": "The module name (what `import` uses).",
        "swiftmodule": "The .swiftmodule File.",
        "transitive_swiftmodules": "depset of .swiftmodule Files of this module and its dependencies.",
        "transitive_objects": "depset of object Files to link, this module's included.",
    },
)

def _module_name(ctx):
    return ctx.attr.module_name or ctx.label.name.replace("-", "_")

def _common_flags(request):
    request.add_all(["-swift-version", "5", "-wmo", "-num-threads", "0", "-Onone"])
    request.add_all(["-file-prefix-map", "{EXEC_ROOT}=.", "-module-cache-path", "{TOOL_CACHE}/swift-module-cache"])

def _compile(ctx, module_name, parse_as_library, object_file, swiftmodule = None):
    deps = [dep[SwiftModuleInfo] for dep in ctx.attr.deps]
    transitive_modules = depset(transitive = [d.transitive_swiftmodules for d in deps])
    outputs = [object_file] + ([swiftmodule] if swiftmodule else [])
    request = treemat_request_args(ctx, outputs)
    request.add(SWIFTC)
    request.add_all(["-module-name", module_name])
    _common_flags(request)
    if parse_as_library:
        request.add("-parse-as-library")
    request.add_all(transitive_modules, map_each = _dirname, uniquify = True, before_each = "-I")
    request.add_all(["-c", "-o", object_file])
    if swiftmodule:
        request.add_all(["-emit-module", "-emit-module-path", swiftmodule])
    request.add_all(ctx.files.srcs)
    treemat_run_action(
        ctx,
        mnemonic = "SwiftCompile",
        request = request,
        inputs = depset(ctx.files.srcs + ctx.files.data, transitive = [transitive_modules]),
        outputs = outputs,
        progress_message = "Compiling Swift module {} ({} sources, treemat-staged)".format(module_name, len(ctx.files.srcs)),
    )
    return deps, transitive_modules

def _dirname(file):
    return file.dirname

def _swift_library_impl(ctx):
    module_name = _module_name(ctx)
    object_file = ctx.actions.declare_file("{}_objs/{}.o".format(ctx.label.name, module_name))
    swiftmodule = ctx.actions.declare_file("{}_module/{}.swiftmodule".format(ctx.label.name, module_name))
    deps, transitive_modules = _compile(ctx, module_name, True, object_file, swiftmodule)
    return [
        DefaultInfo(files = depset([swiftmodule, object_file])),
        SwiftModuleInfo(
            module_name = module_name,
            swiftmodule = swiftmodule,
            transitive_swiftmodules = depset([swiftmodule], transitive = [transitive_modules]),
            transitive_objects = depset([object_file], transitive = [d.transitive_objects for d in deps]),
        ),
    ]

_COMMON_ATTRS = dict(TREEMAT_ATTRS, **{
    "srcs": attr.label_list(allow_files = [".swift"], doc = "Swift sources of this module."),
    "deps": attr.label_list(providers = [SwiftModuleInfo], doc = "swift_library modules this one imports."),
    "data": attr.label_list(
        allow_files = True,
        doc = "Extra files staged as inputs of the compile (resources, headers, SDK-like trees).",
    ),
    "module_name": attr.string(doc = "Module name; defaults to the target name."),
})

swift_library = rule(
    implementation = _swift_library_impl,
    attrs = _COMMON_ATTRS,
    doc = """A Swift module compiled by the host swiftc into a .swiftmodule and one object file.

The SwiftCompile action's inputs (sources, `data`, and every transitive .swiftmodule) are staged by treemat
under `--config=treemat`.""",
)

def _swift_binary_impl(ctx):
    module_name = _module_name(ctx)
    object_file = ctx.actions.declare_file("{}_objs/{}.o".format(ctx.label.name, module_name))
    deps, _ = _compile(ctx, module_name, False, object_file)
    executable = ctx.actions.declare_file(ctx.label.name)
    objects = depset([object_file], transitive = [d.transitive_objects for d in deps])
    request = treemat_request_args(ctx, [executable])
    request.add(SWIFTC)
    request.add_all(["-file-prefix-map", "{EXEC_ROOT}=."])
    request.add_all(objects)
    request.add_all(["-o", executable])
    treemat_run_action(
        ctx,
        mnemonic = "SwiftLink",
        request = request,
        inputs = objects,
        outputs = [executable],
        progress_message = "Linking Swift binary {} (treemat-staged)".format(ctx.label.name),
    )
    return [DefaultInfo(executable = executable, files = depset([executable]))]

swift_binary = rule(
    implementation = _swift_binary_impl,
    attrs = _COMMON_ATTRS,
    executable = True,
    doc = "A Swift executable: its main module is compiled (SwiftCompile) and linked with its deps (SwiftLink).",
)
