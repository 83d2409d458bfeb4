"""treemat in place of rules_swift's worker (rswift.py, rswift_worker.py), driven with requests in the shape
rules_swift 3.6.1 sends (recorded on Bazel 7.7.1: the param file's lines as `arguments`, every input with its
digest, no request id, no outputs) and a real swiftc compile.

The real worker here is a stand-in doing what rules_swift's C++ worker does to a command line on Linux (drop
the `-Xwrapped-swift=` flags, `-file-prefix-pwd-is-dot` -> `-file-prefix-map $PWD=.`, make the macro
expansion dir, run swiftc once): that worker is a Bazel-built binary; the e2e test
(tests/e2e/test_rules_swift_bazel7.py) runs the real one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from treemat.errors import ProtocolError
from treemat.protocol import read_requests
from treemat.rswift import MODULE_CACHE, action_spec, find_outputs
from treemat.rswift_worker import make_rswift_handler, tool_path
from treemat.toolcache import swift_seed_recipe
from treemat.worker import WorkerServer

from ..support.stacks import make_stack
from ..support.swift import NO_SWIFTC, SWIFTC

BIN = "bazel-out/k8-fastbuild/bin"
PROTOCOLS = "external/build_bazel_rules_swift/swift/toolchains/config/const_protocols_to_gather.json"
REAL_WORKER = """\
#!/usr/bin/env python3
import os, sys
args, out = sys.argv[1:], []
for arg in args:
    if arg == "-Xwrapped-swift=-file-prefix-pwd-is-dot":
        out += ["-file-prefix-map", os.getcwd() + "=."]
    elif arg.startswith("-Xwrapped-swift=-macro-expansion-dir="):
        os.makedirs(arg.partition("dir=")[2], exist_ok=True)
    elif not arg.startswith("-Xwrapped-swift="):
        out.append(arg)
os.execv(out[0], out)
"""


def params(module: str, sources: list[str]) -> list[str]:
    """A SwiftCompile param file of rules_swift 3.6.1 (Linux, fastbuild), as recorded."""
    pkg = f"{BIN}/{module}"
    return [
        "-target", "x86_64-unknown-linux-gnu",
        f"-Xwrapped-swift=-bazel-target-label=@//{module}:{module}",
        "-emit-object",
        "-output-file-map", f"{pkg}/{module}.output_file_map.json",
        "-Xfrontend", "-no-clang-module-breadcrumbs",
        "-emit-module-path", f"{pkg}/{module}.swiftmodule",
        "-enforce-exclusivity=checked",
        "-emit-const-values-path", f"{pkg}/{module}_objs/{sources[0]}.swiftconstvalues",
        "-Xfrontend", "-const-gather-protocols-file", "-Xfrontend", PROTOCOLS,
        "-DDEBUG", "-Onone",
        "-Xfrontend", "-no-serialize-debugging-options",
        "-enable-testing", "-gline-tables-only",
        "-Xwrapped-swift=-file-prefix-pwd-is-dot",
        "-file-compilation-dir", ".",
        "-module-cache-path", f"{BIN}/_swift_module_cache",
        f"-Xwrapped-swift=-macro-expansion-dir={pkg}/{module}.macro-expansions",
        "-Xcc", "-iquote.",
        "-enable-batch-mode",
        "-module-name", module,
        "-parse-as-library",
        *[f"{module}/{source}" for source in sources],
    ]  # fmt: skip


def output_file_map(module: str, sources: list[str]) -> dict[str, dict[str, str]]:
    objs = f"{BIN}/{module}/{module}_objs"
    return {
        f"{module}/{s}": {
            "ast-dump": f"{objs}/{s}.ast",
            "const-values": f"{objs}/{s}.swiftconstvalues",
            "object": f"{objs}/{s}.o",
        }
        for s in sources
    }


def write_module(execroot: Path, module: str, sources: dict[str, str]) -> list[str]:
    """Sources and output file map of `module` in `execroot`; returns its request arguments."""
    for name, text in sources.items():
        (execroot / module).mkdir(parents=True, exist_ok=True)
        (execroot / module / name).write_text(text)
    (execroot / PROTOCOLS).parent.mkdir(parents=True, exist_ok=True)
    (execroot / PROTOCOLS).write_text("[]\n")
    ofm = execroot / BIN / module / f"{module}.output_file_map.json"
    ofm.parent.mkdir(parents=True, exist_ok=True)
    ofm.write_text(json.dumps(output_file_map(module, list(sources))))
    return params(module, list(sources))


def request_json(execroot: Path, arguments: list[str], inputs: list[str]) -> bytes:
    """A JSON WorkRequest as Bazel 7 sends rules_swift's worker: no requestId, digests base64 of the hex."""
    entries = []
    for rel in inputs:
        digest = hashlib.sha256((execroot / rel).read_bytes()).hexdigest()
        entries.append({"path": rel, "digest": base64.b64encode(digest.encode()).decode()})
    return json.dumps({"arguments": arguments, "inputs": entries}).encode()


def test_outputs_come_from_the_arguments_and_the_output_file_map(tmp_path: Path) -> None:
    args = write_module(tmp_path, "Lib", {"a.swift": "", "b.swift": ""})
    found = find_outputs(args, tmp_path)
    objs = f"{BIN}/Lib/Lib_objs"
    assert sorted(found.files) == sorted(
        [
            f"{BIN}/Lib/Lib.swiftmodule",
            f"{BIN}/Lib/Lib.swiftdoc",
            f"{objs}/a.swift.swiftconstvalues",
            f"{objs}/a.swift.o",
            f"{objs}/b.swift.o",
            f"{objs}/b.swift.swiftconstvalues",
        ]
    ), "objects and const values from the map (not the AST dumps: no -dump-ast), module and doc from the flags"
    assert found.dirs == [f"{BIN}/Lib/Lib.macro-expansions"]
    assert not any(path.endswith(".swiftsourceinfo") for path in found.files), "undeclared by rules_swift 3.x"


def test_requested_source_info_and_other_emitted_paths_are_outputs(tmp_path: Path) -> None:
    args = write_module(tmp_path, "Lib", {"a.swift": ""})
    args += ["-Xwrapped-swift=-emit-swiftsourceinfo", "-emit-objc-header-path", f"{BIN}/Lib/Lib-Swift.h"]
    args += ["-index-store-path", f"{BIN}/Lib/Lib.indexstore"]
    found = find_outputs(args, tmp_path)
    assert f"{BIN}/Lib/Lib.swiftsourceinfo" in found.files
    assert f"{BIN}/Lib/Lib-Swift.h" in found.files
    assert f"{BIN}/Lib/Lib.indexstore" in found.dirs


def test_dump_ast_returns_the_ast_files_only(tmp_path: Path) -> None:
    args = write_module(tmp_path, "Lib", {"a.swift": ""})
    args = [arg for arg in args if arg not in ("-emit-object",)]
    cut = args.index("-emit-module-path")
    args = [*args[:cut], *args[cut + 2 :], "-dump-ast"]
    cut = args.index("-emit-const-values-path")
    args = [*args[:cut], *args[cut + 2 :]]
    found = find_outputs(args, tmp_path)
    assert found.files == [f"{BIN}/Lib/Lib_objs/a.swift.ast"]


def test_the_shared_module_cache_becomes_the_actions_own(tmp_path: Path) -> None:
    args = write_module(tmp_path, "Lib", {"a.swift": ""})
    spec = action_spec("/w/real", ["/opt/swift/usr/bin/swiftc"], args, tmp_path)
    assert spec.argv[:2] == ["/w/real", "/opt/swift/usr/bin/swiftc"]
    assert spec.argv[spec.argv.index("-module-cache-path") + 1] == MODULE_CACHE
    assert f"{BIN}/_swift_module_cache" not in spec.argv


def test_rules_swift_worker_command_lines_get_the_swiftc_seed() -> None:
    compile_args = ["-module-name", "M", "-Onone", "-module-cache-path", MODULE_CACHE, "a.swift"]
    direct = swift_seed_recipe(["/opt/swift/usr/bin/swiftc", *compile_args])
    assert direct is not None
    assert swift_seed_recipe(["/x/worker_real", "/opt/swift/usr/bin/swiftc", *compile_args]) == direct


def test_the_real_worker_is_run_from_the_staged_inputs_when_listed(tmp_path: Path) -> None:
    real = tmp_path / "bazel-out" / "exec" / "worker_real"
    real.parent.mkdir(parents=True)
    real.write_text("")
    assert tool_path(str(real), tmp_path, {"bazel-out/exec/worker_real"}) == "{EXEC_ROOT}/bazel-out/exec/worker_real"
    assert tool_path(str(real), tmp_path, set()) == str(real.resolve())


@pytest.mark.swift
@pytest.mark.skipif(SWIFTC is None, reason=NO_SWIFTC)
def test_a_recorded_shape_request_compiles_in_a_private_exec_dir(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    real = tmp_path / "tools" / "worker_real"
    real.parent.mkdir()
    real.write_text(REAL_WORKER)
    real.chmod(0o755)
    sources = {"a.swift": "public func a() -> Int { 1 }\n", "b.swift": "public func b() -> Int { a() + 1 }\n"}
    args = write_module(execroot, "Lib", sources)
    inputs = ["Lib/a.swift", "Lib/b.swift", f"{BIN}/Lib/Lib.output_file_map.json", PROTOCOLS]
    stream = io.BytesIO(request_json(execroot, args, inputs))
    out = io.BytesIO()
    with make_stack(tmp_path / "root") as stack:
        handler = make_rswift_handler(stack, execroot, str(real), [str(SWIFTC)])
        WorkerServer(out, handler, protocol="json", max_workers=1).serve(read_requests(stream, "json"))
    reply = json.loads(out.getvalue())
    assert reply["exitCode"] == 0, reply["output"]
    published = [json.loads(path.read_text()) for path in (tmp_path / "root" / "stats").glob("*.json")]
    assert [record["role"] for record in published] == ["rules_swift worker"], "what `treemat stats` shows"
    assert "requestId" not in reply
    for path in find_outputs(args, execroot).files:
        assert (execroot / path).is_file(), f"{path} was not returned"
    assert (execroot / BIN / "Lib" / "Lib.macro-expansions").is_dir()
    assert not (execroot / BIN / "Lib" / "Lib.swiftsourceinfo").exists(), "undeclared: stays in the exec dir"
    assert not (execroot / BIN / "_swift_module_cache").exists(), "the shared module cache is never written"
    assert str(tmp_path) not in (execroot / BIN / "Lib" / "Lib_objs" / "a.swift.o").read_bytes().decode("latin-1")


def test_without_persistent_worker_it_becomes_the_real_worker(tmp_path: Path) -> None:
    real = tmp_path / "worker_real"
    real.write_text('#!/bin/sh\necho "real:$*"\n')
    real.chmod(0o755)
    code = textwrap.dedent(
        f"""
        import sys
        from treemat.rswift_worker import main
        sys.exit(main(["swiftc", "@x.params"], real_worker={str(real)!r}))
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), check=True)
    assert run.stdout == "real:swiftc @x.params\n"


@pytest.mark.parametrize("where", ["absolute", "parent", "stdin"])
def test_an_output_file_map_outside_the_execroot_is_refused(tmp_path: Path, where: str) -> None:
    """The map is read by the worker, relative to the execroot: never an absolute path or `..` (which could name
    the worker's own stdin, Bazel's protocol stream, or another tree's file)."""
    execroot = tmp_path / "execroot"
    args = write_module(execroot, "Lib", {"a.swift": "public func a() -> Int { 1 }\n"})
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(output_file_map("Lib", ["a.swift"])))
    named = {"absolute": str(outside), "parent": "../outside.json", "stdin": "/proc/self/fd/0"}[where]
    args[args.index("-output-file-map") + 1] = named
    with pytest.raises(ProtocolError, match="inside the execroot"):
        action_spec("worker", ["swiftc"], args, execroot)


def test_an_output_file_map_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    args = write_module(execroot, "Lib", {"a.swift": "public func a() -> Int { 1 }\n"})
    fifo = execroot / BIN / "Lib" / "Lib.output_file_map.json"
    fifo.unlink()
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            action_spec("worker", ["swiftc"], args, execroot)
            outcome.append(None)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # the old code blocks in open(): unblock it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading the output file map waited on a FIFO")
    assert isinstance(outcome[0], ProtocolError) and "not a regular file" in str(outcome[0]), outcome


def test_a_request_whose_outputs_name_its_inputs_is_refused_and_the_inputs_stay(tmp_path: Path) -> None:
    """Arguments that send an output onto one of the request's inputs (here the module path onto a source): the
    request fails with one line before anything runs; the input is untouched; the worker keeps serving."""
    execroot = tmp_path / "execroot"
    real = tmp_path / "worker_real"
    real.write_text(  # writes every -emit-*-path it is given
        "#!/usr/bin/env python3\nimport contextlib, os, sys\nargs = sys.argv[1:]\n"
        "for flag, value in zip(args, args[1:]):\n"
        "    if flag.startswith('-emit-') and flag.endswith('-path'):\n"
        "        with contextlib.suppress(FileNotFoundError):\n"
        "            os.unlink(value)\n"
        "        open(value, 'w').write('overwritten')\n"
        "        open(value.replace('.swift', '.swiftdoc'), 'w').write('doc')\n"
    )
    real.chmod(0o755)
    args = write_module(execroot, "Lib", {"a.swift": "public func a() -> Int { 1 }\n"})
    args[args.index("-emit-module-path") + 1] = "Lib/a.swift"
    del args[args.index("-output-file-map") : args.index("-output-file-map") + 2]
    inputs = ["Lib/a.swift", PROTOCOLS]
    stream = io.BytesIO(request_json(execroot, args, inputs) + b"\n" + b"{not json\n")
    out = io.BytesIO()
    with make_stack(tmp_path / "root") as stack:
        handler = make_rswift_handler(stack, execroot, str(real), ["swiftc"])
        WorkerServer(out, handler, protocol="json", max_workers=1).serve(read_requests(stream, "json"))
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert replies[0]["exitCode"] == 1 and "Lib/a.swift" in replies[0]["output"], replies
    assert replies[0]["output"].count("\n") == 1, replies[0]["output"]
    assert (execroot / "Lib/a.swift").read_text() == "public func a() -> Int { 1 }\n"
    assert replies[1]["exitCode"] == 1 and "malformed" in replies[1]["output"], replies
