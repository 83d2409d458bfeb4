"""Public API of treemat's Bazel rules.

    load("@treemat//rules:defs.bzl", "swift_binary", "swift_library", "swift_test")

Swift rules in the style of rules_swift (`swift_library`, `swift_binary`, `swift_test`) whose every action
goes through treemat, plus the building blocks to route your own actions through it (`treemat_action`,
`treemat_args`, `TREEMAT_ATTRS`) and a generic rule (`treemat_run`, like skylib's `run_binary`).

On the worker strategy (Bazel's default for these actions; `--config=treemat` forces it and tunes the
worker) treemat stages each action's inputs as read-only files in a private exec dir; with
`--spawn_strategy=local|sandboxed` Bazel's own strategy runs the action and treemat just runs the tool in
place. Outputs are byte-identical either way.
"""

load("@treemat_swift//:defs.bzl", "SWIFT_AVAILABLE", "SWIFT_INCOMPATIBLE")
load("//rules/private:generate.bzl", _swift_module_set = "swift_module_set")
load("//rules/private:providers.bzl", _SwiftModuleInfo = "SwiftModuleInfo", _SwiftToolchainInfo = "SwiftToolchainInfo")
load("//rules/private:staged_action.bzl", _TREEMAT_ATTRS = "TREEMAT_ATTRS", _escape_tool_arg = "escape_tool_arg", _treemat_action = "treemat_action", _treemat_args = "treemat_args")
load(
    "//rules/private:swift.bzl",
    _SWIFT_TOOLCHAIN_TYPE = "SWIFT_TOOLCHAIN_TYPE",
    _swift_binary = "swift_binary",
    _swift_library = "swift_library",
    _swift_test = "swift_test",
)
load("//rules/private:toolchain.bzl", _swift_toolchain = "swift_toolchain")
load("//rules/private:treemat_run.bzl", _treemat_run = "treemat_run")

# Providers.
SwiftModuleInfo = _SwiftModuleInfo
SwiftToolchainInfo = _SwiftToolchainInfo

# The toolchain type's label string, for `toolchains = [SWIFT_TOOLCHAIN_TYPE]` in your own rules; the
# toolchain's `swift` field is a SwiftToolchainInfo.
SWIFT_TOOLCHAIN_TYPE = _SWIFT_TOOLCHAIN_TYPE

# Routing your own actions through treemat: add TREEMAT_ATTRS to your rule's attrs, then call
# treemat_action(ctx, mnemonic = ..., executable = ..., arguments = [...], inputs = ..., outputs = [...]).
TREEMAT_ATTRS = _TREEMAT_ATTRS
treemat_action = _treemat_action
treemat_args = _treemat_args
escape_tool_arg = _escape_tool_arg

treemat_run = _treemat_run
swift_toolchain = _swift_toolchain
swift_module_set = _swift_module_set

_NO_SWIFTC = ("treemat: no swiftc found (set SWIFTC, put swiftc on PATH, or install Swift under /opt/swift); " +
              "Swift target {} is incompatible and will be skipped")

def _compatible(name, target_compatible_with):
    if not SWIFT_AVAILABLE:
        print(_NO_SWIFTC.format(name))  # buildifier: disable=print
    return SWIFT_INCOMPATIBLE + target_compatible_with

def swift_library(name, target_compatible_with = [], **kwargs):
    """A Swift module (a .swiftmodule and one object file), compiled whole-module through treemat.

    Attributes: `srcs`, `deps` (other swift_library targets), `module_name` (default: the target name),
    `package_name` (default: the repository's name, so `package` declarations are shared by the modules of one
    repository), `copts` (e.g. `-enable-experimental-feature X`, `-enable-upcoming-feature Y`), `defines`
    (`#if` conditions), `swift_version` ("5", "6"), `linkopts`, `data` (runfiles), `swiftc_inputs` (extra
    compile inputs). `-c opt` compiles with `-O`, `-c dbg` with `-Onone -g`, fastbuild with `-Onone`.

    Args:
      name: target name.
      target_compatible_with: extra constraints (the target is incompatible when no swiftc was found).
      **kwargs: the attributes above and the common ones (visibility, tags, ...).
    """
    _swift_library(name = name, target_compatible_with = _compatible(name, target_compatible_with), **kwargs)

def swift_binary(name, target_compatible_with = [], **kwargs):
    """A Swift executable: a `main.swift` with top-level code, or an `@main` type in any source.

    Takes the attributes of swift_library. Modules without a `main.swift` are parsed as a library
    (`-parse-as-library`), so `@main` needs no workaround.

    Args:
      name: target name (and the executable's file name).
      target_compatible_with: extra constraints (the target is incompatible when no swiftc was found).
      **kwargs: swift_library's attributes and the common ones (args, env, visibility, ...).
    """
    _swift_binary(name = name, target_compatible_with = _compatible(name, target_compatible_with), **kwargs)

def swift_test(name, target_compatible_with = [], **kwargs):
    """A Swift test module run by `bazel test`: XCTest cases and Swift Testing `@Test`s, on Linux.

    Takes the attributes of swift_library plus `env`. A generated `@main` runner runs the Swift Testing tests
    and the XCTest cases (discovered from the module's symbol graph); any failure fails the test.
    `--test_filter` is passed to both.

    Args:
      name: target name.
      target_compatible_with: extra constraints (the target is incompatible when no swiftc was found).
      **kwargs: swift_library's attributes, `env`, and the common test ones (size, default "small"; tags...).
    """
    if "size" not in kwargs:
        kwargs["size"] = "small"
    _swift_test(name = name, target_compatible_with = _compatible(name, target_compatible_with), **kwargs)
