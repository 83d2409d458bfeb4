"""A SwiftPM target's files, classified (Swift, C, C with its own module map, a system library's module map),
and the package as the translation sees it. What cannot be laid out becomes one `Untranslated` line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from treemat.swiftpm import (
    C_SUFFIXES,
    HEADER_SUFFIXES,
    MODULE_MAP,
    OBJC_SUFFIXES,
    SWIFT_SUFFIXES,
    Manifest,
    PackageImportError,
    Target,
    bundle_path,
    excluded_files,
    target_dir,
    target_files,
)

# Characters a Bazel 4.x label's target name may hold (no quote, backslash or colon). A space is one of them
# (swift-collections, swift-argument-parser and swift-atomics have sources like `Unmanaged extensions.swift`),
# except at either end of a path segment; runfiles (`data`) take none: Bazel 4's runfiles manifest is
# split at spaces (a resource bundle can: it is one directory there).
_LABEL_SAFE = re.compile(r"[A-Za-z0-9!%\-@^_#$&'()*+,;<=>?\[\]{|}~/. ]+")
CC_SUFFIX = "_cc"  # the cc_library behind a swift_c_module


@dataclass(frozen=True)
class Untranslated:
    """One item `treemat import` could not translate (or translated with a stated loss)."""

    package: str
    target: str
    item: str

    def line(self) -> str:
        """`package/target: item`."""
        return f"{self.package}/{self.target}: {self.item}" if self.target else f"{self.package}: {self.item}"


@dataclass(frozen=True)
class TargetLayout:
    """What a target is made of on disk, classified."""

    kind: str  # swift | c | c_module_map
    sources: tuple[str, ...] = ()  # package-relative; C: sources and private headers
    headers: tuple[str, ...] = ()  # C: public headers
    include_dir: str | None = None  # C: the public headers directory, package-relative, if it exists
    module_map: str | None = None
    resources: tuple[str, ...] = ()
    bundle: tuple[tuple[str, str], ...] = ()  # (resource, its path in the bundle): Bundle.module (resources.bzl)
    textual: tuple[str, ...] = ()  # C: the target's other files (`textual_hdrs`: included, never compiled)
    # A test's excluded files (swift-argument-parser's Snapshots/), which its tests read beside `#filePath`
    # as under `swift test`: runfiles too (`#filePath` is execroot-relative, the test runs in its runfiles).
    test_files: tuple[str, ...] = ()


@dataclass
class PackageInfo:
    """A package as the translation sees it: identity, repository name ("" = the main one), manifest, layouts."""

    identity: str
    repo: str
    manifest: Manifest | None
    directory: Path | None = None
    layouts: dict[str, TargetLayout] = field(default_factory=dict)

    def label(self, target: str, *, cc: bool = False, local: bool = False) -> str:
        """The label of `target` (from its own package if `local`); `cc=True`: the cc_library behind a C module."""
        layout = self.layouts.get(target)
        name = target + CC_SUFFIX if cc and layout is not None and layout.kind == "c_module_map" else target
        return f"@{self.repo}//:{name}" if self.repo and not local else f":{name}"


def label_safe(path: str, *, runfile: bool = False) -> bool:
    """Whether a package-relative file path can be written as a Bazel label (4.x rules); `runfile`: and be in
    a runfiles tree."""
    parts = path.split("/")
    return (
        bool(_LABEL_SAFE.fullmatch(path))
        and not path.startswith("@")
        and all(p not in ("", ".", "..") and p == p.strip(" ") for p in parts)
        and not (runfile and " " in path)
    )


def _in_bazel_package(path: str, package_dir: Path) -> str | None:
    """The nested Bazel package (a directory with a BUILD file) `path` lies in, if any."""
    parent = Path(path).parent
    while parent != Path("."):
        if (package_dir / parent / "BUILD").exists() or (package_dir / parent / "BUILD.bazel").exists():
            return parent.as_posix()
        parent = parent.parent
    return None


def layout_target(package_dir: Path, target: Target, report: list[str]) -> TargetLayout | None:
    """Classify a target from its files (None: not translatable; the reasons appended to `report`)."""
    if target.type not in ("regular", "executable", "test", "system"):
        report.append(f"{target.type} target not translated")
        return None
    if not label_safe(target.name) or "/" in target.name or " " in target.name:  # no space in an output's name
        report.append(f"target name {target.name!r} is not a valid Bazel target name: not translated")
        return None
    sources, resources = target_files(package_dir, target)
    if target.type == "system":
        return _system_layout(package_dir, target, sources, report)
    for path in sources + resources:
        if not label_safe(path):
            report.append(f"file {path!r}: not expressible as a Bazel label: left out")
        elif (nested := _in_bazel_package(path, package_dir)) is not None:
            report.append(f"{nested} has a BUILD file (a Bazel package of its own): target not translated")
            return None
    sources = [p for p in sources if label_safe(p)]
    # A resource path with a space can be in the bundle (one directory in the runfiles), not a runfile itself.
    labelled_resources = [p for p in resources if label_safe(p)]
    kept_resources = tuple(p for p in labelled_resources if label_safe(p, runfile=True))
    if spaced := [p for p in labelled_resources if p not in kept_resources]:
        report.append(
            f"resource {spaced[0]!r}"
            + (f" and {len(spaced) - 1} more" if len(spaced) > 1 else "")
            + ": in the bundle only, not in the runfiles (`data`): Bazel 4's runfiles manifest cannot hold a space"
        )
    suffix = {p: Path(p).suffix for p in sources}
    swift = [p for p in sources if suffix[p] in SWIFT_SUFFIXES]
    objc = [p for p in sources if suffix[p] in OBJC_SUFFIXES]
    c_family = [p for p in sources if suffix[p] in C_SUFFIXES | HEADER_SUFFIXES]
    if objc:
        report.append(f"Objective-C sources ({len(objc)}) left out: no Objective-C runtime on Linux")
    if swift and c_family and any(suffix[p] in C_SUFFIXES for p in c_family):
        report.append("mixed Swift and C sources in one target: not translated")
        return None
    if swift:
        test_files = excluded_files(package_dir, target) if target.type == "test" else []
        kept_test_files = tuple(
            p for p in test_files if label_safe(p, runfile=True) and _in_bazel_package(p, package_dir) is None
        )
        if left_out := [p for p in test_files if p not in kept_test_files]:
            report.append(
                f"excluded file {left_out[0]!r}"
                + (f" and {len(left_out) - 1} more" if len(left_out) > 1 else "")
                + ": not expressible as a runfile (or in a Bazel package of its own): not in the test's data"
            )
        bundle = tuple((p, b) for p in labelled_resources if (b := bundle_path(package_dir, target, p)) is not None)
        return TargetLayout("swift", tuple(swift), resources=kept_resources, bundle=bundle, test_files=kept_test_files)
    if not c_family:
        report.append("no Swift or C sources: not translated")
        return None
    if target.type != "regular":
        report.append(f"C {target.type} target not translated (only C library targets are)")
        return None
    public = target_dir(package_dir, target) / (target.public_headers_path or "include")
    public_rel = public.relative_to(package_dir).as_posix()
    headers = tuple(p for p in c_family if suffix[p] in HEADER_SUFFIXES and p.startswith(public_rel + "/"))
    private = tuple(p for p in c_family if p not in headers)
    module_map = f"{public_rel}/{MODULE_MAP}" if (public / MODULE_MAP).is_file() else None
    known = C_SUFFIXES | HEADER_SUFFIXES | OBJC_SUFFIXES | SWIFT_SUFFIXES
    # anything else of the target's (`#include "x.macros"`): on disk under SwiftPM, declared here
    textual = tuple(p for p in sources if suffix[p] not in known and Path(p).name != MODULE_MAP)
    include_dir = public_rel if public.is_dir() else None
    kind = "c_module_map" if module_map else "c"
    return TargetLayout(kind, private, headers, include_dir, module_map, kept_resources, textual=textual)


def layout_package(info: PackageInfo, report: list[Untranslated]) -> None:
    """Fill `info.layouts` from its directory; untranslatable targets reported and left out."""
    assert info.manifest is not None and info.directory is not None
    for target in info.manifest.targets:
        reasons: list[str] = []
        try:
            layout = layout_target(info.directory, target, reasons)
        except PackageImportError as exc:
            layout, reasons = None, [str(exc)]
        report.extend(Untranslated(info.identity, target.name, reason) for reason in reasons)
        if layout is not None:
            info.layouts[target.name] = layout


def _system_layout(package_dir: Path, target: Target, files: list[str], report: list[str]) -> TargetLayout | None:
    """A system library target: its directory's module map over its headers (a `swift_c_module`), as SwiftPM
    hands it to the compiler; the headers it includes from the system are found on the default include path."""
    directory = target_dir(package_dir, target).relative_to(package_dir).as_posix()
    module_map = f"{directory}/{MODULE_MAP}"
    if module_map not in files:
        report.append(f"system library target without {module_map}: not translated")
        return None
    if target.pkg_config:
        report.append(f"pkgConfig {target.pkg_config!r}: its flags not translated (the system's default paths used)")
    headers = tuple(p for p in files if Path(p).suffix in HEADER_SUFFIXES and label_safe(p))
    return TargetLayout("c_module_map", headers=headers, include_dir=directory, module_map=module_map)
