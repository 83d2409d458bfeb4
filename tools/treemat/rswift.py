"""rules_swift's worker requests as treemat actions: the argv to run and the outputs to return.

rules_swift (3.x) runs SwiftCompile (and SwiftDumpAST) through its own C++ worker, `worker swiftc ...`, with
the JSON protocol, singleplex: a request carries the lines of the action's param file as `arguments` and every
input with its digest, but no list of outputs. So the outputs are found here, the way swiftc will write them:

- the output file map (`-output-file-map`, read from the staged input): per source `object` (`-emit-object`,
  `-c`), `llvm-bc` (`-emit-bc`), `const-values` (when const values are extracted), `ast-dump` (`-dump-ast`);
- every `-emit-*-path P` (module, objc header, interfaces, const values, ...), and beside `-emit-module-path M`
  the `.swiftdoc` swiftc writes there unless `-emit-module-doc-path` moves it;
- directories: `-Xwrapped-swift=-macro-expansion-dir=D`, `-index-store-path D`.

Undeclared by-products are left in the exec dir, so they vanish with its private upper layer: the
`.swiftsourceinfo` (returned only when `-Xwrapped-swift=-emit-swiftsourceinfo` asks for it, as rules_swift
then declares it), everything the worker's incremental mode would keep. The shared `-module-cache-path` under
bazel-out becomes treemat's per-action tool cache (`{TOOL_CACHE}`, over a read-only seed of the system
modules: toolcache.py), so no action sees another's module cache.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from treemat.errors import ProtocolError
from treemat.flagfile import TOOL_CACHE_PLACEHOLDER, ActionSpec

PERSISTENT_FLAG = "--persistent_worker"
WRAPPED = "-Xwrapped-swift="
MODULE_CACHE = f"{TOOL_CACHE_PLACEHOLDER}/swift_module_cache"
MAX_OUTPUT_FILE_MAP_BYTES = 16 << 20
# Output file map kinds -> the flag that makes swiftc write them (None: written whenever the map names them).
_MAP_KINDS: dict[str, tuple[str, ...]] = {
    "object": ("-emit-object", "-c"),
    "llvm-bc": ("-emit-bc",),
    "const-values": ("-emit-const-values", "-emit-const-values-path"),
    "ast-dump": ("-dump-ast",),
}
_FLAGS_WITH_VALUE = frozenset(
    ["-output-file-map", "-module-cache-path", "-index-store-path", "-module-name", "-target", "-o", "-sdk"]
)


@dataclass(frozen=True, slots=True)
class SwiftOutputs:
    """What a rules_swift compile writes that Bazel declared."""

    files: list[str]
    dirs: list[str]


def worker_command(startup: Sequence[str]) -> list[str]:
    """The tool prefix from the worker's start-up arguments (`swiftc`, without `--persistent_worker`)."""
    return [arg for arg in startup if arg != PERSISTENT_FLAG]


def action_spec(real_worker: str, startup: Sequence[str], arguments: Sequence[str], execroot: Path) -> ActionSpec:
    """The treemat action for one request: `real_worker <startup> <arguments>`, run one-shot in the exec dir.

    `arguments` are the param file's lines as Bazel sent them; the output file map is read from `execroot`
    (the same bytes the request stages, by its digest). ProtocolError when the arguments cannot be understood.
    """
    args = rewrite_module_cache(arguments)
    outputs = find_outputs(args, execroot)
    return ActionSpec(
        argv=[real_worker, *worker_command(startup), *args], outputs=outputs.files, output_dirs=outputs.dirs
    )


def rewrite_module_cache(arguments: Sequence[str]) -> list[str]:
    """`-module-cache-path <shared dir under bazel-out>` -> the action's own cache under `{TOOL_CACHE}`."""
    out = list(arguments)
    for index, arg in enumerate(out[:-1]):
        if arg == "-module-cache-path":
            out[index + 1] = MODULE_CACHE
    return out


def find_outputs(arguments: Sequence[str], execroot: Path) -> SwiftOutputs:
    """Declared outputs of a SwiftCompile / SwiftDumpAST request, from its arguments and output file map."""
    files: list[str] = []
    dirs: list[str] = []
    flags = set()
    output_file_map = None
    module_path = None
    doc_path_given = False
    source_info = False
    index = 0
    while index < len(arguments):
        arg = arguments[index]
        value = arguments[index + 1] if index + 1 < len(arguments) else None
        name, eq, inline = arg.partition("=")
        flags.add(name)
        if arg.startswith(WRAPPED):
            wrapped = arg[len(WRAPPED) :]
            if wrapped.startswith("-macro-expansion-dir="):
                dirs.append(wrapped.partition("=")[2])
            source_info = source_info or wrapped == "-emit-swiftsourceinfo"
        elif name.startswith("-emit-") and name.endswith("-path"):
            path = inline if eq else value
            if path is None:
                raise ProtocolError(f"{arg} has no value")
            files.append(path)
            module_path = path if name == "-emit-module-path" else module_path
            doc_path_given = doc_path_given or name == "-emit-module-doc-path"
            index += 0 if eq else 1
        elif arg in _FLAGS_WITH_VALUE and value is not None:
            if arg == "-output-file-map":
                output_file_map = value
            elif arg == "-index-store-path":
                dirs.append(value)
            index += 1
        index += 1
    if module_path is not None:
        stem = os.path.splitext(module_path)[0]
        if not doc_path_given:
            files.append(stem + ".swiftdoc")
        if source_info:
            files.append(stem + ".swiftsourceinfo")
    if output_file_map is not None:
        files += map_outputs(read_output_file_map(execroot, output_file_map), flags)
    return SwiftOutputs(files=_unique(files), dirs=_unique(dirs))


def read_output_file_map(execroot: Path, name: str) -> dict[str, dict[str, str]]:
    """The output file map `name` (a regular file inside `execroot`): {source: {kind: path}}; ProtocolError if
    it is outside (absolute, `..`: the worker's own stdin, another tree), not a regular file (a FIFO would
    block the worker), unreadable or not that shape."""
    if name.startswith("/") or ".." in name.split("/"):
        raise ProtocolError(f"the output file map {name} is not a path inside the execroot")
    try:
        fd = os.open(execroot / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"cannot read the output file map {name}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProtocolError(f"the output file map {name} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_OUTPUT_FILE_MAP_BYTES + 1)
    except OSError as exc:
        raise ProtocolError(f"cannot read the output file map {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_OUTPUT_FILE_MAP_BYTES:
        raise ProtocolError(f"the output file map {name} is over {MAX_OUTPUT_FILE_MAP_BYTES} bytes")
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"the output file map {name} is not JSON: {exc}") from None
    if not isinstance(parsed, dict) or not all(
        isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values()) for entry in parsed.values()
    ):
        raise ProtocolError(f"the output file map {name} is not {{source: {{kind: path}}}}")
    return parsed


def map_outputs(output_file_map: dict[str, dict[str, str]], flags: set[str]) -> list[str]:
    """The paths of the map whose kind this command line makes swiftc write."""
    wanted = {kind for kind, makers in _MAP_KINDS.items() if flags.intersection(makers)}
    return [path for entry in output_file_map.values() for kind, path in entry.items() if kind in wanted]


def outputs_over_inputs(spec: ActionSpec, inputs: set[str]) -> list[str]:
    """The request's outputs that would land on one of its `inputs` (a file, or a directory holding one)."""
    clashes = [path for path in spec.outputs if os.path.normpath(path) in inputs]
    for directory in map(os.path.normpath, spec.output_dirs):
        clashes += [path for path in inputs if path == directory or path.startswith(directory + "/")][:1]
    return clashes


def _unique(paths: list[str]) -> list[str]:
    return list(dict.fromkeys(paths))
