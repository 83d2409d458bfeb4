"""Entry point of the `//tools/treemat` py_binary and `python -m treemat`.

An `@flagfile` argument -> one-shot action (Bazel's local/sandboxed strategies; import-light: no click, no
protobuf, no CAS); anything else -> the `treemat` CLI, where `--persistent_worker` means `treemat worker`.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    sys.exit(main())
