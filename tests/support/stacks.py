"""Test factories: a store or a whole stack over a fresh root, with the defaults production code must spell."""

from __future__ import annotations

from pathlib import Path

from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.executor import ActionExecutor
from treemat.layout import Root
from treemat.stack import Stack, open_stack


def make_store(root: Path) -> ContentStore:
    """A CAS over `root` (made and checked) with its own counters."""
    return ContentStore(Root(root), counters=Counters())


def make_stack(root: Path, **options: object) -> Stack:
    """`open_stack` over `root`, exec dirs removed synchronously unless `background_cleanup` is given."""
    options.setdefault("background_cleanup", False)
    return open_stack(Root(root), **options)  # type: ignore[arg-type]


def make_executor(root: Path) -> ActionExecutor:
    """The composed stack's executor in one process, exec dirs removed synchronously."""
    return make_stack(root).executor
