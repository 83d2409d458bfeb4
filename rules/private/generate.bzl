"""swift_module_set: generate SwiftCompile-shaped inputs (many sources plus skewed-size resources)."""

def _size_for(index, count, total_kb):
    # Skewed sizes: most files are small, a few are large (like headers vs. swiftmodules/SDK blobs).
    weight = 1 if index % 50 else 40
    return max(1, total_kb * 1024 * weight // (count + count // 50 * 39))

def _swift_module_set_impl(ctx):
    sources = []
    for index in range(ctx.attr.num_sources):
        src = ctx.actions.declare_file("{}_srcs/Gen{}.swift".format(ctx.label.name, index))
        ctx.actions.write(src, "\n".join([
            # `--define=treemat_bench_edit=N` edits the first source only: `treemat bench`'s incremental rebuild
            "// edit {}".format(ctx.var.get("treemat_bench_edit", "")) if index == 0 else "//",
            "public struct Gen{}Value {{".format(index),
            "    public let id: Int",
            "    public init() {{ self.id = {} }}".format(index),
            "    public func describe() -> String {{ \"gen{}:\\(id)\" }}".format(index),
            "}",
            "",
        ]))
        sources.append(src)
    resources = []
    for index in range(ctx.attr.num_resources):
        res = ctx.actions.declare_file("{}_res/dir{}/res{}.bin".format(ctx.label.name, index % 16, index))
        size = _size_for(index, ctx.attr.num_resources, ctx.attr.resource_kb)
        line = "resource {} of {}\n".format(index, ctx.label.name)
        ctx.actions.write(res, line * (size // len(line) + 1))
        resources.append(res)
    return [
        DefaultInfo(files = depset(sources + resources)),
        OutputGroupInfo(sources = depset(sources), resources = depset(resources)),
    ]

swift_module_set = rule(
    implementation = _swift_module_set_impl,
    attrs = {
        "num_sources": attr.int(default = 32, doc = "How many .swift files to generate."),
        "num_resources": attr.int(default = 32, doc = "How many resource files (skewed sizes) to generate."),
        "resource_kb": attr.int(default = 1024, doc = "Approximate total size of the resources, in KiB."),
    },
    doc = """Generates `num_sources` small Swift files and `num_resources` resource files of skewed sizes.

Output groups `sources` and `resources` feed a swift_library's `srcs` and `data`, giving a compile with
hundreds to thousands of staged inputs. `--define=treemat_bench_edit=N` changes the first source only (an
edit-one-file rebuild for `treemat bench`).""",
)

def _swift_chain_sources_impl(ctx):
    level, index = ctx.attr.level, ctx.attr.index
    edited = level == ctx.attr.edit_level and index == 0
    lines = ["// edit {}".format(ctx.var.get("treemat_bench_edit", "")) if edited else "//"]
    lines += ["import {}".format(dep) for dep in ctx.attr.imports + ctx.attr.c_imports]
    terms = ["{}.{}Value().id".format(dep, dep) for dep in ctx.attr.imports] + ctx.attr.c_terms
    total = " + ".join(terms) or "0"
    sources = []
    for file_index in range(ctx.attr.num_sources):
        src = ctx.actions.declare_file("{}_srcs/{}{}.swift".format(ctx.label.name, ctx.attr.module, file_index))
        body = lines if file_index == 0 else ["//"]
        if file_index == 0:
            body = body + [
                "public struct {}Value {{".format(ctx.attr.module),
                "    public let id: Int",
                "    public init() {{ self.id = {} + {} }}".format(total, level),
                "}",
            ]
        body = body + [
            "public func {}Helper{}(_ value: Int) -> Int {{ value &* {} &+ {} }}".format(
                ctx.attr.module,
                file_index,
                file_index + 3,
                level,
            ),
            "",
        ]
        ctx.actions.write(src, "\n".join(body))
        sources.append(src)
    return [DefaultInfo(files = depset(sources))]

_swift_chain_sources = rule(
    implementation = _swift_chain_sources_impl,
    attrs = {
        "c_imports": attr.string_list(doc = "C modules imported too (level 0 of a chain with a C base)."),
        "c_terms": attr.string_list(doc = "Swift Int expressions calling into `c_imports`, added to the id."),
        "edit_level": attr.int(doc = "The level whose first module `--define=treemat_bench_edit=N` edits."),
        "imports": attr.string_list(doc = "The modules of the level below, imported and used."),
        "index": attr.int(),
        "level": attr.int(),
        "module": attr.string(),
        "num_sources": attr.int(default = 4),
    },
    doc = "The Swift sources of one module of swift_module_chain.",
)

def swift_module_chain(
        name,
        swift_library,
        depth = 32,
        width = 3,
        num_sources = 4,
        tags = [],
        c_deps = [],
        c_imports = [],
        c_terms = []):
    """`depth` levels of `width` Swift modules, each importing every module of the level below.

    A module at level L sees the .swiftmodule and .swiftdoc of every module below it as inputs (2 * width * L
    of them: 186 at the top of 32 x 3), as the compiles of an iOS app's upper modules do. `name` is a module
    importing the top level. `--define=treemat_bench_edit=N` edits the first module of the middle level (an
    edit-one-source rebuild for `treemat bench --workload chain`). `swift_library` is the rule (a macro
    argument: this file is loaded by rules that must not load defs.bzl). `c_deps` (cc_library targets, their
    clang modules named `c_imports`) are deps of level 0, whose sources import them and add `c_terms` (Swift Int
    expressions calling C) to their ids: C interop at the bottom of the chain.
    """
    below = []
    for level in range(depth + 1):
        top = level == depth
        modules = [name] if top else ["{}L{}M{}".format(name, level, index) for index in range(width)]
        for index, module in enumerate(modules):
            _swift_chain_sources(
                name = module + "_sources",
                module = module,
                level = level,
                index = index,
                imports = below,
                c_imports = c_imports if level == 0 else [],
                c_terms = c_terms if level == 0 else [],
                edit_level = depth // 2,
                num_sources = num_sources,
                tags = tags,
            )
            swift_library(
                name = module,
                srcs = [":" + module + "_sources"],
                deps = [":" + dep for dep in below] + (c_deps if level == 0 else []),
                tags = tags,
            )
        below = modules
