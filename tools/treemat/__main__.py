"""Entry point of the `//tools/treemat` py_binary and `python -m treemat`.

An `@flagfile` argument -> one-shot action (Bazel's local/sandboxed strategies; import-light: no click, no
protobuf, no CAS); `--service` -> the root's stager service (service.py, started by a relay);
`--persistent_worker` -> the worker: with `--protocol=proto` (what the rules pass) a relay to the stager service
(relay.py; `--no-service` or TREEMAT_SERVICE=0: in-process, as where no service can be had); with the flags
Bazel passes (`--protocol=`, `--root=`, `--max-workers=`, `@flagfile`s, all in `--name=value` form) it starts
without click, the sandbox helper started first so that it boots while the worker imports; any other flag goes
through click's `treemat worker` parser.
Anything else -> the `treemat` CLI. Run as a program, it keeps compiled modules in the user's cache (they
survive `bazel clean`).
"""

from __future__ import annotations

import contextlib
import os
import sys

SERVICE_DEFAULT = "1"  # TREEMAT_SERVICE unset: relay to the stager service (1) or serve in-process (0)
PROTOCOLS = ("json", "proto", "auto")  # = commands/worker.py's --protocol choices (a test checks)
ISOLATIONS = ("auto", "overlay", "copy-on-write", "none")  # = cli.ISOLATION_CHOICES (a test checks)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the one-shot runner, the worker or the CLI; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--service"]:
        return start_service(args[1:])
    if "--persistent_worker" in args:
        options = worker_options(args, os.environ)
        if options is not None:
            if options["service"] == "1" and options["protocol"] == "proto":
                from treemat.relay import relay

                status = relay(options, os.environ, serve_here=run_forked_service)
                if status is not None:
                    return status
            add_site_packages(pth_files=False)
            return serve_worker(options)
        add_site_packages()
        from treemat.cli import main as cli_main

        return cli_main(["worker", *args])
    if any(arg.startswith("@") for arg in args):
        from treemat.flagfile import run_oneshot

        return run_oneshot(args)  # the standard library and treemat only: no site-packages needed
    add_site_packages()
    from treemat.cli import main as cli_main

    return cli_main(args)


def worker_options(args: list[str], env: dict[str, str] | os._Environ[str]) -> dict[str, str] | None:
    """The worker's settings from Bazel's usual flags (`--name=value` only), or None: let click parse them."""
    options = {
        "protocol": "auto",
        "root": "",
        "max_workers": "",
        "isolation": env.get("TREEMAT_ISOLATION", "auto"),
        "service": "0" if env.get("TREEMAT_SERVICE", SERVICE_DEFAULT) == "0" else "1",
    }
    for arg in args:
        name, _equals, value = arg.partition("=")
        if arg == "--persistent_worker" or arg.startswith("@"):
            continue
        if arg in ("--service", "--no-service"):  # per mnemonic, through --worker_extra_flag
            options["service"] = "1" if arg == "--service" else "0"
            continue
        if name == "--protocol" and value in PROTOCOLS:
            options["protocol"] = value
        elif name == "--root" and value:
            options["root"] = value
        elif name == "--max-workers" and value.isdigit() and int(value) >= 1:
            options["max_workers"] = value
        else:
            return None  # another flag (click ignores unknown ones), a bad value (click says why), --help...
    return options if options["isolation"] in ISOLATIONS else None


def serve_worker(options: dict[str, str]) -> int:
    """`treemat worker` as worker_options read it; errors as the CLI reports them (one line, exit 1)."""
    if options["isolation"] != "none":
        from treemat.sandboxstart import prestart_helper

        prestart_helper()
    from pathlib import Path

    from treemat.layout import default_root_path

    root = Path(options["root"]).expanduser().absolute() if options["root"] else default_root_path()
    if options["isolation"] != "none":
        from treemat.sandbox import open_early

        open_early(root, options["isolation"])
    from treemat.errors import TreematError, describe_error
    from treemat.worker import serve_stdio

    max_workers = int(options["max_workers"] or max(2, os.cpu_count() or 2))
    protocol = None if options["protocol"] == "auto" else options["protocol"]
    try:
        return serve_stdio(root, protocol=protocol, max_workers=max_workers, isolation=options["isolation"])  # type: ignore[arg-type]
    except (TreematError, OSError) as exc:
        print(f"treemat: error: {describe_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("treemat: interrupted", file=sys.stderr)
        return 130


def start_service(args: list[str]) -> int:
    """`--service`: the stager service (service.py), detached at once (the spawning relay reaps this process)."""
    if os.fork():
        os._exit(0)
    return run_service(args)


def run_forked_service(args: list[str]) -> int:
    """run_service in a process a relay forked (servicespawn.py): where the relay started without `site` (-S), it
    runs here, while the sandbox helper boots (a spawned service gets the site-packages on its PYTHONPATH)."""
    return run_service(args, add_site=True)


def run_service(args: list[str], *, add_site: bool = False) -> int:
    """The service in this (detached) process: the sandbox helper spawned and the sandbox opened (its probe) in a
    thread before the stack's modules are imported, so that both overlap."""
    os.umask(0o077)
    flags = dict(arg.removeprefix("--").partition("=")[::2] for arg in args)
    root, isolation = flags.get("root", ""), flags.get("isolation", "auto")
    if root and isolation in ISOLATIONS and isolation != "none":
        from treemat.sandboxstart import prestart_helper

        prestart_helper()
        from pathlib import Path

        from treemat.sandbox import open_early

        open_early(Path(root), isolation)
    if add_site:
        add_site_packages(pth_files=False)
    from treemat.service import main as service_main

    return service_main(args, forked=True)


def add_site_packages(*, pth_files: bool = True) -> None:
    """What `site` adds to sys.path (site-packages; .pth files unless `pth_files` is False: a service and an
    in-process worker need none), if the interpreter started without it: treemat's launcher starts Python with
    `-S` (rules/private/launcher.bzl), since a relay and a one-shot action need only the standard library and this
    package, and `site` can cost as much as the rest of the interpreter's start. Every path that imports protobuf
    or click runs this first (a service once its sandbox helper is booting)."""
    from treemat.servicespawn import add_site_packages as add

    add(pth_files=pth_files)


def keep_bytecode_across_bazel_clean() -> None:
    """Run from a Bazel runfiles tree: its modules' compiled code goes to the user's cache, keyed by content.

    A runfiles tree is deleted by `bazel clean` and has a new path in every output base (every CI build), so
    Python's path-keyed caches compiled treemat again for every new worker (~15 ms of a relay's start) and, under
    a `sys.pycache_prefix`, kept a mirrored tree per output base for good. bytecode.py keys them by the source's
    content instead. Only where the cache's whole path is ours; an explicit PYTHONPYCACHEPREFIX or -B wins.
    """
    if sys.pycache_prefix is not None or sys.flags.dont_write_bytecode:
        return
    runfiles = os.path.dirname(os.path.abspath(__file__))
    while not runfiles.endswith(".runfiles") and os.path.dirname(runfiles) != runfiles:
        runfiles = os.path.dirname(runfiles)
    if not runfiles.endswith(".runfiles"):
        return  # a checkout or an installed package: Python's own __pycache__ next to the modules
    # layout.user_cache_dir's rule, spelled here: importing any treemat module first would compile it in place
    cache = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(cache):  # unset or relative (the XDG spec: ignored)
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(cache):  # no home ("~" unexpanded): never a relative cache, under Bazel's execroot
        return
    ours = os.path.join(cache, "treemat")
    store = os.path.join(ours, "bytecode")
    with contextlib.suppress(OSError):
        os.makedirs(cache, 0o700, exist_ok=True)
        os.mkdir(ours, 0o700)  # (importlib would make it with the umask's mode: 0775 under 002)
    with contextlib.suppress(OSError):
        os.mkdir(store, 0o700)
    written, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no .pyc in the runfiles for these two
    try:
        from treemat.bytecode import keep_compiled_by_content
        from treemat.trustpath import trusted_path
    finally:
        sys.dont_write_bytecode = written
    # only a store whose whole path is ours (anyone who can swap a dir on its way could plant compiled modules we
    # would run), the store itself too (one others can write, a symlink to such a dir), and made by us (in a user
    # namespace not mapping root another user's dir passes as root's): layout.check_private_dir's rule, spelled here
    real, refused = trusted_path(store)
    try:
        private = not refused and os.lstat(real).st_uid == os.geteuid()
    except OSError:
        private = False
    if private:
        keep_compiled_by_content(runfiles, real)


if __name__ == "__main__":
    keep_bytecode_across_bazel_clean()
    sys.exit(main())
