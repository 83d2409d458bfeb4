"""treemat_run: run any tool through treemat with declared inputs and outputs (like skylib's run_binary)."""

load(":staged_action.bzl", "TREEMAT_ATTRS", "treemat_action")

def _treemat_run_impl(ctx):
    outputs = ctx.outputs.outs
    tool = ctx.attr.tool[DefaultInfo].files_to_run
    targets = ctx.attr.srcs + [ctx.attr.tool]
    arguments = [ctx.expand_location(arg, targets) for arg in ctx.attr.args]
    env = {key: ctx.expand_location(value, targets) for key, value in ctx.attr.env.items()}
    treemat_action(
        ctx,
        mnemonic = ctx.attr.mnemonic,
        executable = tool,
        arguments = arguments,
        inputs = ctx.files.srcs,
        outputs = outputs,
        env = env,
        use_default_shell_env = ctx.attr.use_default_shell_env,
        progress_message = ctx.attr.progress_message or "Running {} through treemat".format(ctx.label),
    )
    return [DefaultInfo(files = depset(outputs), runfiles = ctx.runfiles(files = outputs))]

treemat_run = rule(
    implementation = _treemat_run_impl,
    attrs = dict(TREEMAT_ATTRS, **{
        "tool": attr.label(
            executable = True,
            cfg = "exec",
            mandatory = True,
            doc = "The program to run (its runfiles are staged with it).",
        ),
        "args": attr.string_list(
            doc = "Tool arguments. `$(location)`, `$(locations)`, `$(execpath)` and `$(execpaths)` are " +
                  "expanded over `srcs`, `outs` and `tool`, as in skylib's run_binary.",
        ),
        "srcs": attr.label_list(allow_files = True, doc = "Inputs, staged read-only into the exec dir."),
        "outs": attr.output_list(mandatory = True, doc = "Output files the tool must write."),
        "env": attr.string_dict(doc = "Extra environment variables for the tool (values location-expanded)."),
        "mnemonic": attr.string(
            default = "TreematRun",
            doc = "Action mnemonic. `--config=treemat` puts TreematRun on the worker; for another mnemonic add " +
                  "`build:treemat --strategy=<mnemonic>=worker`.",
        ),
        "progress_message": attr.string(doc = "Shown while the action runs."),
        "use_default_shell_env": attr.bool(
            doc = "Run the tool with Bazel's shell environment (PATH and `--action_env` variables; part of the " +
                  "action key), for a tool that looks programs up on PATH. Default: only `env`.",
        ),
    }),
    doc = """Runs `tool` on `srcs` producing `outs`, through treemat.

Like skylib's `run_binary`: the tool's working directory is the exec root (treemat's private exec dir on the
worker strategy, Bazel's execroot or sandbox otherwise), so pass paths with `$(location)`/`$(execpath)`.""",
)
