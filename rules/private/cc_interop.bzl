"""C interop of the Swift rules: clang modules for C/C++ libraries, and what swiftc needs to import and link them.

A plain `cc_library` in a Swift rule's `deps` gets a generated module map through `clang_module_aspect` (as
rules_swift's clang-module aspect does): the module is named by a `swift_module=NAME` tag on the cc_library,
else after its label (`derive_module_name`), and lists its public headers (`hdrs`; `textual_hdrs` stay
textual) with `export *`. A package's own module map is given with `swift_c_module` (swift_c_module.bzl).

Every Swift compile then gets the whole transitive C compilation context of what it reaches (headers, module
maps, `-Xcc -I/-iquote/-isystem/-D`, `-Xcc -fmodule-map-file=` per module map) as declared inputs and flags,
and every Swift link the libraries (archives, objects of `alwayslink` libraries) and their linkopts.
"""

load(":providers.bzl", "SwiftClangModuleInfo", "SwiftModuleInfo")

# rules_swift's spelling of an explicit module name on a cc_library.
MODULE_NAME_TAG = "swift_module="

_HEADER_EXTENSIONS = ["h", "hh", "hpp", "hxx", "h++", "H", "ipp", "inl"]
_CXX_SOURCE_EXTENSIONS = ["cc", "cpp", "cxx", "c++", "C", "cp", "CPP"]

def _identifier_safe(text):
    """rules_swift's rule: interior runs of non-identifier characters become one `_`, leading and trailing
    ones are dropped."""
    result = ""
    pending = False
    for char in text.elems():
        if char.isalnum() or char == "_":
            if pending:
                result += "_"
                pending = False
            result += char
        elif result:
            pending = True
    return result

def derive_module_name(label):
    """The module name rules_swift derives from a label: package and name made identifier-safe, joined by
    `_` (the name alone at the repository root), `_`-prefixed if it would start with a digit.

    Args:
      label: a Label.

    Returns:
      The module name.
    """
    package = _identifier_safe(label.package)
    name = _identifier_safe(label.name)
    module_name = package + "_" + name if package else name
    if module_name and module_name[0].isdigit():
        module_name = "_" + module_name
    return module_name

def cc_module_name(label, tags):
    """A cc_library's clang module name: its `swift_module=NAME` tag, else derived from its label."""
    for tag in tags:
        if tag.startswith(MODULE_NAME_TAG):
            return tag[len(MODULE_NAME_TAG):]
    return derive_module_name(label)

def _relative_to(module_map_dirname):
    # Paths in a module map are relative to its directory; every file is under the execroot, so climb to it.
    return "../" * len(module_map_dirname.split("/"))

def write_module_map(actions, output, module_name, headers):
    """Writes `module "NAME" { export * header "..." ... }` with header paths relative to `output`."""
    up = _relative_to(output.dirname)
    lines = ['module "{}" {{'.format(module_name), "    export *"]
    for header in headers:
        lines.append('    header "{}{}"'.format(up, header.path))
    lines.append("}")
    actions.write(output, "\n".join(lines) + "\n")

def module_maps_of(info):
    """depset: the module map of a SwiftClangModuleInfo (if any) and those of the C modules it depends on."""
    return depset([info.module_map] if info.module_map else [], transitive = [info.deps_module_maps])

def _rule_files(ctx, name):
    return getattr(ctx.rule.files, name, []) if hasattr(ctx.rule, "files") else []

def _dep_clang_infos(ctx):
    # `deps` only: the headers of `implementation_deps` are not in the library's CcInfo, so their modules are
    # not the dependents' business (their code is still linked: it is in the linking context).
    return [
        dep[SwiftClangModuleInfo]
        for dep in getattr(ctx.rule.attr, "deps", []) or []
        if type(dep) == "Target" and SwiftClangModuleInfo in dep
    ]

def _clang_module_aspect_impl(target, ctx):
    # Swift modules and targets that declare their own C module (swift_c_module) are left as they are.
    if CcInfo not in target or SwiftModuleInfo in target or SwiftClangModuleInfo in target:
        return []
    deps = _dep_clang_infos(ctx)
    # The public headers as the library's compilation context has them: `hdrs` (`textual_hdrs` are apart), or
    # their `_virtual_includes` copies under strip_include_prefix / include_prefix (the paths includes find).
    # Bazel lists both a header and its virtual copy there: one header in a module twice would define its
    # types twice, so the copies win.
    public = [f for f in target[CcInfo].compilation_context.direct_public_headers if f.extension in _HEADER_EXTENSIONS]
    virtual = [f for f in public if "/_virtual_includes/" in f.path]
    headers = virtual or public
    module_name = cc_module_name(target.label, getattr(ctx.rule.attr, "tags", []))
    module_map = None
    if headers:
        module_map = ctx.actions.declare_file("{}.swift.modulemap".format(target.label.name))
        write_module_map(ctx.actions, module_map, module_name, headers)
    links_cxx = any([f.extension in _CXX_SOURCE_EXTENSIONS for f in _rule_files(ctx, "srcs")])
    return [SwiftClangModuleInfo(
        module_name = module_name,
        module_map = module_map,
        deps_module_maps = depset(transitive = [module_maps_of(d) for d in deps]),
        links_cxx = links_cxx or any([d.links_cxx for d in deps]),
        superseded_module_maps = depset(transitive = [d.superseded_module_maps for d in deps]),
    )]

clang_module_aspect = aspect(
    implementation = _clang_module_aspect_impl,
    attr_aspects = ["deps"],
    doc = """Gives every C/C++ library reached through `deps` (a cc_library, or any target with CcInfo) a clang
module: a generated module map listing its public headers, named by its `swift_module=NAME` tag or after its
label. Swift modules and swift_c_module targets are left alone.""",
)

def c_interop(deps):
    """What the C/C++ libraries a Swift target's `deps` reach mean for its compiles and links.

    Args:
      deps: the targets of the `deps` attribute (swift_library, cc_library, swift_c_module, ...).

    Returns:
      A struct: `cc_info` (CcInfo merged over everything reached), `module_maps` (depset of module map Files,
      the superseded ones left out), `superseded_module_maps` (depset), `links_cxx` (bool).
    """
    cc_infos = []
    module_maps = []
    superseded = []
    links_cxx = False
    for dep in deps:
        if SwiftModuleInfo in dep:
            info = dep[SwiftModuleInfo]
            cc_infos.append(info.cc_info)
            module_maps.append(info.transitive_module_maps)
            superseded.append(info.superseded_module_maps)
            links_cxx = links_cxx or info.links_cxx
        elif CcInfo in dep:
            cc_infos.append(dep[CcInfo])
            if SwiftClangModuleInfo in dep:
                clang = dep[SwiftClangModuleInfo]
                module_maps.append(module_maps_of(clang))
                superseded.append(clang.superseded_module_maps)
                links_cxx = links_cxx or clang.links_cxx
    superseded_module_maps = depset(transitive = superseded)
    return struct(
        cc_info = cc_common.merge_cc_infos(cc_infos = cc_infos),
        module_maps = _without(depset(transitive = module_maps), superseded_module_maps),
        superseded_module_maps = superseded_module_maps,
        links_cxx = links_cxx,
    )

def _without(module_maps, superseded):
    """`module_maps` less the superseded ones: a cc_library wrapped by a swift_c_module and also reached through
    another C library gets a generated module map there, which would declare its headers a second time."""
    dropped = {f: True for f in superseded.to_list()}
    if not dropped:
        return module_maps
    return depset([f for f in module_maps.to_list() if f not in dropped])

def add_clang_importer_args(args, interop):
    """Adds `-Xcc` flags for the transitive C compilation context and every module map to a swiftc argv."""
    context = interop.cc_info.compilation_context
    args.add_all(interop.module_maps, before_each = "-Xcc", format_each = "-fmodule-map-file=%s")
    args.add_all(context.includes, before_each = "-Xcc", format_each = "-I%s", uniquify = True)
    args.add_all(context.quote_includes, before_each = "-Xcc", format_each = "-iquote%s", uniquify = True)
    args.add_all(context.system_includes, before_each = "-Xcc", format_each = "-isystem%s", uniquify = True)
    args.add_all(context.defines, before_each = "-Xcc", format_each = "-D%s", uniquify = True)

def clang_importer_inputs(interop):
    """depset: the headers and module maps a compile that imports these C modules reads."""
    return depset(transitive = [interop.module_maps, interop.cc_info.compilation_context.headers])

def _library_files(library):
    """The files that link one LibraryToLink: an alwayslink library's objects (so nothing is dropped), else
    its static archive (PIC preferred: swiftc links position-independent executables), else its shared one."""
    if library.alwayslink:
        objects = library.pic_objects or library.objects
        if objects:
            return objects
    archive = library.pic_static_library or library.static_library
    if archive:
        return [archive]
    shared = library.dynamic_library or library.interface_library
    return [shared] if shared else []

def link_inputs(interop):
    """(files, flags, runtime files) for a swiftc link of the C/C++ libraries reached, in link order.

    files: archives/objects (dependents before their dependencies, as the linking context orders them) plus
    each library's additional inputs; flags: swiftc arguments for their linkopts (`-Xclang-linker F` each:
    swiftc links through clang, which takes them as a C link would) and `-lstdc++` when C++ is linked;
    runtime files: shared libraries the executable loads at run time.
    """
    files = []
    inputs = []
    flags = []
    shared = []
    for linker_input in interop.cc_info.linking_context.linker_inputs.to_list():
        for library in linker_input.libraries:
            for file in _library_files(library):
                files.append(file)
                if file.extension == "so" or ".so." in file.basename:
                    shared.append(file)
        inputs.extend(linker_input.additional_inputs)
        for flag in linker_input.user_link_flags:
            flags.extend(["-Xclang-linker", flag])
    if interop.links_cxx:
        flags.append("-lstdc++")
    return struct(files = files, additional_inputs = inputs, flags = flags, shared_libraries = shared)
