"""swift_c_module: a C module described by a package's own module map (rules_swift's older spelling)."""

load(":cc_interop.bzl", "clang_module_aspect")
load(":providers.bzl", "SwiftClangModuleInfo")

def _swift_c_module_impl(ctx):
    infos = [dep[SwiftClangModuleInfo] for dep in ctx.attr.deps if SwiftClangModuleInfo in dep]

    # The libraries' own generated module maps (from the aspect) are left out: this module map declares their
    # headers, and one header in two modules is an error. Only the C modules they depend on come along.
    deps_module_maps = depset(transitive = [info.deps_module_maps for info in infos])
    module_name = ctx.attr.module_name or ctx.label.name
    return [
        DefaultInfo(files = depset([ctx.file.module_map])),
        cc_common.merge_cc_infos(cc_infos = [dep[CcInfo] for dep in ctx.attr.deps]),
        SwiftClangModuleInfo(
            module_name = module_name,
            module_map = ctx.file.module_map,
            deps_module_maps = deps_module_maps,
            links_cxx = any([info.links_cxx for info in infos]),
            # ...and wherever else those libraries are reached (through another C library), their generated
            # module maps give way to this one
            superseded_module_maps = depset(
                [info.module_map for info in infos if info.module_map],
                transitive = [info.superseded_module_maps for info in infos],
            ),
        ),
    ]

swift_c_module = rule(
    implementation = _swift_c_module_impl,
    attrs = {
        "module_map": attr.label(
            allow_single_file = True,
            mandatory = True,
            doc = "The module map (e.g. a SwiftPM C target's `include/module.modulemap`). Its header paths " +
                  "are relative to its own directory, as clang reads them; every header it names must be in " +
                  "the `hdrs` of a library of `deps`.",
        ),
        "module_name": attr.string(
            doc = "The name of the module the module map declares (what Swift `import`s). Default: the " +
                  "target name. It must match the module map's `module NAME`.",
        ),
        "deps": attr.label_list(
            providers = [CcInfo],
            aspects = [clang_module_aspect],
            doc = "The cc_library targets whose headers the module map declares and whose code is linked " +
                  "into every executable and test that reaches this module.",
        ),
    },
    doc = """A C module given by its own module map: Swift targets list it in `deps` and `import` it.

Returns the CcInfo of its `deps` (headers, include paths, defines, libraries) and a SwiftClangModuleInfo with
the module map, so every Swift compile that reaches it (also through other Swift modules, across repositories)
gets `-Xcc -fmodule-map-file=` and the headers as inputs, and every link the libraries.""",
)

