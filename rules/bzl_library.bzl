"""bzl_library: a set of .bzl files and the .bzl files they load, for documentation and dependency tools.

The shape of bazel_skylib's `bzl_library` (`srcs`, `deps`; `StarlarkLibraryInfo(srcs, transitive_srcs)`; every
file in DefaultInfo's files and runfiles), which is what stardoc and `starlark_doc_extract` read from their
`deps` (they take any target whose DefaultInfo holds the .bzl files). Our own rule because Bazel 4.2.3 has no
bazel_skylib offline (`@bazel_skylib` is an empty stand-in there; see docs/bazel.md "bzl_library targets").
A project with skylib can list these targets in its own skylib `bzl_library`'s `deps`.
"""

StarlarkLibraryInfo = provider(
    doc = "The Starlark files of a bzl_library (fields as in bazel_skylib's provider of the same name).",
    fields = {
        "srcs": "list of File: this target's own .bzl files.",
        "transitive_srcs": "depset of File: its .bzl files and those of every dependency.",
    },
)

def _bzl_library_impl(ctx):
    transitive = depset(
        ctx.files.srcs,
        order = "postorder",
        transitive = [dep[DefaultInfo].files for dep in ctx.attr.deps],
    )
    return [
        DefaultInfo(files = transitive, runfiles = ctx.runfiles(transitive_files = transitive)),
        StarlarkLibraryInfo(srcs = ctx.files.srcs, transitive_srcs = transitive),
    ]

bzl_library = rule(
    implementation = _bzl_library_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".bzl", ".scl"], doc = "The .bzl files of this library."),
        "deps": attr.label_list(
            allow_files = [".bzl", ".scl"],
            doc = "bzl_library targets (or filegroups, or .bzl files) that `srcs` load.",
        ),
    },
    doc = "A logical collection of .bzl files and what they load (bazel_skylib's `bzl_library`, offline).",
)
