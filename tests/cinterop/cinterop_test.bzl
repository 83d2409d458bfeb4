"""Analysis tests of the Swift rules' C interop: the argv and declared inputs of SwiftCompile / SwiftLink, and
the clang module names. Bazel's own analysis-test support (`rule(analysis_test = True)`), so it runs offline on
Bazel 4.2.3 (no bazel_skylib there); `Action.argv` includes the lines of the rules' param files.
"""

load("//rules:defs.bzl", "SwiftClangModuleInfo", "derive_module_name")

# The aspect the Swift rules put on `deps`, applied here to see which module a cc_library becomes.
load("//rules/private:cc_interop.bzl", "clang_module_aspect")
load("//tests:actions.bzl", "select_action")

def _contains_run(argv, run):
    """True if the strings of `run` appear consecutively in argv."""
    for start in range(len(argv) - len(run) + 1):
        if argv[start:start + len(run)] == run:
            return True
    return False

def _c_interop_test_impl(ctx):
    bin_dir = ctx.bin_dir.path
    label = ctx.attr.target_under_test.label
    actions, errors = select_action(ctx.attr.target_under_test, ctx.attr.mnemonic, ctx.attr.output_suffix)
    for action in actions:
        argv = action.argv
        for run in ctx.attr.argv:
            words = run.replace("{bin}", bin_dir).split(" ")
            if not _contains_run(argv, words):
                errors.append("{} of {}: argv lacks `{}`".format(ctx.attr.mnemonic, label, " ".join(words)))
        for run in ctx.attr.absent_argv:
            words = run.replace("{bin}", bin_dir).split(" ")
            if _contains_run(argv, words):
                errors.append("{} of {}: argv has `{}`".format(ctx.attr.mnemonic, label, " ".join(words)))
        inputs = [f.path for f in action.inputs.to_list()]
        for path in ctx.attr.inputs:
            path = path.replace("{bin}", bin_dir)
            if path not in inputs:
                errors.append("{} of {}: {} is not a declared input".format(ctx.attr.mnemonic, label, path))
        if errors:
            errors.append("argv: {}".format(argv))
    return [AnalysisTestResultInfo(success = not errors, message = "\n".join(errors))]

c_interop_test = rule(
    implementation = _c_interop_test_impl,
    analysis_test = True,
    attrs = {
        "target_under_test": attr.label(mandatory = True, doc = "The swift_* target whose action is checked."),
        "mnemonic": attr.string(mandatory = True, doc = "SwiftCompile or SwiftLink."),
        "output_suffix": attr.string(doc = "Picks the one action with an output ending so (default: the only one)."),
        "argv": attr.string_list(doc = "Runs of arguments (space-separated, `{bin}` = bazel-bin's exec path) " +
                                       "that must appear, consecutively, in the action's argv."),
        "absent_argv": attr.string_list(doc = "Runs of arguments that must not appear."),
        "inputs": attr.string_list(doc = "Exec paths (`{bin}` = bazel-bin) that must be declared inputs."),
    },
    doc = "Fails when the action lacks one of the argument runs or declared inputs it must have.",
)

def _clang_module_name_test_impl(ctx):
    errors = []
    info = ctx.attr.target_under_test[SwiftClangModuleInfo]
    if info.module_name != ctx.attr.expected:
        errors.append("{}: module name {}, expected {}".format(
            ctx.attr.target_under_test.label,
            info.module_name,
            ctx.attr.expected,
        ))
    if bool(info.module_map) != ctx.attr.has_module_map:
        errors.append("{}: module map {}".format(ctx.attr.target_under_test.label, info.module_map))

    # rules_swift's derivation, on labels that exercise each of its rules.
    for label, expected in [
        ("//tests/cinterop:table", "tests_cinterop_table"),
        ("//:top", "top"),
        ("//a/b-c.d:e+f", "a_b_c_d_e_f"),
        ("//-x/y:z-", "x_y_z"),
        ("//9lives:cat", "_9lives_cat"),
    ]:
        derived = derive_module_name(Label(label))
        if derived != expected:
            errors.append("derive_module_name({}) = {}, expected {}".format(label, derived, expected))
    return [AnalysisTestResultInfo(success = not errors, message = "\n".join(errors))]

clang_module_name_test = rule(
    implementation = _clang_module_name_test_impl,
    analysis_test = True,
    attrs = {
        "target_under_test": attr.label(mandatory = True, aspects = [clang_module_aspect], doc = "A cc_library."),
        "expected": attr.string(mandatory = True, doc = "The clang module name it must get."),
        "has_module_map": attr.bool(default = True, doc = "Whether a module map is generated for it."),
    },
    doc = "The clang module a cc_library gets in a Swift target's deps: its name and whether it has a module map.",
)
