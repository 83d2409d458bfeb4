"""Public API of treemat's Bazel rules.

    load("//rules:defs.bzl", "swift_binary", "swift_library", "treemat_run")

Every action these rules create is routed through the treemat binary: under `--config=treemat` it runs on
the treemat persistent worker, which stages the action's inputs as read-only files in a private exec dir;
otherwise Bazel's own strategy runs it and treemat just runs the tool in place.
"""

load("@treemat_swift//:defs.bzl", "SWIFT_AVAILABLE", "SWIFT_INCOMPATIBLE")
load("//rules/private:generate.bzl", _swift_module_set = "swift_module_set")
load("//rules/private:swift.bzl", _SwiftModuleInfo = "SwiftModuleInfo", _swift_binary = "swift_binary", _swift_library = "swift_library")
load("//rules/private:treemat_run.bzl", _treemat_run = "treemat_run")

SwiftModuleInfo = _SwiftModuleInfo
treemat_run = _treemat_run
swift_module_set = _swift_module_set

_NO_SWIFTC = ("treemat: no swiftc found (set SWIFTC, put swiftc on PATH, or install Swift under /opt/swift); " +
              "Swift target {} is incompatible and will be skipped")

def swift_library(name, target_compatible_with = [], **kwargs):
    """A Swift module (see rules/private/swift.bzl); incompatible when no swiftc was found.

    Args:
      name: target name (and default module name).
      target_compatible_with: extra constraints.
      **kwargs: srcs, deps, data, module_name, and common attributes.
    """
    if not SWIFT_AVAILABLE:
        print(_NO_SWIFTC.format(name))  # buildifier: disable=print
    _swift_library(name = name, target_compatible_with = SWIFT_INCOMPATIBLE + target_compatible_with, **kwargs)

def swift_binary(name, target_compatible_with = [], **kwargs):
    """A Swift executable; incompatible when no swiftc was found.

    Args:
      name: target name.
      target_compatible_with: extra constraints.
      **kwargs: srcs, deps, data, module_name, and common attributes.
    """
    if not SWIFT_AVAILABLE:
        print(_NO_SWIFTC.format(name))  # buildifier: disable=print
    _swift_binary(name = name, target_compatible_with = SWIFT_INCOMPATIBLE + target_compatible_with, **kwargs)
