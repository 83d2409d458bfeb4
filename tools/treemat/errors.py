"""Exception hierarchy: every failure a user can cause has a one-line, actionable message."""

from __future__ import annotations

import errno


class TreematError(Exception):
    """Base class for errors reported to users as a single line (no traceback)."""


class DigestError(TreematError):
    """A digest string is malformed."""


class ManifestError(TreematError):
    """An input manifest is malformed or unsafe (absolute path, `..`, escaping symlink, conflict)."""


class CasError(TreematError):
    """The content-addressable store failed (I/O, disk full, permissions)."""


class MissingBlobError(CasError):
    """A blob the tree needs is neither in the CAS nor ingestible from a source path."""


class CorruptBlobError(CasError):
    """Content does not match its digest (on ingest, or a CAS blob found modified)."""


class MaterializeError(TreematError):
    """Building an input tree on disk failed."""


class ProtocolError(TreematError):
    """A worker request could not be decoded or is semantically invalid."""


class ExecutionError(TreematError):
    """An action could not be run (tool missing, output missing, exec dir problem)."""


def describe_error(exc: BaseException) -> str:
    """The one line a user sees for `exc`: a TreematError's message, an OSError's reason and file, else its type."""
    if isinstance(exc, TreematError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"disk full{where}: free space or run `treemat cas gc`"
        return f"{exc.strerror or exc}{where}"
    return f"{type(exc).__name__}: {exc}"
