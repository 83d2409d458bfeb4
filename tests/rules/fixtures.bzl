"""A rule that calls treemat_action with every request shape treemat_args writes (outputs, a tree artifact,
env, a host tool by absolute path, `@` arguments), for tests/rules' flagfile-contract analysis tests."""

load("//rules:defs.bzl", "TREEMAT_ATTRS", "treemat_action")

def _request_shapes_impl(ctx):
    listing = ctx.actions.declare_file(ctx.label.name + ".txt")
    tree = ctx.actions.declare_directory(ctx.label.name + ".d")
    treemat_action(
        ctx,
        mnemonic = "TreematRun",
        executable = "/bin/sh",
        arguments = ["-c", "mkdir -p \"$1\" && echo \"$2\" > \"$0\"", listing, tree, "@not-a-flagfile"],
        inputs = ctx.files.srcs,
        outputs = [listing, tree],
        output_dirs = [tree],
        env = {"ZED": "last", "ALPHA": "a=b c"},
    )
    return [DefaultInfo(files = depset([listing, tree]))]

request_shapes = rule(
    implementation = _request_shapes_impl,
    attrs = dict(TREEMAT_ATTRS, srcs = attr.label_list(allow_files = True, doc = "Inputs of the action.")),
    doc = "One TreematRun action with a file and a tree artifact output, two env entries and an `@` argument.",
)
