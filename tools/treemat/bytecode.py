"""Compiled modules of a Bazel runfiles tree, kept in the user's cache by the content of their source.

A runfiles tree lives under Bazel's output base: `bazel clean` deletes it, and every CI build (a new output base)
has it at a new path. Python keys its compiled modules by path (next to the source, or under
`sys.pycache_prefix` mirroring the absolute path), so every new output base compiled the worker's modules again
(~15 ms of a relay's start, more for the in-process worker) and left another mirrored tree in the cache for good.
Here a module found in the runfiles tree is compiled once per source content: its code object is stored
(marshal, after a digest of it, checked before it is loaded) under a digest of the source, the interpreter's
version and the optimization level, written atomically (temp file + rename). Another output base, a `bazel
clean`, the service's package copy: the same source, the same file. A file that does not load (cut short,
damaged, another format, not a regular file) is compiled again and replaced. Modules elsewhere (the standard
library, site-packages, a checkout) load as Python loads them. Standard library only: it runs before any other
treemat module is imported.
"""

from __future__ import annotations

import marshal
import os
import sys
from _blake2 import blake2b
from importlib.machinery import ModuleSpec, PathFinder, SourceFileLoader
from stat import S_ISREG
from types import CodeType

TYPE_CHECKING = False  # typing itself costs ~12 ms of a start; mypy reads this name as always true
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

KEY_BYTES = 16
# what a module's compiled code depends on besides its source: the interpreter and the optimization level
SOURCE_TAG = f"{sys.implementation.cache_tag} {sys.hexversion} {sys.flags.optimize}\0".encode()


class ContentKeyedLoader(SourceFileLoader):
    """A source module whose compiled code is stored under a digest of its source, not of its path."""

    def __init__(self, fullname: str, path: str, store: str) -> None:
        super().__init__(fullname, path)
        self.store = store

    def get_code(self, fullname: str) -> CodeType:
        path = self.get_filename(fullname)
        source = self.get_data(path)
        compiled = os.path.join(self.store, entry_name(source))
        try:
            fd = os.open(compiled, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as stored:  # a FIFO or a symlink to /dev/zero hung the import (the worker's start)
                if not S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(f"{compiled}: not a regular file")
                data = stored.read()
            if seal(data[KEY_BYTES:]) != data:  # a damaged byte can unmarshal into other, valid code
                raise ValueError(f"{compiled}: its digest does not match")
            code = marshal.loads(data[KEY_BYTES:])
            if isinstance(code, CodeType):
                return code if code.co_filename == path else _named(code, path)
        except Exception:  # none yet, or not one that loads (cut short: EOFError; a damaged byte: SystemError too)
            pass  # compiled (again) and stored
        code = self.source_to_code(source, path)
        if not sys.dont_write_bytecode:
            _publish(compiled, seal(marshal.dumps(code)))
        return code


def entry_name(source: bytes) -> str:
    """The store's file name for a module of this source."""
    return blake2b(SOURCE_TAG + source, digest_size=KEY_BYTES).hexdigest() + ".pyc"


def seal(payload: bytes) -> bytes:
    """A stored module's bytes: a digest of its marshal data, then the data (checked before it is loaded)."""
    return blake2b(payload, digest_size=KEY_BYTES).digest() + payload


def _named(code: CodeType, path: str) -> CodeType:
    """`code` and the code nested in it with `path` as their file (tracebacks name this copy of the source)."""
    consts = tuple(_named(const, path) if isinstance(const, CodeType) else const for const in code.co_consts)
    return code.replace(co_filename=path, co_consts=consts)


def _publish(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (a unique temp file, then rename); a failure leaves nothing behind."""
    temp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:  # all of it, or OSError (a full disk): never a short file under the final name
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(temp, path)
    except OSError:
        try:  # noqa: SIM105 - contextlib costs a few ms this early
            os.unlink(temp)
        except OSError:
            pass


class RunfilesFinder:
    """Finds modules as PathFinder does; those under `runfiles` get a ContentKeyedLoader over `store`."""

    def __init__(self, runfiles: str, store: str) -> None:
        self.runfiles = os.path.join(runfiles, "")
        self.store = store

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        spec = PathFinder.find_spec(fullname, path, target)
        origin = spec.origin if spec is not None else None
        if spec is None or origin is None or type(spec.loader) is not SourceFileLoader:
            return spec
        if origin.startswith(self.runfiles):
            spec.loader = ContentKeyedLoader(fullname, origin, self.store)
            spec.cached = None
        return spec


def keep_compiled_by_content(runfiles: str, store: str) -> None:
    """Load the modules of `runfiles` (absolute) through `store` (an existing directory only we can write, as the
    caller checked) from now on: the finder goes just before PathFinder (built-in and frozen modules stay theirs)."""
    finders = sys.meta_path
    where = next((i for i, finder in enumerate(finders) if finder is PathFinder), len(finders))
    finders.insert(where, RunfilesFinder(runfiles, store))
