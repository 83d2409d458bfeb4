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
        "transitive_swiftdocs": "depset of the .swiftdoc Files swiftc writes beside those .swiftmodules " +
                                "(declared outputs, and inputs of every compile that imports them).",
        "transitive_objects": "depset of object Files to link, this module's included.",
        "transitive_linkopts": "depset of linker flags (strings) of this module and its dependencies.",
        "transitive_link_inputs": "depset of Files named in those linker flags ($(location) of a file of " +
                                  "swiftc_inputs or data): inputs of every link the flags reach.",
        "cc_info": "A CcInfo merging every C/C++ library this module reaches (through cc_library, " +
                   "swift_c_module and swift_library deps): its compilation context reaches every compile " +
                   "that imports this module, its linking context every link.",
        "transitive_module_maps": "depset of the clang module map Files of those C modules (generated for a " +
                                  "plain cc_library, a swift_c_module's own): `-Xcc -fmodule-map-file=` each.",
        "links_cxx": "True when one of those libraries has C++ sources (links add -lstdc++).",
        "superseded_module_maps": "depset of generated module maps that a swift_c_module's own module map " +
                                  "replaces (those of the libraries it wraps): left out of every compile " +
                                  "that both reach (one header in two modules is an error).",
    },
)

SwiftClangModuleInfo = provider(
    doc = """A C (or C++ with a C interface) module that Swift can `import`: what swift_c_module returns and
what the clang-module aspect of the Swift rules' `deps` gives a plain cc_library. The target's CcInfo carries
its headers, include paths, defines and libraries.""",
    fields = {
        "module_name": "The clang module name (what `import` uses).",
        "module_map": "The module map File declaring it, or None (a cc_library without public headers: " +
                      "linked, not importable).",
        "deps_module_maps": "depset of the module maps of the C modules it depends on (transitively), " +
                            "its own excluded.",
        "links_cxx": "True when this library or one it depends on has C++ sources.",
        "superseded_module_maps": "depset of the generated module maps that swift_c_modules it reaches " +
                                  "replace with their own (see SwiftModuleInfo).",
    },
)
