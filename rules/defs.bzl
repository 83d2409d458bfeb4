"""Public API of treemat's Bazel rules.

    load("@treemat//rules:defs.bzl", "swift_binary", "swift_c_module", "swift_library", "swift_test")

Swift rules in the style of rules_swift (`swift_library`, `swift_binary`, `swift_test`, `swift_c_module`; a
`cc_library` in `deps` is a clang module, as with rules_swift's clang-module aspect) whose every action
goes through treemat, plus the building blocks to route your own actions through it (`treemat_action`,
`treemat_args`, `TREEMAT_ATTRS`) and a generic rule (`treemat_run`, like skylib's `run_binary`).

On the worker strategy (Bazel's default for these actions; `--config=treemat` forces it and tunes the
worker) treemat stages each action's inputs as read-only files in a private exec dir; with
`--spawn_strategy=local|sandboxed` Bazel's own strategy runs the action and treemat just runs the tool in
place. Outputs are byte-identical either way.
"""

load("@treemat_swift//:defs.bzl", "SWIFT_AVAILABLE", "SWIFT_INCOMPATIBLE")
load("//rules/private:cc_interop.bzl", _MODULE_NAME_TAG = "MODULE_NAME_TAG", _derive_module_name = "derive_module_name")
load(
    "//rules/private:providers.bzl",
    _SwiftClangModuleInfo = "SwiftClangModuleInfo",
    _SwiftModuleInfo = "SwiftModuleInfo",
    _SwiftToolchainInfo = "SwiftToolchainInfo",
)
load("//rules/private:staged_action.bzl", _TREEMAT_ATTRS = "TREEMAT_ATTRS", _escape_tool_arg = "escape_tool_arg", _treemat_action = "treemat_action", _treemat_args = "treemat_args")
load(
    "//rules/private:swift.bzl",
    _NO_SWIFTC = "NO_SWIFTC",
    _SWIFT_TOOLCHAIN_TYPE = "SWIFT_TOOLCHAIN_TYPE",
    _swift_binary = "swift_binary",
    _swift_library = "swift_library",
    _swift_test = "swift_test",
)
load("//rules/private:swift_c_module.bzl", _swift_c_module = "swift_c_module")
load("//rules/private:toolchain.bzl", _swift_toolchain = "swift_toolchain")
load("//rules/private:treemat_run.bzl", _treemat_run = "treemat_run")

# Providers.
SwiftModuleInfo = _SwiftModuleInfo
SwiftClangModuleInfo = _SwiftClangModuleInfo
SwiftToolchainInfo = _SwiftToolchainInfo

# C interop: `tags = [SWIFT_MODULE_TAG + "Name"]` (i.e. "swift_module=Name") names a cc_library's clang module;
# without it the name is derive_module_name(label), rules_swift's derivation ("pkg/path:name" -> "pkg_path_name").
SWIFT_MODULE_TAG = _MODULE_NAME_TAG
derive_module_name = _derive_module_name

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

def _compatible(name, target_compatible_with):
    if not SWIFT_AVAILABLE:
        print(_NO_SWIFTC.format(name) + " (incompatible: skipped by wildcard builds)")  # buildifier: disable=print
    return SWIFT_INCOMPATIBLE + target_compatible_with

def swift_library(name, target_compatible_with = [], **kwargs):
    """A Swift module (a .swiftmodule, its .swiftdoc and one object file), compiled whole-module through treemat.

    Attributes: `srcs`, `deps`, `module_name` (default: the target name), `package_name` (default: the
    repository's name, so `package` declarations are shared by the modules of one repository), `copts` (e.g.
    `-enable-experimental-feature X`, `-enable-upcoming-feature Y`), `defines` (`#if` conditions),
    `swift_version` ("5", "6"), `linkopts`, `data` (runfiles), `swiftc_inputs` (extra compile inputs).
    `-c opt` compiles with `-O`, `-c dbg` with `-Onone -g`, fastbuild with `-Onone`.

    `deps` takes swift_library modules, `cc_library` targets (anything with CcInfo) and swift_c_module
    targets. A cc_library gets a generated module map listing its `hdrs` (`textual_hdrs` excluded; the
    `_virtual_includes` copies under strip_include_prefix/include_prefix) with `export *`, named by a
    `swift_module=NAME` tag on it, else after its label (`//pkg/path:name` -> `pkg_path_name`, as rules_swift
    derives it). The whole transitive C compilation context (headers, module
    maps, includes, defines) reaches this module's compile and every compile that imports it, across
    repositories; the C/C++ libraries are linked into every binary and test that reaches them.

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
    and the XCTest cases (discovered from the module's symbol graph, which the test module's compile writes
    to a temporary directory of its own); any failure fails the test. `--test_filter` is passed to both. The
    runner is compiled with everything the test module's compile gets (copts, swiftc_inputs, Swift and C
    modules), and the test links the C/C++ libraries its deps reach.

    Args:
      name: target name.
      target_compatible_with: extra constraints (the target is incompatible when no swiftc was found).
      **kwargs: swift_library's attributes, `env`, and the common test ones (size, default "small"; tags...).
    """
    if "size" not in kwargs:
        kwargs["size"] = "small"
    _swift_test(name = name, target_compatible_with = _compatible(name, target_compatible_with), **kwargs)

def swift_c_module(name, module_map, module_name = None, deps = [], **kwargs):
    """A C module declared by a package's own module map, for Swift targets' `deps` (rules_swift's older
    spelling; `swift_interop_hint` needs `aspect_hints`, which Bazel 4.2.3 does not have).

        cc_library(name = "CSystem_lib", hdrs = glob(["include/*.h"]), srcs = glob(["*.c"]), includes = ["include"])
        swift_c_module(name = "CSystem", module_map = "include/module.modulemap", deps = [":CSystem_lib"])
        swift_library(name = "SystemPackage", srcs = [...], deps = [":CSystem"])

    Args:
      name: target name.
      module_map: the module map file (e.g. a SwiftPM C target's `include/module.modulemap`); its header paths
        are relative to its own directory, and each header it names must be in the `hdrs` of a `deps` library.
      module_name: the module the map declares (its `module NAME`); default: `name`.
      deps: cc_library targets with the headers and the code (linked into every binary and test that reaches
        this module, through any number of Swift modules).
      **kwargs: the common attributes (visibility, tags, ...).
    """
    _swift_c_module(name = name, module_map = module_map, module_name = module_name or name, deps = deps, **kwargs)
