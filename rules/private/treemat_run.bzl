"""treemat_run: run any tool through treemat with declared inputs and outputs."""

load(":staged_action.bzl", "TREEMAT_ATTRS", "treemat_request_args", "treemat_run_action")

def _treemat_run_impl(ctx):
    outputs = [ctx.actions.declare_file(name) for name in ctx.attr.outs]
    tool = ctx.executable.tool
    request = treemat_request_args(ctx, outputs, env = ctx.attr.env)
    request.add(tool)
    substitutions = {"$(OUTS)": " ".join([o.path for o in outputs])}
    for index, output in enumerate(outputs):
        substitutions["$(OUT{})".format(index)] = output.path
    for arg in ctx.attr.args:
        expanded = ctx.expand_location(arg, ctx.attr.srcs)
        for key, value in substitutions.items():
            expanded = expanded.replace(key, value)
        request.add(expanded)
    treemat_run_action(
        ctx,
        mnemonic = ctx.attr.mnemonic,
        request = request,
        inputs = ctx.files.srcs,
        outputs = outputs,
        tools = [ctx.attr.tool[DefaultInfo].files_to_run],
        progress_message = "Running {} through treemat".format(ctx.label),
    )
    return [DefaultInfo(files = depset(outputs))]

treemat_run = rule(
    implementation = _treemat_run_impl,
    attrs = dict(TREEMAT_ATTRS, **{
        "tool": attr.label(executable = True, cfg = "exec", mandatory = True, doc = "The program to run."),
        "args": attr.string_list(
            doc = "Tool arguments. $(location ...) over srcs, $(OUT0)/$(OUT1)/... and $(OUTS) are expanded.",
        ),
        "srcs": attr.label_list(allow_files = True, doc = "Inputs, staged read-only into the exec dir."),
        "outs": attr.string_list(mandatory = True, doc = "Output file names, relative to the package."),
        "env": attr.string_dict(doc = "Extra environment variables for the tool."),
        "mnemonic": attr.string(default = "TreematRun", doc = "Action mnemonic (.bazelrc maps it to the worker)."),
    }),
    doc = "Runs `tool` on `srcs` producing `outs`, with inputs staged by treemat under --config=treemat.",
)
