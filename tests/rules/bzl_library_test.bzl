"""Analysis test of //rules:bzl_library.bzl targets: the .bzl files a bzl_library hands to stardoc."""

load("//rules:bzl_library.bzl", "StarlarkLibraryInfo")
load(":action_test.bzl", "TREEMAT_SWIFT_ROOT")

def _bzl_library_test_impl(ctx):
    target = ctx.attr.target_under_test
    info = target[StarlarkLibraryInfo]
    errors = []
    transitive = sorted([f.path for f in info.transitive_srcs.to_list()])
    expected = sorted([path.replace("{treemat_swift}", TREEMAT_SWIFT_ROOT) for path in ctx.attr.transitive_srcs])
    if transitive != expected:
        errors.append("transitive_srcs: {}, expected {}".format(transitive, expected))
    files = sorted([f.path for f in target[DefaultInfo].files.to_list()])
    if files != transitive:
        errors.append("DefaultInfo files (what stardoc reads): {}, expected the transitive srcs".format(files))
    srcs = sorted([f.path for f in info.srcs])
    if srcs != sorted(ctx.attr.srcs):
        errors.append("srcs: {}, expected {}".format(srcs, sorted(ctx.attr.srcs)))
    return [AnalysisTestResultInfo(success = not errors, message = "\n".join(errors))]

bzl_library_test = rule(
    implementation = _bzl_library_test_impl,
    analysis_test = True,
    attrs = {
        "target_under_test": attr.label(mandatory = True, providers = [StarlarkLibraryInfo], doc = "A bzl_library."),
        "srcs": attr.string_list(doc = "Exec paths of its own .bzl files."),
        "transitive_srcs": attr.string_list(doc = "Exec paths of every .bzl file it and its deps hold (`{treemat_swift}`: the generated repo)."),
    },
    doc = "Fails when a bzl_library's own or transitive .bzl files differ from the expected ones.",
)
