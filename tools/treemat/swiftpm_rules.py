"""One SwiftPM package (laid out: swiftpm_layout) -> Bazel rule calls:
treemat's swift rules for Swift targets; `cc_library` (tagged `swift_module=NAME`, the rules generate its module
map) for C targets, wrapped in `swift_c_module` when the target ships its own module map.
Everything it cannot translate becomes one `Untranslated` line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from treemat.swiftpm import (
    Manifest,
    Target,
    TargetDependency,
    c99name,
    target_dir,
)
from treemat.swiftpm_layout import CC_SUFFIX, PackageInfo, TargetLayout, Untranslated, label_safe
from treemat.swiftpm_settings import (
    AttrValue,
    Keyed,
    Selected,
    applies_on_linux,
    c_setting,
    dropped,
    language_standard_copts,
    swift_language_version,
    swift_setting,
)

RELEASE_SETTING = "swiftpm_release"  # config_setting: -c opt is SwiftPM's release, fastbuild and dbg its debug


_LISTS = ("deps", "defines", "local_defines", "includes", "copts", "linkopts")


class _Attrs:
    """A target's list attributes: unconditional, and per `.when(configuration:)`."""

    def __init__(self) -> None:
        self.base: dict[str, list[str]] = {k: [] for k in _LISTS}
        self.configured: dict[str, dict[str, list[str]]] = {c: {k: [] for k in _LISTS} for c in ("debug", "release")}

    def __getitem__(self, key: str) -> list[str]:
        return self.base[key]

    def __setitem__(self, key: str, value: list[str]) -> None:
        self.base[key] = value

    def value(self, key: str, prefix: tuple[str, ...] = ()) -> tuple[str, ...] | Selected:
        """The attribute as written: a list, or a list plus a select over the configuration."""
        base = (*prefix, *self.base[key])
        release, debug = (tuple(self.configured[c][key]) for c in ("release", "debug"))
        return Selected(base, release, debug) if release or debug else base


# What SwiftPM defines for every target (swift build -v, 6.3): `#if SWIFT_PACKAGE` code (swift-nio,
# swift-system) takes SwiftPM's branch; no Bundle.module is generated, so resource-bundle code takes the
# "unavailable" one. SwiftPM's DEBUG (outside release) comes from the rules (-DDEBUG, as rules_swift).
SWIFTPM_SWIFT_DEFINES = ("SWIFT_PACKAGE",)
NO_BUNDLE_DEFINE = "SWIFT_MODULE_RESOURCE_BUNDLE_UNAVAILABLE"  # with a bundle the rules define ..._AVAILABLE
SWIFTPM_C_DEFINES = ("SWIFT_PACKAGE=1",)


@dataclass(frozen=True)
class Rule:
    """One rule call in a BUILD file; attrs in the order they are written, empty ones left out."""

    kind: str
    name: str
    attrs: tuple[tuple[str, AttrValue], ...] = ()


def _find_dependency(deps: Mapping[str, PackageInfo], package: str) -> PackageInfo | None:
    wanted = package.lower()
    for info in deps.values():
        if info.identity == wanted or (info.manifest is not None and info.manifest.name.lower() == wanted):
            return info
    return None


def resolve(
    package: PackageInfo, deps: Mapping[str, PackageInfo], dependency: TargetDependency, *, cc: bool
) -> tuple[list[str], str | None]:
    """The labels a target dependency stands for, or why it has none."""
    manifest = package.manifest
    assert manifest is not None
    if dependency.kind in ("target", "byName") and manifest.target(dependency.name) is not None:
        target = manifest.target(dependency.name)
        assert target is not None
        if target.type == "executable":
            return [], f"dependency on executable target {dependency.name}: not translated"
        if dependency.name not in package.layouts:
            return [], f"dependency on {dependency.name}, which is not translated: dropped"
        return [package.label(dependency.name, cc=cc, local=True)], None
    if dependency.kind == "target":
        return [], f"dependency on unknown target {dependency.name}"
    candidates = [_find_dependency(deps, dependency.package)] if dependency.package else list(deps.values())
    for info in candidates:
        if info is None:
            break
        if info.manifest is None:
            if dependency.package:  # no checkout: assume the product is a target of the same name
                return [f"@{info.repo}//:{dependency.name}"], None
            continue
        targets = info.manifest.products.get(dependency.name)
        if targets is not None:
            missing = [t for t in targets if t not in info.layouts]
            why = (
                f"product {dependency.name}: its untranslated targets {', '.join(missing)} dropped" if missing else None
            )
            return [info.label(t, cc=cc) for t in targets if t in info.layouts], why
    return [], f"dependency on product {dependency.name} of {dependency.package or 'any package'}: not found"


def _target_attrs(package: PackageInfo, target: Target, layout: TargetLayout) -> tuple[_Attrs, list[str]]:
    """Settings of one target -> attribute lists, plus the reasons for what was dropped."""
    attrs = _Attrs()
    reasons = []
    is_c = layout.kind != "swift"
    target_path = target_dir(package.directory or Path("."), target).relative_to(package.directory or Path("."))
    for setting in target.settings:
        if not applies_on_linux(setting.platforms):
            reasons.append(f"{setting.describe()}: {dropped(setting.platforms, None)}")
            continue
        if setting.config not in (None, "debug", "release"):
            reasons.append(f"{setting.describe()}: {dropped((), setting.config)}")
            continue
        lists = attrs.base if setting.config is None else attrs.configured[setting.config]
        translate = c_setting(setting, target_path.as_posix(), lists) if is_c else swift_setting(setting, lists)
        if translate is not None:
            reasons.append(translate)
    if is_c and package.manifest is not None:
        standard, why = language_standard_copts(package.manifest, layout.sources)
        attrs["copts"] = standard + attrs["copts"]
        reasons += [why] if why else []
    return attrs, reasons


def translate(package: PackageInfo, deps: Mapping[str, PackageInfo], report: list[Untranslated]) -> list[Rule]:
    """The rule calls for every translatable target of `package`, in manifest order."""
    manifest = package.manifest
    assert manifest is not None
    rules: list[Rule] = []
    for target in manifest.targets:
        layout = package.layouts.get(target.name)
        if layout is None:
            continue
        attrs, reasons = _target_attrs(package, target, layout)
        is_c = layout.kind != "swift"
        for dependency in target.dependencies:
            if not applies_on_linux(dependency.platforms):
                reasons.append(f"dependency {dependency.name}: {dropped(dependency.platforms, None)}")
                continue
            labels, why = resolve(package, deps, dependency, cc=is_c)
            if is_c and any(dep_layout_is_swift(package, deps, label) for label in labels):
                why = f"C target depends on Swift module {dependency.name}: dropped"
                labels = []
            attrs["deps"] += [label for label in labels if label not in attrs["deps"]]
            if why:
                reasons.append(why)
        in_bundle = {resource for resource, _ in layout.bundle}
        if (unbundled := [p for p in layout.resources if p not in in_bundle]) and not is_c:
            reasons.append(f"resources ({len(unbundled)} files) not in a bundle (.embedInCode): runfiles (`data`) only")
        elif layout.resources and is_c:
            reasons.append(f"resources ({len(layout.resources)} files) of a C target: not translated")
        report.extend(Untranslated(package.identity, target.name, reason) for reason in dict.fromkeys(reasons))
        rules += _c_rules(target, layout, attrs) if is_c else [_swift_rule(package, manifest, target, layout, attrs)]
    return rules + _product_aliases(package)


def _product_aliases(package: PackageInfo) -> list[Rule]:
    """`alias`es for single-target products named unlike their target (`bazel run //:product` as `swift run`)."""
    assert package.manifest is not None
    names = {t.name for t in package.manifest.targets}
    return [
        Rule("alias", product, (("actual", f":{targets[0]}"),))
        for product, targets in package.manifest.products.items()
        if product not in names and len(targets) == 1 and targets[0] in package.layouts and label_safe(product)
    ]


def dep_layout_is_swift(package: PackageInfo, deps: Mapping[str, PackageInfo], label: str) -> bool:
    """Whether `label` (as made by PackageInfo.label) names a Swift target."""
    repo, _, name = label.partition("//:") if label.startswith("@") else ("", "", label[1:])
    owner = package if not repo else next((d for d in deps.values() if f"@{d.repo}" == repo), None)
    layout = owner.layouts.get(name) if owner is not None else None
    return layout is not None and layout.kind == "swift"


def _swift_rule(package: PackageInfo, manifest: Manifest, target: Target, layout: TargetLayout, attrs: _Attrs) -> Rule:
    kind = {"executable": "swift_binary", "test": "swift_test"}.get(target.type, "swift_library")
    return Rule(
        kind,
        target.name,
        (
            ("srcs", layout.sources),
            ("module_name", c99name(target.name)),
            ("package_name", package.identity),
            ("deps", tuple(attrs["deps"])),
            ("defines", attrs.value("defines", SWIFTPM_SWIFT_DEFINES + (() if layout.bundle else (NO_BUNDLE_DEFINE,)))),
            ("copts", attrs.value("copts")),
            ("swift_version", swift_language_version(manifest, target)),
            ("linkopts", attrs.value("linkopts")),
            ("resources", Keyed(layout.bundle)),
            # the resources in the runfiles too: tests read them beside `#filePath` (Yams) as well
            ("data", layout.resources + layout.test_files),
        ),
    )


def _c_rules(target: Target, layout: TargetLayout, attrs: _Attrs) -> list[Rule]:
    includes = attrs.value("includes", (layout.include_dir,) if layout.include_dir else ())
    own_map = layout.module_map is not None
    library = Rule(
        "cc_library",
        target.name + CC_SUFFIX if own_map else target.name,
        (
            ("srcs", layout.sources),
            ("hdrs", layout.headers),
            ("textual_hdrs", layout.textual),
            ("includes", includes),
            ("deps", tuple(attrs["deps"])),
            ("local_defines", attrs.value("local_defines", SWIFTPM_C_DEFINES)),
            ("copts", attrs.value("copts")),
            ("linkopts", attrs.value("linkopts")),
            ("tags", () if own_map else (f"swift_module={c99name(target.name)}",)),
        ),
    )
    if layout.module_map is None:
        return [library]
    module = Rule(
        "swift_c_module",
        target.name,
        (
            ("module_map", layout.module_map),
            ("module_name", c99name(target.name)),
            ("deps", (f":{library.name}",)),
        ),
    )
    return [library, module]
