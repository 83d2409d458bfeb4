"""SwiftPM manifests as `swift package dump-package` prints them, and the files of each target on disk.

The model `treemat import` translates: `parse_manifest(json)` -> `Manifest`; `dump_package(dir)` runs swift
offline (no dependency resolution); `target_files(package_dir, target)` lists a target's files the way SwiftPM
finds them (default paths, `path`, `sources`, `exclude`, `resources`, hidden files skipped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treemat.errors import TreematError

SWIFT_SUFFIXES = frozenset({".swift"})
C_SUFFIXES = frozenset({".c", ".cc", ".cpp", ".cxx", ".c++", ".s", ".S"})
OBJC_SUFFIXES = frozenset({".m", ".mm"})
HEADER_SUFFIXES = frozenset({".h", ".hh", ".hpp", ".hxx", ".h++", ".inc", ".def"})
MODULE_MAP = "module.modulemap"
# Where SwiftPM looks for a target without `path`, in this order.
SOURCE_ROOTS = ("Sources", "Source", "src", "srcs")
TEST_ROOTS = ("Tests", "Sources", "Source", "src", "srcs")
SWIFT_BINARY = "/opt/swift/usr/bin/swift"


class PackageImportError(TreematError):
    """A package cannot be imported (no manifest, swift failed, malformed dump, a file it must not overwrite)."""


@dataclass(frozen=True)
class Setting:
    """One entry of cSettings/cxxSettings/swiftSettings/linkerSettings."""

    tool: str  # c | cxx | swift | linker
    kind: str  # define, headerSearchPath, unsafeFlags, enableUpcomingFeature, swiftLanguageMode, linkedLibrary...
    values: tuple[str, ...]
    platforms: tuple[str, ...] = ()  # empty: every platform
    config: str | None = None  # debug | release | None

    def describe(self) -> str:
        """`swiftSettings define FOO` style, for messages."""
        return f"{self.tool}Settings {self.kind} {' '.join(self.values)}".strip()


@dataclass(frozen=True)
class TargetDependency:
    """`.target(name:)`, `.product(name:package:)` or a plain string (byName)."""

    kind: str  # byName | target | product
    name: str
    package: str | None = None
    platforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """One target of a manifest."""

    name: str
    type: str  # regular | executable | test | system | binary | plugin | macro
    path: str | None = None
    sources: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    public_headers_path: str | None = None
    resources: tuple[tuple[str, str], ...] = ()  # (rule, path)
    dependencies: tuple[TargetDependency, ...] = ()
    settings: tuple[Setting, ...] = ()
    pkg_config: str | None = None  # a system library's pkg-config name


@dataclass(frozen=True)
class PackageDependency:
    """A package this one depends on: its identity and where SwiftPM would get it."""

    identity: str
    kind: str  # fileSystem | sourceControl | registry
    location: str  # path, URL or registry identity


@dataclass(frozen=True)
class Manifest:
    """What `treemat import` needs of a Package.swift."""

    name: str
    tools_version: tuple[int, ...]
    swift_language_versions: tuple[str, ...] = ()
    dependencies: tuple[PackageDependency, ...] = ()
    products: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # library/executable product -> targets
    targets: tuple[Target, ...] = ()
    c_standard: str | None = None  # cLanguageStandard, e.g. gnu11
    cxx_standard: str | None = None  # cxxLanguageStandard, e.g. c++17

    def target(self, name: str) -> Target | None:
        """The target called `name`, if any."""
        return next((t for t in self.targets if t.name == name), None)


def c99name(name: str) -> str:
    """SwiftPM's module name for a target name: non-identifier characters become `_`, no leading digit."""
    module = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"_{module}" if not module or module[0].isdigit() else module


def _values(kind_body: Any) -> tuple[str, ...]:
    value = kind_body.get("_0") if isinstance(kind_body, Mapping) else kind_body
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    if isinstance(value, Mapping):  # e.g. interoperabilityMode(.Cxx) in some toolchains: {"Cxx": {}}
        return tuple(str(k) for k in value)
    return (str(value),)


def _condition(raw: Any) -> tuple[tuple[str, ...], str | None]:
    if not isinstance(raw, Mapping):
        return (), None
    return tuple(str(p) for p in raw.get("platformNames") or ()), raw.get("config")


def _setting(raw: Mapping[str, Any]) -> Setting:
    platforms, config = _condition(raw.get("condition"))
    if "kind" in raw:  # toolchains >= 5.9: {"kind": {"define": {"_0": "X"}}, "tool": "swift"}
        ((kind, body),) = raw["kind"].items()
        values = _values(body)
    else:  # older: {"name": "define", "value": ["X"], "tool": "swift"}
        kind, values = str(raw["name"]), tuple(str(v) for v in raw.get("value") or ())
    return Setting(str(raw["tool"]), str(kind), values, platforms, config)


def _dependency(raw: Mapping[str, Any]) -> TargetDependency:
    ((kind, args),) = raw.items()
    if kind == "product":
        name, package, condition = args[0], args[1], args[3] if len(args) > 3 else None
    else:
        name, package, condition = args[0], None, args[1] if len(args) > 1 else None
    return TargetDependency(str(kind), str(name), package, _condition(condition)[0])


def _package_dependency(raw: Mapping[str, Any]) -> PackageDependency:
    ((kind, (body, *_)),) = raw.items()
    location: Any = body.get("path") or body.get("location") or body.get("identity")
    if isinstance(location, Mapping):  # sourceControl: {"remote": [{"urlString": ...}]} or {"local": [path]}
        ((where, entries),) = location.items()
        first = entries[0]
        location = first.get("urlString", str(first)) if isinstance(first, Mapping) else first
        kind = "fileSystem" if where == "local" else kind
    return PackageDependency(str(body["identity"]).lower(), str(kind), str(location))


def _target(raw: Mapping[str, Any]) -> Target:
    resources = []
    for resource in raw.get("resources") or ():
        rule = resource.get("rule")
        resources.append((next(iter(rule)) if isinstance(rule, Mapping) else str(rule), str(resource["path"])))
    sources = raw.get("sources")
    return Target(
        name=str(raw["name"]),
        type=str(raw.get("type", "regular")),
        path=raw.get("path"),
        sources=None if sources is None else tuple(str(s) for s in sources),
        exclude=tuple(str(e) for e in raw.get("exclude") or ()),
        public_headers_path=raw.get("publicHeadersPath"),
        resources=tuple(resources),
        dependencies=tuple(_dependency(d) for d in raw.get("dependencies") or ()),
        settings=tuple(_setting(s) for s in raw.get("settings") or ()),
        pkg_config=raw.get("pkgConfig"),
    )


def parse_manifest(data: Mapping[str, Any]) -> Manifest:
    """A `swift package dump-package` JSON document -> Manifest (PackageImportError if it is not one)."""
    try:
        version = data.get("toolsVersion") or {}
        tools = tuple(int(part) for part in str(version.get("_version", "5.0.0")).split("."))
        products = {}
        for product in data.get("products") or ():
            kind = next(iter(product.get("type") or {"library": None}))
            if kind in ("library", "executable"):
                products[str(product["name"])] = tuple(str(t) for t in product.get("targets") or ())
        return Manifest(
            name=str(data["name"]),
            tools_version=tools,
            swift_language_versions=tuple(str(v) for v in data.get("swiftLanguageVersions") or ()),
            dependencies=tuple(_package_dependency(d) for d in data.get("dependencies") or ()),
            products=products,
            targets=tuple(_target(t) for t in data.get("targets") or ()),
            c_standard=data.get("cLanguageStandard"),
            cxx_standard=data.get("cxxLanguageStandard"),
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise PackageImportError(f"not a `swift package dump-package` document: {type(exc).__name__}: {exc}") from None


def find_swift() -> str:
    """The `swift` driver: $SWIFT, the one beside $SWIFTC, PATH, then /opt/swift (as the rules find swiftc)."""
    candidates = [os.environ.get("SWIFT", "")]
    if os.environ.get("SWIFTC"):
        candidates.append(str(Path(os.environ["SWIFTC"]).with_name("swift")))
    candidates += [shutil.which("swift") or "", SWIFT_BINARY]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise PackageImportError("no swift found (set SWIFT, put swift on PATH, or install Swift under /opt/swift)")


def dump_package(directory: Path, swift: str | None = None) -> dict[str, Any]:
    """`swift package dump-package` of `directory`: offline, nothing resolved or fetched."""
    if not (directory / "Package.swift").is_file():
        raise PackageImportError(f"{directory}: no Package.swift")
    command = [swift or find_swift(), "package", "--package-path", str(directory), "dump-package"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "error:" in line] or [run.stderr.strip()]
        # the compiler's diagnostic (Package.swift:LINE:COL: error: ...) says more than SwiftPM's summary
        reason = next((e for e in errors if "Package.swift:" in e and ": error:" in e), errors[0])
        reason = re.sub(r" \(compiled with: .*", "", reason)
        raise PackageImportError(f"{directory}: swift package dump-package failed: {reason[:500]}")
    loaded: dict[str, Any] = json.loads(run.stdout)
    return loaded


def target_dir(package_dir: Path, target: Target) -> Path:
    """The target's directory: `path`, else the first of SwiftPM's default roots that has it."""
    if target.path is not None:
        return package_dir / target.path
    roots = ("Plugins",) if target.type == "plugin" else TEST_ROOTS if target.type == "test" else SOURCE_ROOTS
    for root in roots:
        if (package_dir / root / target.name).is_dir():
            return package_dir / root / target.name
    return package_dir / roots[0] / target.name


def bundle_path(package_dir: Path, target: Target, resource: str) -> str | None:
    """Where a resource file (package-relative) lands in the target's bundle, as SwiftPM puts it: `.process`
    flattens (the file's name at the top), `.copy(path)` keeps `path`'s last component and what is under it;
    None for another rule (`.embedInCode`: no bundle)."""
    relative = (package_dir / resource).relative_to(target_dir(package_dir, target)).as_posix()
    for rule, declared in target.resources:
        declared = declared.rstrip("/")
        if _under(relative, [declared]):
            if rule == "process":
                return relative.rsplit("/", 1)[-1]
            if rule == "copy":
                return "/".join([declared.rsplit("/", 1)[-1], *relative[len(declared) :].split("/")[1:]])
            return None
    return None


def _under(relative: str, prefixes: Sequence[str]) -> bool:
    return any(relative == p or relative.startswith(p.rstrip("/") + "/") for p in prefixes)


def target_files(package_dir: Path, target: Target) -> tuple[list[str], list[str]]:
    """(sources, resources): the target's files, relative to package_dir, sorted.

    Hidden files and directories are skipped; `exclude` and (if given) `sources` are honoured; files under a
    declared resource path are resources, not sources.
    """
    directory = target_dir(package_dir, target)
    if not directory.is_dir():
        raise PackageImportError(f"target {target.name}: no directory {directory}")
    resource_paths = [path for _, path in target.resources]
    sources: list[str] = []
    resources: list[str] = []
    for walk_root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".docc"))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(walk_root) / name
            relative = path.relative_to(directory).as_posix()
            if _under(relative, target.exclude):
                continue
            if _under(relative, resource_paths):
                resources.append(path.relative_to(package_dir).as_posix())
            elif target.sources is None or _under(relative, target.sources):
                sources.append(path.relative_to(package_dir).as_posix())
    return sorted(sources), sorted(resources)


def excluded_files(package_dir: Path, target: Target) -> list[str]:
    """The (non-hidden) files `exclude` takes out of the target's directory, package-relative, sorted."""
    directory = target_dir(package_dir, target)
    excluded = []
    for walk_root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(walk_root) / name
            if not name.startswith(".") and _under(path.relative_to(directory).as_posix(), target.exclude):
                excluded.append(path.relative_to(package_dir).as_posix())
    return sorted(excluded)
