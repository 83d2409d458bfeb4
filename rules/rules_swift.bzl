"""treemat under rules_swift (3.x, WORKSPACE mode): rules_swift's SwiftCompile actions staged by treemat.

In WORKSPACE, declare rules_swift with this instead of `local_repository` / `http_archive` (after
`local_repository(name = "treemat", ...)`, before `swift_rules_dependencies()`, then `treemat_dependencies()`):

    load("@treemat//rules:rules_swift.bzl", "treemat_rules_swift")

    treemat_rules_swift(name = "build_bazel_rules_swift", path = "third_party/rules_swift")

Every BUILD file and rules_swift itself stay as they are; only rules_swift's worker target becomes treemat's
wrapper around it. Turning it off is that one line back to `local_repository(...)`. See docs/bazel.md
"With rules_swift".
"""

load("//rules/private:rules_swift_repo.bzl", "treemat_rules_swift_repository")

def treemat_rules_swift(name = "build_bazel_rules_swift", path = None, root_file = None, root = ""):
    """Declare rules_swift as `name`, its `//tools/worker` replaced by treemat's wrapper around the real worker.

    Args:
      name: the repository name rules_swift is used under (`build_bazel_rules_swift` unless yours differs).
      path: the rules_swift source tree (absolute, or relative to the main workspace).
      root_file: instead of `path`: a file at the root of rules_swift declared under another name, e.g.
        `@rules_swift_upstream//:BUILD` for an `http_archive(name = "rules_swift_upstream", ...)`.
      root: the treemat root the worker uses (CAS, exec dirs); default: $TREEMAT_ROOT when it reaches the
        worker, else $XDG_CACHE_HOME/treemat or ~/.cache/treemat.
    """
    treemat_rules_swift_repository(name = name, path = path, root_file = root_file, root = root)
