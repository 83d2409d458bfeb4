"""`treemat bot`: a Remote Workers API bot for BuildGrid (needs the `bot` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from treemat.commands._common import RootedContext, pass_rooted
from treemat.errors import TreematError


@click.command()
@click.option("--server", required=True, help="BuildGrid endpoint, e.g. grpc://127.0.0.1:50051.")
@click.option("--instance", default="", show_default=True, help="REAPI instance name.")
@click.option(
    "--root",
    "bot_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="This bot's treemat root (default: the global --root).",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Leases at once.")
@click.option("--bot-id", default=None, help="Bot id (default: treemat-<host>-<pid>).")
@pass_rooted
def bot(
    rooted: RootedContext, server: str, instance: str, bot_root: Path | None, concurrency: int, bot_id: str | None
) -> int:
    """Run a Remote Workers API bot for BuildGrid: lease actions, stage inputs with treemat, run, upload.

    Needs the `bot` extra (pip install -e '.[bot]'). Stops on SIGTERM/SIGINT, killing running commands.
    """
    try:
        from treemat.bot.session import run_bot
    except ImportError as exc:
        raise TreematError(f"`treemat bot` needs the bot extra (pip install 'treemat[bot]'): {exc}") from None

    root = (bot_root or rooted.root).expanduser().absolute()
    return run_bot(server, instance, root, concurrency=concurrency, bot_id=bot_id)
