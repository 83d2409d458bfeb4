"""Analysis tests of the actions treemat's rules register: the whole argv (the request flagfile's lines, then the
tool's argv) and declared inputs, per `-c` mode. (Which actions get Bazel's shell environment is checked on
aquery's output by tests/e2e/test_flagfile_contract.py: `Action.env` lists only a fixed environment, and Bazel
4.2.3 cannot transition on --action_env.)

Bazel's own analysis-test support (`rule(analysis_test = True)`, `AnalysisTestResultInfo`,
`analysis_test_transition` for the mode), so it runs offline on Bazel 4.2.3, where no bazel_skylib
(`analysistest`) is at hand, and on Bazel 7. `Action.argv` includes the lines of the rules' param files.

Placeholders in expected strings: `{bin}` is the bin directory of the action's configuration (e.g.
`bazel-out/k8-opt/bin`), `{swiftc}` the registered toolchain's swiftc, `{treemat_swift}` the exec path of its
generated repository, `{main_repo}` the main repository's name (`treemat` in WORKSPACE mode, `_main` under
Bzlmod: the default `-package-name` of this repository's modules); an expected argv element `*` matches any
one argument (the exec-configuration path of a tool).
"""

load("@treemat_swift//:defs.bzl", "SWIFTC")
load("//tests:actions.bzl", "select_action")

_COMPILATION_MODE = "//command_line_option:compilation_mode"

# The generated toolchain repository's exec path: external/treemat_swift (WORKSPACE), or its canonical name
# under Bzlmod (external/_main~_repo_rules~treemat_swift on Bazel 7).
TREEMAT_SWIFT_ROOT = Label("@treemat_swift//:defs.bzl").workspace_root

def _subst(text, bin_dir, workspace_name):
    return (text.replace("{bin}", bin_dir).replace("{swiftc}", SWIFTC).replace("{treemat_swift}", TREEMAT_SWIFT_ROOT)
        .replace("{main_repo}", workspace_name))

def _matches(actual, expected):
    if len(actual) != len(expected):
        return False
    for got, want in zip(actual, expected):
        if want != "*" and got != want:
            return False
    return True

def _describe_mismatch(what, actual, expected):
    lines = ["{} differs:".format(what)]
    for index in range(max(len(actual), len(expected))):
        got = actual[index] if index < len(actual) else "<none>"
        want = expected[index] if index < len(expected) else "<none>"
        mark = "  " if want == "*" or got == want else "!!"
        lines.append("{} {}: got {} want {}".format(mark, index, repr(got), repr(want)))
    return "\n".join(lines)

def _target(ctx):
    # An attribute with a transition is a list (of one target here).
    target = ctx.attr.target_under_test
    return target[0] if type(target) == "list" else target

def _check_action(ctx, action):
    """The errors of one action against the test's expectations."""
    bin_dir = action.outputs.to_list()[0].root.path
    argv = action.argv
    errors = []

    # argv[0] is treemat itself (an exec-configuration path); then its startup flags and the request flagfile.
    separator = argv.index("--") if "--" in argv else len(argv)
    request, tool_argv = argv[1:separator + 1], argv[separator + 1:]
    if ctx.attr.request:
        expected = [_subst(word, bin_dir, ctx.workspace_name) for word in ctx.attr.request]
        if not _matches(request, expected):
            errors.append(_describe_mismatch("request (startup flags and flagfile up to `--`)", request, expected))
    if ctx.attr.tool_argv:
        expected = [_subst(word, bin_dir, ctx.workspace_name) for word in ctx.attr.tool_argv]
        if not _matches(tool_argv, expected):
            errors.append(_describe_mismatch("tool argv (after `--`)", tool_argv, expected))
    inputs = [f.path for f in action.inputs.to_list()]
    for path in ctx.attr.inputs:
        if _subst(path, bin_dir, ctx.workspace_name) not in inputs:
            errors.append("{} is not a declared input".format(_subst(path, bin_dir, ctx.workspace_name)))
    for prefix in ctx.attr.exact_inputs_under:
        prefix = _subst(prefix, bin_dir, ctx.workspace_name)
        under = sorted([path for path in inputs if path.startswith(prefix)])
        expected = sorted([_subst(path, bin_dir, ctx.workspace_name) for path in ctx.attr.inputs if _subst(path, bin_dir, ctx.workspace_name).startswith(prefix)])
        if under != expected:
            errors.append("declared inputs under {}: {}, expected {}".format(prefix, under, expected))
    return errors

def _action_test_impl(ctx):
    label = _target(ctx).label
    actions, errors = select_action(_target(ctx), ctx.attr.mnemonic, ctx.attr.output_suffix)
    for action in actions:
        errors.extend(_check_action(ctx, action))
        if errors:
            errors.insert(0, "{} of {} (-c {}):".format(ctx.attr.mnemonic, label, ctx.attr.mode))
            errors.append("argv: {}".format(action.argv))
    return [AnalysisTestResultInfo(success = not errors, message = "\n".join(errors))]

def _action_test_rule(mode):
    return rule(
        implementation = _action_test_impl,
        analysis_test = True,
        attrs = {
            "target_under_test": attr.label(
                mandatory = True,
                cfg = analysis_test_transition(settings = {_COMPILATION_MODE: mode}),
                doc = "The target whose action is checked, analysed with `-c {}`.".format(mode),
            ),
            "mode": attr.string(default = mode, doc = "The compilation mode (set by the macro; for messages)."),
            "mnemonic": attr.string(mandatory = True, doc = "SwiftCompile, SwiftLink, TreematRun, ..."),
            "output_suffix": attr.string(doc = "Picks the one action with an output ending so (default: the only one)."),
            "request": attr.string_list(doc = "The exact argv from treemat's startup flags up to the first `--`."),
            "tool_argv": attr.string_list(doc = "The exact argv after the first `--` (the tool and its arguments)."),
            "inputs": attr.string_list(doc = "Exec paths that must be declared inputs."),
            "exact_inputs_under": attr.string_list(
                doc = "Path prefixes: the declared inputs under each must be exactly those of `inputs` under it.",
            ),
        },
        doc = "Fails when the action's argv or declared inputs differ from the expected ones.",
    )

fastbuild_action_test = _action_test_rule("fastbuild")
dbg_action_test = _action_test_rule("dbg")
opt_action_test = _action_test_rule("opt")

_RULES = {
    "fastbuild": fastbuild_action_test,
    "dbg": dbg_action_test,
    "opt": opt_action_test,
}

def action_test(name, mode = "fastbuild", **kwargs):
    """One action of `target_under_test`, analysed with `-c mode`, against the expected argv and inputs.

    Args:
      name: test name.
      mode: fastbuild, dbg or opt.
      **kwargs: the attributes of the *_action_test rules.
    """
    _RULES[mode](name = name, **kwargs)
