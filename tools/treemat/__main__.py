"""Entry point of the `//tools/treemat` py_binary and `python -m treemat`.

`--persistent_worker` -> Bazel persistent worker; an `@flagfile` argument -> one-shot action (Bazel's
local/sandboxed strategies); anything else -> the `treemat` CLI.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the worker, one-shot mode or the CLI; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if "--persistent_worker" in args:
        from treemat.worker import worker_main

        return worker_main(args)
    if any(arg.startswith("@") for arg in args):
        from treemat.flagfile import run_oneshot

        return run_oneshot(args)
    from treemat.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
