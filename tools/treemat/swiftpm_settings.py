"""SwiftPM build settings -> rule attributes: swiftSettings, cSettings/cxxSettings and linkerSettings, the
language mode and language standards, and which platform/configuration conditions hold on Linux."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from treemat.swiftpm import Manifest, Setting, Target


@dataclass(frozen=True)
class Selected:
    """A list attribute with parts for SwiftPM's configurations: `base + select({release, default: debug})`."""

    base: tuple[str, ...]
    release: tuple[str, ...]
    debug: tuple[str, ...]


@dataclass(frozen=True)
class Keyed:
    """A dict attribute keyed by labels (`resources`: file -> its path in the bundle)."""

    items: tuple[tuple[str, str], ...]

    def __bool__(self) -> bool:
        return bool(self.items)


AttrValue = str | tuple[str, ...] | Selected | Keyed

LINUX = "linux"
SWIFT_VERSIONS = ("4", "4.2", "5", "6")  # what swiftc's -swift-version takes
CXX_SUFFIXES = frozenset({".cc", ".cpp", ".cxx", ".c++"})


def applies_on_linux(platforms: Sequence[str]) -> bool:
    """Whether a `.when(platforms:)` condition holds on Linux."""
    return not platforms or LINUX in platforms


def dropped(platforms: Sequence[str], config: str | None) -> str:
    """Why a conditioned setting or dependency was left out."""
    if config is not None:
        return f"only for the {config} configuration: dropped"
    return f"only for {', '.join(platforms)} (not linux): dropped"


def swift_language_version(manifest: Manifest, target: Target) -> str:
    """The language mode SwiftPM compiles `target` in: its setting, the package's list, or the tools version's."""
    for setting in target.settings:
        if setting.kind in ("swiftLanguageMode", "swiftLanguageVersion") and setting.values:
            return setting.values[0]
    supported = [v for v in manifest.swift_language_versions if v in SWIFT_VERSIONS]
    if supported:
        return max(supported, key=lambda v: tuple(int(p) for p in v.split(".")))
    major_minor = tuple(manifest.tools_version[:2])
    return "6" if major_minor >= (6, 0) else "5" if major_minor >= (5, 0) else "4.2" if major_minor >= (4, 2) else "4"


_SWIFT_FLAGS = {
    "enableUpcomingFeature": ("-enable-upcoming-feature",),
    "enableExperimentalFeature": ("-enable-experimental-feature",),
    "defaultIsolation": ("-default-isolation",),
}


def swift_setting(setting: Setting, attrs: dict[str, list[str]]) -> str | None:
    """Translate one swift/linker setting into attrs; returns why not, or None."""
    kind, values = setting.kind, list(setting.values)
    if setting.tool == "linker":
        if kind == "linkedLibrary":
            attrs["linkopts"] += [f"-l{v}" for v in values]
        elif kind == "unsafeFlags":
            attrs["linkopts"] += values
        elif kind == "linkedFramework":
            return f"{setting.describe()}: frameworks are Apple-only: dropped"
        else:
            return f"{setting.describe()}: not translated"
    elif setting.tool != "swift":
        # SwiftPM hands a Swift target's cSettings/cxxSettings to its clang importer (`-Xcc`)
        if kind not in ("define", "unsafeFlags"):
            return f"{setting.describe()}: C settings of a Swift target are not translated"
        flags = [f"-D{v}" for v in values] if kind == "define" else values
        attrs["copts"] += [arg for flag in flags for arg in ("-Xcc", flag)]
    elif kind == "define":
        attrs["defines"] += values
    elif kind == "unsafeFlags":
        attrs["copts"] += values
    elif kind in _SWIFT_FLAGS:
        for value in values:
            attrs["copts"] += [*_SWIFT_FLAGS[kind], value]
    elif kind == "interoperabilityMode":
        attrs["copts"] += ["-cxx-interoperability-mode=default"] if values[:1] == ["Cxx"] else []
    elif kind in ("swiftLanguageMode", "swiftLanguageVersion"):
        pass  # swift_language_version()
    else:
        return f"{setting.describe()}: not translated"
    return None


def c_setting(setting: Setting, target_path: str, attrs: dict[str, list[str]]) -> str | None:
    """Translate one c/cxx/linker setting of a C target into attrs; returns why not, or None."""
    kind, values = setting.kind, list(setting.values)
    if setting.tool == "swift":
        return None  # SwiftPM ignores swiftSettings of a C target too (swift-nio sets them on every target)
    if setting.tool == "linker":
        if kind in ("linkedLibrary", "unsafeFlags"):
            attrs["linkopts"] += [f"-l{v}" for v in values] if kind == "linkedLibrary" else values
            return None
        if kind == "linkedFramework":
            return f"{setting.describe()}: frameworks are Apple-only: dropped"
        return f"{setting.describe()}: not translated for a C target"
    if kind == "define":
        attrs["local_defines"] += [v.replace("$", "$$") for v in values]
    elif kind == "headerSearchPath":
        attrs["includes"] += [f"{target_path}/{v}".rstrip("/") for v in values]
    elif kind == "unsafeFlags":
        attrs["copts"] += [v.replace("$", "$$") for v in values]
    else:
        return f"{setting.describe()}: not translated"
    return None


def language_standard_copts(manifest: Manifest, sources: Sequence[str]) -> tuple[list[str], str | None]:
    """`-std=...` for a C target from the package's cLanguageStandard / cxxLanguageStandard, or why not."""
    suffixes = {Path(p).suffix for p in sources}
    has_c, has_cxx = ".c" in suffixes, bool(suffixes & CXX_SUFFIXES)
    wanted = [std for has, std in ((has_c, manifest.c_standard), (has_cxx, manifest.cxx_standard)) if has and std]
    if has_c and has_cxx and wanted:
        return [], "language standard: C and C++ sources in one target share one copts: not translated"
    return [f"-std={standard}" for standard in wanted], None
