"""`treemat probe`: how inputs would be protected and placed here, fastest method first."""

from __future__ import annotations

from pathlib import Path

import click

from treemat.commands._common import RootedContext, emit_json, pass_rooted


@click.command()
@click.argument("dest_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".")
@click.option("--json", "as_json", is_flag=True)
@pass_rooted
def probe(rooted: RootedContext, dest_dir: Path, as_json: bool) -> int:
    """Show how inputs would be protected and placed from the CAS to DEST_DIR's filesystem, fastest first.

    Every tool runs sandboxed: its own mount+pid namespaces (and a user namespace), TREEMAT_ROOT hidden, the
    execroot read-only. `isolation: overlay` means hardlinks are used (the tool sees them through an overlayfs);
    `copy-on-write` means hardlinks are never used; `unavailable` means no sandbox works here and every action
    fails with the reason; `none` (only when asked for with --isolation=none) means tools run UNSANDBOXED.
    """
    from treemat.stack import open_stack

    with open_stack(rooted.layout, isolation=rooted.isolation) as stack:
        methods = stack.probe.methods_for(stack.cas.cas_dir, dest_dir.absolute())
        described = stack.describe()
    names = [m.value for m in methods]
    if as_json:
        emit_json({"cas": str(stack.cas.cas_dir), "dest": str(dest_dir), "methods": names, **described})
    else:
        click.echo(f"{stack.cas.cas_dir} -> {dest_dir}: {' > '.join(names)}")
        click.echo(f"isolation: {described['isolation']} ({described['isolation_detail']})")
        click.echo(f"write watch: {described['write_watch']} ({described['write_watch_detail']})")
    return 0
