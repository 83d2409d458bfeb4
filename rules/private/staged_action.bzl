"""Builds the ctx.actions.run call that routes an action through treemat."""

TREEMAT_ATTRS = {
    "_treemat": attr.label(
        default = Label("//tools/treemat"),
        executable = True,
        cfg = "exec",
        doc = "The treemat binary: persistent worker under --config=treemat, in-place runner otherwise.",
    ),
}

# Worker protocol and scheduling: JSON (streamed), multiplexed (one worker process, concurrent requests).
EXECUTION_REQUIREMENTS = {
    "supports-workers": "1",
    "supports-multiplex-workers": "1",
    "requires-worker-protocol": "json",
}

def treemat_request_args(ctx, outputs, output_dirs = [], env = {}):
    """Starts the request Args (the worker's flagfile): declared outputs, env, then `--`.

    Append the tool's argv to the returned Args, then pass it to `treemat_run_action`. The string
    `{EXEC_ROOT}` in tool arguments is replaced by the directory the tool runs in.

    Args:
      ctx: the rule context.
      outputs: declared output Files.
      output_dirs: declared output directories (tree artifacts).
      env: extra environment variables for the tool.

    Returns:
      An Args object, written to a multiline param file.
    """
    request = ctx.actions.args()
    request.set_param_file_format("multiline")
    request.use_param_file("@%s", use_always = True)
    request.add_all(outputs, format_each = "--output=%s")
    request.add_all(output_dirs, format_each = "--output-dir=%s", expand_directories = False)
    for key in sorted(env.keys()):
        request.add("--env={}={}".format(key, env[key]))
    request.add("--")
    return request

def treemat_run_action(ctx, *, mnemonic, request, inputs, outputs, progress_message, tools = []):
    """Registers an action whose spawn goes through treemat.

    Args:
      ctx: the rule context (its rule must include TREEMAT_ATTRS).
      mnemonic: action mnemonic; .bazelrc maps it to the worker strategy under --config=treemat.
      request: Args from treemat_request_args, with the tool argv appended.
      inputs: depset or list of input Files (staged read-only into the exec dir).
      outputs: output Files and directories.
      progress_message: shown by Bazel while the action runs.
      tools: extra tool inputs.
    """
    startup = ctx.actions.args()
    startup.add("--protocol=json")
    ctx.actions.run(
        executable = ctx.executable._treemat,
        arguments = [startup, request],
        inputs = inputs,
        outputs = outputs,
        tools = tools,
        mnemonic = mnemonic,
        progress_message = progress_message,
        execution_requirements = EXECUTION_REQUIREMENTS,
        use_default_shell_env = True,
    )
