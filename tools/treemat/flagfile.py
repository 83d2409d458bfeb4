"""The flagfile contract between rules/ and treemat (see docs/architecture.md), plus one-shot mode.

One argument per line (Args.set_param_file_format("multiline")):

    --output=<path>        declared output file (repeated)
    --output-dir=<path>    declared output directory (repeated)
    --env=NAME=VALUE       extra environment for the tool (repeated)
    --
    <tool> <args...>       `{EXEC_ROOT}` in any of them is replaced by the directory the tool runs in;
                           `{TOOL_CACHE}` by a persistent per-user cache directory for the tool's own caches
                           (e.g. swiftc's module cache), `_tool_cache` under the execroot in one-shot mode

Only treemat's own flagfile is expanded: the single `@file` Bazel passes (size-bounded, regular files only).
Tool arguments are never expanded. Because Bazel's worker strategy itself expands any flagfile line that
starts with `@` (recursively) but passes `@@...` through verbatim, the rules write a tool argument that starts
with `@` as `@@...`; treemat turns a leading `@@` back into `@`. So `-rpath @executable_path/Frameworks`, the
tool's own `@args.rsp` and even `@/dev/zero` reach the tool exactly as written.

This module stays import-light: one-shot mode (Bazel's local/sandboxed strategies) starts a fresh
process per action and must not pay for protobuf or the CAS.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from treemat.errors import ProtocolError

MAX_FLAGFILE_BYTES = 16 << 20
EXEC_ROOT_PLACEHOLDER = "{EXEC_ROOT}"
TOOL_CACHE_PLACEHOLDER = "{TOOL_CACHE}"


class ActionSpec:
    """What one action asks for: its tool command line, declared outputs and environment."""

    __slots__ = ("argv", "env", "output_dirs", "outputs")

    def __init__(
        self,
        argv: list[str],
        outputs: list[str] | None = None,
        output_dirs: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.outputs: list[str] = [] if outputs is None else outputs
        self.output_dirs: list[str] = [] if output_dirs is None else output_dirs
        self.env: dict[str, str] = {} if env is None else env

    def __repr__(self) -> str:
        return f"ActionSpec(argv={self.argv!r}, outputs={self.outputs!r}, output_dirs={self.output_dirs!r})"

    def argv_in(self, exec_dir: str, tool_cache: str | None = None) -> list[str]:
        """The tool argv with `{EXEC_ROOT}` -> `exec_dir` and `{TOOL_CACHE}` -> `tool_cache`."""
        cache = tool_cache if tool_cache is not None else os.path.join(exec_dir, "_tool_cache")
        return [
            arg.replace(EXEC_ROOT_PLACEHOLDER, exec_dir).replace(TOOL_CACHE_PLACEHOLDER, cache) for arg in self.argv
        ]


def request_arguments(arguments: list[str], execroot: str = "") -> list[str]:
    """The request's treemat arguments: the lines of its one `@flagfile`, or the arguments as Bazel expanded them.

    Only a request that is exactly one `@file` is read (relative to `execroot`, else to the cwd); any other
    `@...` argument is left alone.
    """
    if len(arguments) == 1 and arguments[0].startswith("@") and not arguments[0].startswith("@@"):
        return read_flagfile(os.path.join(execroot, arguments[0][1:]))
    return list(arguments)


def read_flagfile(path: str) -> list[str]:
    """Lines of a flagfile: a regular file of at most MAX_FLAGFILE_BYTES (never a FIFO or device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"cannot read flagfile {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ProtocolError(f"flagfile {path} is not a regular file")
        if info.st_size > MAX_FLAGFILE_BYTES:
            raise ProtocolError(f"flagfile {path} is {info.st_size} bytes, over the {MAX_FLAGFILE_BYTES} limit")
        data = os.read(fd, MAX_FLAGFILE_BYTES + 1)
    except OSError as exc:
        raise ProtocolError(f"cannot read flagfile {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FLAGFILE_BYTES:
        raise ProtocolError(f"flagfile {path} is over the {MAX_FLAGFILE_BYTES} byte limit")
    return split_flagfile(data.decode("utf-8", "surrogateescape"))


def split_flagfile(text: str) -> list[str]:
    """Bazel's multiline param files: one argument per `\\n` (a trailing `\\r` dropped), nothing else splits.

    `str.splitlines` would also split at `\\v`, `\\f`, `\\x1c`..`\\x1e`, `\\x85`, U+2028/2029: all legal inside
    an argument.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def unescape_tool_argument(arg: str) -> str:
    """`@@x` -> `@x` (the escape that keeps Bazel from expanding a tool argument as a flagfile)."""
    return arg[1:] if arg.startswith("@@") else arg


def parse_action_args(arguments: list[str]) -> ActionSpec:
    """Parse flagfile arguments into an ActionSpec; ProtocolError with a one-line reason if malformed."""
    outputs: list[str] = []
    output_dirs: list[str] = []
    env: dict[str, str] = {}
    for index, arg in enumerate(arguments):
        if arg == "--":
            argv = [unescape_tool_argument(arg) for arg in arguments[index + 1 :]]
            if not argv:
                raise ProtocolError("no tool command after '--' in the request arguments")
            return ActionSpec(argv=argv, outputs=outputs, output_dirs=output_dirs, env=env)
        name, sep, value = arg.partition("=")
        if not sep or not value:
            raise ProtocolError(
                f"unexpected request argument {arg[:200]!r} (expected --output=, --output-dir=, --env=)"
            )
        if name == "--output":
            outputs.append(value)
        elif name == "--output-dir":
            output_dirs.append(value)
        elif name == "--env":
            key, eq, env_value = value.partition("=")
            if not eq or not key:
                raise ProtocolError(f"--env needs NAME=VALUE, got {value[:200]!r}")
            env[key] = env_value
        else:
            raise ProtocolError(f"unknown request argument {name[:100]!r}")
    raise ProtocolError("request arguments have no '--' separating treemat flags from the tool command")


def run_oneshot(arguments: list[str]) -> int:
    """Run the action's tool in place (cwd is Bazel's execroot or sandbox); returns its exit status.

    Used when Bazel picks a non-worker strategy for the action: isolation is then the strategy's job.
    Startup flags before the flagfile (e.g. --protocol=json) are ignored.
    """
    flagfiles = [arg for arg in arguments if arg.startswith("@") and not arg.startswith("@@")]
    try:
        if len(flagfiles) != 1:
            raise ProtocolError(f"expected exactly one @flagfile argument, got {len(flagfiles)}")
        spec = parse_action_args(request_arguments(flagfiles))
    except ProtocolError as exc:
        print(f"treemat: error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.update(spec.env)
    try:
        for output in spec.outputs:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
        for output_dir in spec.output_dirs:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
    except (OSError, RecursionError) as exc:  # a path too long or too deep: one line, never a traceback
        what = exc.strerror if isinstance(exc, OSError) else "nested too deeply"
        print(f"treemat: error: cannot make an output's directory: {what}", file=sys.stderr)
        return 2
    try:
        return subprocess.run(spec.argv_in(os.getcwd()), env=env, check=False).returncode
    except OSError as exc:
        print(f"treemat: error: cannot run {spec.argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127
