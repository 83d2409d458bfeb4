"""Providers of treemat's Swift rules."""

SwiftToolchainInfo = provider(
    doc = "The Swift compiler the rules use, from the toolchain of type //rules:swift_toolchain_type.",
    fields = {
        "swiftc": "Absolute path of the swiftc driver on the host (a string: swiftc finds its runtime and " +
                  "resource directory relative to its own location, so it is run in place, not staged).",
        "version": "The compiler's version, e.g. \"6.3.1\" (empty when no swiftc was found).",
        "identity": "A File: `swiftc --version` plus sha256 of the driver and frontend binaries. It is an " +
                    "input of every Swift action, so replacing the compiler reruns them.",
    },
)

SwiftModuleInfo = provider(
    doc = "A compiled Swift module (what swift_library returns and swift_binary/swift_test consume).",
    fields = {
        "module_name": "The module name (what `import` uses).",
        "swiftmodule": "The .swiftmodule File.",
        "transitive_swiftmodules": "depset of .swiftmodule Files of this module and its dependencies.",
        "transitive_objects": "depset of object Files to link, this module's included.",
        "transitive_linkopts": "depset of linker flags (strings) of this module and its dependencies.",
        "transitive_link_inputs": "depset of Files named in those linker flags ($(location) of a file of " +
                                  "swiftc_inputs or data): inputs of every link the flags reach.",
    },
)
