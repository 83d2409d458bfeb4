"""Analysis test of what a target puts in its runfiles (Bazel's own `analysis_test = True`: offline on 4.2.3)."""

def _runfiles_test_impl(ctx):
    files = ctx.attr.target_under_test[DefaultInfo].default_runfiles.files.to_list()
    runfiles = [f.short_path for f in files]
    directories = [f.short_path for f in files if f.is_directory]
    errors = ["{} is not in the runfiles".format(p) for p in ctx.attr.present if p not in runfiles]
    errors += ["{} is not a directory of the runfiles".format(p) for p in ctx.attr.directories if p not in directories]
    errors += ["{} is in the runfiles".format(p) for p in ctx.attr.absent if p in runfiles]
    if errors:
        errors.append("runfiles: {}".format(runfiles))
    return [AnalysisTestResultInfo(success = not errors, message = "\n".join(errors))]

runfiles_test = rule(
    implementation = _runfiles_test_impl,
    analysis_test = True,
    attrs = {
        "target_under_test": attr.label(mandatory = True),
        "present": attr.string_list(doc = "Runfiles paths (short paths) that must be there."),
        "absent": attr.string_list(doc = "Runfiles paths that must not be there."),
        "directories": attr.string_list(doc = "Runfiles paths that must be there as one directory (a tree artifact)."),
    },
    doc = "Fails when a path is missing from the target's runfiles, or one that must not be there is.",
)
