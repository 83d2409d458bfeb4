"""Builds the ctx.actions.run call that routes an action through treemat (public as `treemat_action`)."""

TREEMAT_ATTRS = {
    "_treemat": attr.label(
        default = Label("//tools/treemat:launcher"),
        executable = True,
        cfg = "exec",
        doc = "The treemat binary: persistent worker on the worker strategy, in-place runner otherwise.",
    ),
}

# Worker protocol and scheduling: proto (works on Bazel 4.x without the experimental JSON flag, and on 7),
# multiplexed (one worker process serves concurrent requests).
EXECUTION_REQUIREMENTS = {
    "supports-workers": "1",
    "supports-multiplex-workers": "1",
}

def escape_tool_arg(arg):
    """Writes a tool argument that starts with `@` as `@@...` (treemat turns it back into `@...`).

    Bazel's worker strategy expands every flagfile line that starts with `@` as another flagfile; `@@` lines
    pass through. Use it as `args.add_all(tool_args, map_each = escape_tool_arg)` for any argument that may
    start with `@` (`-rpath @executable_path/...`, a tool's own `@response.rsp`).

    Args:
      arg: a string or File.

    Returns:
      The argument as the flagfile must carry it.
    """
    text = arg if type(arg) == "string" else arg.path
    return "@" + text if text.startswith("@") else text

def treemat_args(ctx, outputs, output_dirs = [], env = {}):
    """Starts the request Args (the worker's flagfile): declared outputs, env, then `--`.

    Append the tool's argv to the returned Args (first the tool, then its arguments), then pass it to
    `treemat_action(args = ...)`. Arguments that may start with `@` go through `map_each = escape_tool_arg`. In tool arguments the string `{EXEC_ROOT}` becomes the directory the tool
    runs in and `{TOOL_CACHE}` a cache directory that outlives the action (e.g. for a compiler's module cache).

    Args:
      ctx: the rule context.
      outputs: declared output Files.
      output_dirs: declared output directories (tree artifacts).
      env: extra environment variables for the tool (strings; part of the action key).

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

def treemat_action(
        ctx,
        *,
        mnemonic,
        outputs,
        executable = None,
        arguments = [],
        args = None,
        inputs = [],
        output_dirs = [],
        tools = [],
        env = {},
        use_default_shell_env = False,
        progress_message = None):
    """Registers an action whose spawn goes through treemat.

    The calling rule must include `TREEMAT_ATTRS` in its attrs. Either pass `executable` (a File, a
    FilesToRunProvider, or an absolute path string of a host tool) plus `arguments` (strings and Files), or
    build the command yourself with `args = treemat_args(ctx, outputs)` followed by `args.add(tool, ...)`.

    On the worker strategy (the default for these actions, and forced by `--config=treemat`) treemat stages
    every input read-only into a private exec directory, runs the tool there and moves the declared outputs
    back; with `--spawn_strategy=local|sandboxed` the treemat binary just runs the tool in place.

    Args:
      ctx: the rule context.
      mnemonic: action mnemonic; `--strategy=<mnemonic>=worker` under `build:treemat` forces the worker.
      outputs: declared output Files (and directories, which must also be in `output_dirs`).
      executable: the tool, when `args` is not given.
      arguments: the tool's arguments (strings or Files), when `args` is not given.
      args: an Args from `treemat_args` with the tool argv appended (instead of executable/arguments).
      inputs: depset or list of input Files (staged read-only).
      output_dirs: declared output directories (tree artifacts), when `args` is not given.
      tools: extra tool inputs (Files, depsets or FilesToRunProviders; runfiles are staged too).
      env: extra environment for the tool, when `args` is not given.
      use_default_shell_env: give the action Bazel's shell environment (PATH and `--action_env`), for a tool
        that looks programs up on PATH (e.g. a compiler driver that runs the linker); it is then part of the
        action key. Default False: the tool gets only `env` (treemat and the py_binary stub start by absolute
        paths and need nothing from it).
      progress_message: shown by Bazel while the action runs.
    """
    tool_inputs = list(tools)
    if args == None:
        if executable == None:
            fail("treemat_action: pass `executable` (and `arguments`) or `args` from treemat_args()")
        args = treemat_args(ctx, [o for o in outputs if o not in output_dirs], output_dirs = output_dirs, env = env)
        if type(executable) == "string":
            args.add(executable)
        elif type(executable) == "File":
            args.add(executable)
            tool_inputs.append(executable)
        else:  # FilesToRunProvider
            args.add(executable.executable)
            tool_inputs.append(executable)
        args.add_all(arguments, map_each = escape_tool_arg)
    startup = ctx.actions.args()
    startup.add("--protocol=proto")
    ctx.actions.run(
        executable = ctx.executable._treemat,
        arguments = [startup, args],
        inputs = inputs,
        outputs = outputs,
        tools = tool_inputs,
        mnemonic = mnemonic,
        progress_message = progress_message or "{} {} (through treemat)".format(mnemonic, ctx.label),
        execution_requirements = EXECUTION_REQUIREMENTS,
        # Only where the calling rule asks for it. TREEMAT_ROOT is never passed this way: it would be part of
        # every action's key; the worker gets its root from --worker_extra_flag (see docs/bazel.md).
        use_default_shell_env = use_default_shell_env,
    )
