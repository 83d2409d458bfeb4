"""Entry point of the `//tools/treemat` py_binary and `python -m treemat`.

An `@flagfile` argument -> one-shot action (Bazel's local/sandboxed strategies; import-light: no click, no
protobuf, no CAS); anything else -> the `treemat` CLI, where `--persistent_worker` means `treemat worker`.
Run as a program, it keeps compiled modules in the user's cache (they survive `bazel clean`).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the one-shot runner or the CLI; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if "--persistent_worker" in args:
        from treemat.cli import main as cli_main

        return cli_main(["worker", *args])
    if any(arg.startswith("@") for arg in args):
        from treemat.flagfile import run_oneshot

        return run_oneshot(args)
    from treemat.cli import main as cli_main

    return cli_main(args)


def keep_bytecode_across_bazel_clean() -> None:
    """Compile imported modules into the user's cache, not next to them in Bazel's runfiles.

    `bazel clean` deletes the runfiles tree and the `__pycache__` in it, so every new worker (and every one-shot
    action) would compile all of treemat, click and protobuf again: ~140 ms on a worker's first action. An
    explicit PYTHONPYCACHEPREFIX or -B wins.
    """
    if sys.pycache_prefix is None and not sys.flags.dont_write_bytecode:
        # layout.user_cache_dir's rule, spelled here: importing any treemat module first would compile it in place
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        sys.pycache_prefix = os.path.join(cache, "treemat", "pycache")


if __name__ == "__main__":
    keep_bytecode_across_bazel_clean()
    sys.exit(main())
