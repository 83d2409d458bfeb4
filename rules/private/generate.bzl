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
