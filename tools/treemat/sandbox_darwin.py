"""The macOS sandbox: `sandbox-exec` with a generated profile, the way Bazel's darwin-sandbox does it.

macOS has no mount or pid namespaces. What Linux gets from them is asked of the Seatbelt kernel policy instead:

- writes are denied everywhere but the exec dir, the action's private cache and tmp dirs (and the usual
  device nodes): the execroot, TREEMAT_ROOT and the rest of the disk are read-only to the tool;
- TREEMAT_ROOT's store and ledger (`cas/`, `verified/`, `dircache/`) cannot even be read;
- the tool runs in a session of its own, killed whole once the tool exits (toolrun.py).

Inputs on APFS are `clonefile(2)` copies (separate inodes), so no write can reach a CAS blob anyway; the
profile is the second wall. What only a macOS run can confirm is listed in docs/hermeticity.md.
"""

from __future__ import annotations

from collections.abc import Sequence

SANDBOX_EXEC = "/usr/bin/sandbox-exec"
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/dtracehelper")


def quote(path: str) -> str:
    """A path as an SBPL string literal (backslash and double quote escaped; no control characters)."""
    if any(ord(char) < 0x20 for char in path):
        raise ValueError(f"a sandbox path cannot hold control characters: {path!r}")
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def profile(writable: Sequence[str], hidden: Sequence[str]) -> str:
    """The Seatbelt profile: everything allowed but writes outside `writable` and any access under `hidden`.

    Later rules win in SBPL, so the allow-list for writes comes after the blanket denial, and the hidden
    paths come last (a writable dir inside a hidden one stays hidden only if listed after it: it is not).
    """
    lines = [
        "(version 1)",
        "(allow default)",
        "(deny file-write*)",
        "(allow file-write*",
        *(f"    (subpath {quote(path)})" for path in writable),
        *(f"    (literal {quote(device)})" for device in _DEVICES),
        '    (regex #"^/dev/fd/[0-9]+$")',
        '    (regex #"^/dev/ttys[0-9]+$"))',
    ]
    if hidden:
        lines += [
            "(deny file-read* file-write*",
            *(f"    (subpath {quote(path)})" for path in hidden),
            ")",
        ]
    return "\n".join(lines) + "\n"


def wrap(profile_path: str, argv: Sequence[str]) -> list[str]:
    """The tool's command line under `sandbox-exec -f PROFILE`."""
    return [SANDBOX_EXEC, "-f", profile_path, *argv]
