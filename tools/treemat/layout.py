"""The treemat root and everything in it: one object owns the default, every subpath, the checks and the README.

    <root>/cas/<hh>/<hash>[+x]   blobs (cas.py)               <root>/verified/*.log   blob states known good (ledger.py)
    <root>/tmp/                  ingest temp files            <root>/quarantine/      blobs found modified
    <root>/dircache/             Merkle-keyed subtrees        <root>/exec/            exec dirs (executor, pool)
    <root>/tool-cache/           trusted tool-cache seeds     <root>/stats/           per-process counters
    <root>/gc.lock               shared while staging, exclusive for gc
    <root>/service/              the stager service's sockets, locks, pid files and logs (service.py, relay.py)

The root is created 0o700 (0o750 when shared with a group) whatever the umask; one owned by another user or
writable by others is refused. Every subdirectory is made once, when the Root is constructed (at the entry
point). One someone deleted under a running process (`rm -rf ~/.cache/treemat/cas` to clear the cache) is made
again by `repair()`, which the executor calls only when preparing an action failed (never on the hot path).
"""

from __future__ import annotations

import errno
import os
import stat

from treemat.errors import CasError
from treemat.trustpath import trusted_path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (and re): the relay imports this
if TYPE_CHECKING:
    from pathlib import Path  # imported where a Path is made: a relay finding its service imports no pathlib

SERVICE_DIR = "service"
SERVICE_FILE_KINDS = ("sock", "lock", "pid", "log")
PRIVATE_DIR_MODE = 0o700
SHARED_DIR_MODE = 0o750
README_TEXT = """\
This directory is the root of treemat, Bazel's input stager (its docs/architecture.md: "On-disk layout").
It holds a content-addressed store of build inputs (cas/), exec dirs (exec/), caches and counters.
Everything here can be deleted while no build runs; a running treemat makes what it needs again.
"""


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME`, else `~/.cache` (where treemat keeps its root and compiled modules by default). A relative
    `$XDG_CACHE_HOME` is ignored, as the XDG spec says: resolved against the cwd (Bazel's execroot) it would put
    the root and the service's package copy where `bazel clean` deletes them.

    (__main__ spells the same rule for its bytecode cache: it runs before any treemat module may be imported.)
    """
    from pathlib import Path

    return Path(user_cache_text())


def user_cache_text() -> str:
    """user_cache_dir as text."""
    cache = os.environ.get("XDG_CACHE_HOME")
    if cache and os.path.isabs(cache):
        return cache
    home = os.path.expanduser("~")
    if not os.path.isabs(home):  # no $HOME and no passwd entry (an unmapped uid in a user namespace)
        raise CasError("no home directory for treemat's default root: set TREEMAT_ROOT or pass --root")
    return os.path.join(home, ".cache")


def check_private_dir(path: str | os.PathLike[str]) -> None:
    """CasError unless `path` is a directory of ours (not a symlink) that neither group nor others can write."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise CasError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CasError(f"{path} is not a directory (a symlink?): refused")
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CasError(
            f"{path} is uid {info.st_uid}'s, mode {stat.S_IMODE(info.st_mode):o}: refused (it must be yours and "
            f"writable by you alone)"
        )


def check_trusted_path(path: Path) -> Path:
    """`path`'s real path; CasError unless it and every directory above it is owned by us or root and writable by
    no one else (trustpath.py)."""
    from pathlib import Path

    real, reason = trusted_path(path)
    if reason:
        raise CasError(reason)
    return Path(real)


def default_root_path() -> Path:
    """`$TREEMAT_ROOT`, else `<user cache dir>/treemat`, absolute."""
    from pathlib import Path

    return Path(root_text(None))


def root_text(path: str | None) -> str:
    """The root's absolute path as text, as Root names it: `path` (`~` expanded), else default_root_path."""
    if not path:
        path = os.environ.get("TREEMAT_ROOT") or os.path.join(user_cache_text(), "treemat")
    path = os.path.expanduser(path)  # not normalized: `link/..` is where the kernel resolves it, as with a Path
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def service_file_text(root: str, name: str, kind: str) -> str:
    """`<root>/service/<name>.<kind>` (Root.service_file) as text: a relay's path to its service's socket."""
    return os.path.join(root, SERVICE_DIR, _service_file_name(name, kind))


def _service_file_name(name: str, kind: str) -> str:
    if kind not in SERVICE_FILE_KINDS:
        raise ValueError(f"no service file of kind {kind!r}")
    return f"{name}.{kind}"


class Root:
    """A checked treemat root: its subpaths, made on demand; construct once at the entry point, pass it down."""

    SUBDIRS = ("cas", "tmp", "quarantine", "exec", "verified", "stats", "dircache", "tool-cache", "service")

    def __init__(self, path: Path | str | None = None, *, group_shared: bool = False) -> None:
        from pathlib import Path

        self.path = Path(path).expanduser().absolute() if path is not None else default_root_path()
        self.group_shared = group_shared
        self.dir_mode = SHARED_DIR_MODE if group_shared else PRIVATE_DIR_MODE
        self._check_or_create()
        self.ensure()
        readme = self.readme
        if not readme.exists():
            try:
                fd = os.open(readme, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError:
                pass  # another process wrote it, or the root is read-only to us: not worth an error
            else:
                with os.fdopen(fd, "w") as handle:
                    handle.write(README_TEXT)

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------------------------------ subpaths

    @property
    def cas(self) -> Path:
        """Blobs: `cas/<hh>/<hash>` (0o440) and `cas/<hh>/<hash>+x` (0o550)."""
        return self.path / "cas"

    @property
    def tmp(self) -> Path:
        """Ingest temp files (same filesystem as the blobs)."""
        return self.path / "tmp"

    @property
    def quarantine(self) -> Path:
        """Blobs found modified, kept for inspection with a `.reason` file beside each."""
        return self.path / "quarantine"

    @property
    def exec(self) -> Path:
        """Exec dirs: `<pid>-<id>-<token>/` (the staged tree) and `<name>.run/` (the tool's writes under an overlay)."""
        return self.path / "exec"

    @property
    def verified(self) -> Path:
        """The verified ledger: one append-only log per process (ledger.py)."""
        return self.path / "verified"

    @property
    def stats(self) -> Path:
        """`<pid>.json` counters of each process, summed by `treemat stats`."""
        return self.path / "stats"

    @property
    def dircache(self) -> Path:
        """Merkle-keyed subtrees (dircache.py)."""
        return self.path / "dircache"

    @property
    def tool_cache(self) -> Path:
        """Seeds of tools' caches that treemat built itself (toolcache.py); tools only ever read them."""
        return self.path / "tool-cache"

    @property
    def service(self) -> Path:
        """The stager service's `<name>.sock` (0600 in this 0700 dir), `.lock`, `.pid` and `.log` (service.py)."""
        return self.path / SERVICE_DIR

    def check_service(self) -> None:
        """CasError unless `service/` is ours alone (check_private_dir): whoever could plant a socket there would
        get a relay's hello (its environment, its execroot)."""
        check_private_dir(self.service)

    def service_package_parents(self) -> list[Path]:
        """Where a service's copy of the treemat package (`pkg-<version>/`) goes, in order of preference: the
        user's `<cache>/treemat/service-packages/` (one copy, and one set of compiled modules, for every root of
        the user), else this root's `service/` (`bazel clean` may delete the runfiles of the relay that started
        the service, so it never runs from them)."""
        try:
            return [user_cache_dir().absolute() / "treemat" / "service-packages", self.service]
        except CasError:  # no home: this root's own
            return [self.service]

    def service_file(self, name: str, kind: str) -> Path:
        """`service/<name>.<kind>`: the service's `sock` (0600), `lock` (held to start or retire it), `pid`, `log`."""
        return self.service / _service_file_name(name, kind)

    @property
    def replay(self) -> Path:
        """Scratch of `treemat replay` (removed when it ends)."""
        return self.path / "replay"

    @property
    def readme(self) -> Path:
        """What a user who finds the directory reads."""
        return self.path / "README.txt"

    @property
    def hidden(self) -> list[Path]:
        """What no tool may see (the sandbox masks them): blobs, their ledger, caches built from blobs."""
        return [self.cas, self.verified, self.dircache, self.quarantine, self.tool_cache, self.service]

    @property
    def gc_lock(self) -> Path:
        """Shared while a process stages (blobs in use), exclusive for `cas gc`."""
        return self.path / "gc.lock"

    # ------------------------------------------------------------------------------------------ upkeep

    def ensure(self) -> bool:
        """Make every missing subdirectory (one mkdir each); True if any was missing."""
        made = False
        for name in self.SUBDIRS:
            directory = self.path / name
            try:
                os.mkdir(directory, self.dir_mode)
            except FileExistsError:
                continue
            except FileNotFoundError:  # the root itself went
                self._check_or_create()
                os.makedirs(directory, self.dir_mode, exist_ok=True)
            except OSError as exc:
                raise CasError(f"cannot create {directory}: {exc.strerror}") from None
            made = True
        return made

    def repair(self) -> bool:
        """After a failure: make again what a user deleted under a running process; True if anything was missing.

        Costs one stat per subdirectory, so callers use it only when something already went wrong.
        """
        if all(os.path.isdir(self.path / name) for name in self.SUBDIRS):
            return False
        return self.ensure()

    def _check_or_create(self) -> None:
        check_root(self.path, group_shared=self.group_shared)


def check_root(root: Path, *, group_shared: bool = False) -> None:
    """Create (0o700, or 0o750 when shared with the group) or check a treemat root; CasError if unsafe.

    A root owned by another user, or writable by others (or by the group, unless shared), would let someone
    else plant blobs that treemat then serves: it is refused rather than used. So is one below a directory someone
    else can write (without the sticky bit, as /tmp has): they could swap the path to a tree of theirs after this
    check, and every later path through it would reach their blobs.
    """
    dir_mode = SHARED_DIR_MODE if group_shared else PRIVATE_DIR_MODE
    try:
        root.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        info = os.lstat(root)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CasError(f"disk full while creating the treemat root {root}: free space") from None
        raise CasError(f"{exc.strerror or exc} while creating the treemat root {root}") from None
    if stat.S_ISLNK(info.st_mode):
        info = os.stat(root)
    if not stat.S_ISDIR(info.st_mode):
        raise CasError(f"treemat root {root} is not a directory")
    for above in {os.path.dirname(os.path.abspath(root)), os.path.dirname(os.path.realpath(root))}:
        if reason := trusted_path(above)[1]:  # the symlink's own directory too, where the root is one
            raise CasError(f"treemat root {root}: {reason}")
    if info.st_uid != os.geteuid():
        raise CasError(f"treemat root {root} belongs to uid {info.st_uid}, not to you (uid {os.geteuid()}): refused")
    forbidden = stat.S_IWOTH | (0 if group_shared else stat.S_IWGRP)
    if info.st_mode & forbidden:
        who = "others" if info.st_mode & stat.S_IWOTH else "its group"
        raise CasError(
            f"treemat root {root} is writable by {who} (mode {stat.S_IMODE(info.st_mode):o}): refused; "
            f"chmod it to {dir_mode:o}"
        )
