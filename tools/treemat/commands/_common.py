"""What every command shares: the root context, the one error handler, JSON and size formatting."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from treemat.errors import TreematError, describe_error

if TYPE_CHECKING:
    from treemat.layout import Root

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 3


@contextmanager
def error_handler() -> Iterator[None]:
    """TreematError / OSError -> `treemat: error: <one line>`, exit 1; Ctrl-C -> exit 130; a bug -> traceback, exit 3.

    Modelled on pre-commit's `error_handler`; click's own exceptions (usage errors, --help, exit) pass through.
    """
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except (TreematError, OSError) as exc:
        click.echo(f"treemat: error: {describe_error(exc)}", err=True)
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        click.echo("treemat: interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        click.echo(traceback.format_exc().rstrip(), err=True)
        click.echo(f"treemat: internal error: {describe_error(exc)} (a bug: please report it)", err=True)
        raise SystemExit(EXIT_INTERNAL) from None


class TreematGroup(click.Group):
    """The top-level group: runs every command under `error_handler` and exits with the status it returns."""

    def invoke(self, ctx: click.Context) -> Any:
        """Invoke the chosen command; a non-zero int it returns becomes the exit status."""
        with error_handler():
            status = super().invoke(ctx)
        if isinstance(status, int) and not isinstance(status, bool) and status:
            ctx.exit(status)
        return status


class RootedContext:
    """Objects every subcommand shares: the treemat root directory and the isolation asked for.

    `layout` (the checked root, made on first use: `treemat --help` creates nothing) is the one Root of the
    process, handed to whatever the command opens.
    """

    def __init__(self, root: Path, isolation: str = "auto") -> None:
        self.root = root
        self.isolation = isolation
        self._layout: Root | None = None

    @property
    def layout(self) -> Root:
        """The treemat root, checked and made once."""
        if self._layout is None:
            from treemat.layout import Root

            self._layout = Root(self.root)
        return self._layout


pass_rooted = click.make_pass_decorator(RootedContext)


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def to_jsonable(value: Any) -> Any:
    """Records (a `to_json` method, dataclasses, NamedTuples), enums, paths and mappings -> plain JSON types."""
    if hasattr(value, "to_json") and callable(value.to_json):
        return value.to_json()
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple record (CasStats, DirCacheStats)
        return to_jsonable(value._asdict())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and hasattr(value, "name"):  # enum
        return value.value
    return value


def emit_json(value: Any) -> None:
    """Print `value` as indented JSON on stdout."""
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


def describe_report(report: Any) -> str:
    """`key: value` lines for a dataclass report, sizes made human."""
    data = to_jsonable(report)
    if not isinstance(data, dict):
        return str(data)
    parts = []
    for key, value in data.items():
        shown = human_bytes(value) if key.endswith("bytes") and isinstance(value, int) else value
        parts.append(f"{key}: {shown}")
    return "\n".join(parts)


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A click progress bar on stderr; yields an `advance(n)` callback (a no-op when disabled)."""
    if not enabled or total <= 0:
        yield lambda _n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update
