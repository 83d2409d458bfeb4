"""An analysis test: the files a target's copts/linkopts name through $(location) are inputs of its actions.

Bazel's own analysis-test support (`rule(analysis_test = True)`, `AnalysisTestResultInfo`), so it runs offline on
Bazel 4.2.3, where no bazel_skylib (analysistest) is at hand.
"""

def _swift_inputs_test_impl(ctx):
    # `Target.actions`: what an analysis test sees of the target under test (Bazel 4.2.3 and 7)
    actions = [a for a in ctx.attr.target_under_test.actions if a.mnemonic == ctx.attr.mnemonic]
    errors = []
    if not actions:
        errors.append("{} has no {} action".format(ctx.attr.target_under_test.label, ctx.attr.mnemonic))
    for action in actions:
        inputs = {f.path: True for f in action.inputs.to_list()}
        for file in ctx.files.expected:
            if file.path not in inputs:
                errors.append("{} action of {} does not declare {} (named in its flags)".format(
                    ctx.attr.mnemonic,
                    ctx.attr.target_under_test.label,
                    file.path,
                ))
    return [AnalysisTestResultInfo(success = not errors, message = "\n".join(errors))]

swift_inputs_test = rule(
    implementation = _swift_inputs_test_impl,
    analysis_test = True,
    attrs = {
        "target_under_test": attr.label(mandatory = True, doc = "The swift_* target whose actions are checked."),
        "mnemonic": attr.string(mandatory = True, doc = "Which of its actions: SwiftCompile or SwiftLink."),
        "expected": attr.label_list(allow_files = True, doc = "Files every such action must have as inputs."),
    },
    doc = "Fails when an action of `target_under_test` lacks one of `expected` among its inputs.",
)
