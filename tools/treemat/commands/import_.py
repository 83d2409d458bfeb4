"""`treemat import PACKAGE_DIR`: BUILD.bazel files for a SwiftPM package and its local dependencies."""

from __future__ import annotations

import json
from pathlib import Path

import click

from treemat.commands._common import emit_json


def _parse_dep(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, Path]:
    deps = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r}: expected NAME=PATH (NAME: the dependency's package identity)")
        deps[name.lower()] = Path(path)
    return deps


@click.command("import")
@click.argument("package_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dep",
    "deps",
    multiple=True,
    callback=_parse_dep,
    metavar="NAME=PATH",
    help="Local checkout of dependency NAME (its package identity, e.g. swift-numerics); imported too. "
    "`.package(path:)` dependencies need none. Repeatable.",
)
@click.option(
    "--dump",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the root package's `swift package dump-package` JSON from FILE instead of running swift.",
)
@click.option(
    "--test-size",
    type=click.Choice(("small", "medium", "large", "enormous")),
    default="large",
    show_default=True,
    help="`size` of every swift_test (Bazel's timeout: 60 s, 5, 15, 60 min). SwiftPM has no test timeout, and "
    "real suites run for minutes (swift-atomics' 1,972 cases: 109 s), so imported tests are large unless you "
    "say otherwise.",
)
@click.option("--force", is_flag=True, help="Replace BUILD files written by hand (no `treemat import` header).")
@click.option("--dry-run", is_flag=True, help="Write nothing; report what would be written.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: files, untranslated items, snippets.")
def import_(
    package_dir: Path,
    deps: dict[str, Path],
    dump: Path | None,
    test_size: str | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> int:
    """Write BUILD.bazel files for a SwiftPM package (and, recursively, its local dependencies).

    Runs `swift package dump-package` (offline: nothing is resolved or fetched) and translates library,
    executable and test targets, C targets (cc_library; swift_c_module for a target's own module map),
    swiftSettings, cSettings, linkerSettings and target dependencies. Settings only for other platforms than
    Linux are dropped. Each item that could not be translated is one line on stderr (or in --json).

    Every dependency is imported from a local checkout: `.package(path:)` ones from their path, others from
    `--dep NAME=PATH`. Each becomes the repository `@swiftpkg_<name>`; the WORKSPACE snippet and MODULE.bazel
    fragment that declare them are printed at the end. Running it again rewrites only what changed; a BUILD
    file without treemat's header is never replaced without --force.
    """
    from treemat.swiftpm_import import plan_import, write_import

    root_data = json.loads(dump.read_text(encoding="utf-8")) if dump else None
    result = plan_import(package_dir, deps, root_data=root_data, test_size=test_size)
    if not dry_run:
        write_import(result, force=force)
    if as_json:
        emit_json(result.to_json())
        return 0
    for item in result.untranslated:
        click.echo(f"treemat import: not translated: {item.line()}", err=True)
    for path in result.files:
        click.echo(f"{result.status.get(path, 'would write')}: {path}")
    if result.workspace:
        click.echo("\n# WORKSPACE, after treemat's block (docs/bazel.md):\n" + result.workspace, nl=False)
        click.echo("\n# MODULE.bazel (Bzlmod), after treemat's bazel_dep:\n" + result.module, nl=False)
    if result.bazelrc:
        click.echo("\n# .bazelrc (C targets: compiled by clang, as SwiftPM does):\n" + result.bazelrc, nl=False)
    return 0
