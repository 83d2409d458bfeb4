"""Every tool is sandboxed, whatever its inputs and whatever the isolation mode: the classes of the fail-closed issue.

Each test runs in both sandboxed modes (`overlay`: hardlinked inputs under an overlayfs; `copy-on-write`: separate
inodes, the staged tree bound into the tool's view), and, through tools/test.sh, as an unprivileged user too.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.executor import ActionExecutor, ActionRequest, ActionResult, RequestInput
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.stack import ISOLATION_COW, ISOLATION_OVERLAY, Stack, open_stack

from ..support.harness import Worker, request
from ..support.swift import NO_SWIFTC, SWIFTC

PRISTINE = b"pristine input bytes\n" * 20
ACTION_TIMEOUT_S = 120


@pytest.fixture(params=[ISOLATION_OVERLAY, ISOLATION_COW])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    opened = open_stack(Root(tmp_path / "root"), isolation=request.param, background_cleanup=False)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def execroot(tmp_path: Path) -> Path:
    root = tmp_path / "execroot"
    (root / "in").mkdir(parents=True)
    (root / "in/a.txt").write_bytes(PRISTINE)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _execute(executor: ActionExecutor, request: ActionRequest) -> ActionResult:
    """Run one action with a hard deadline (a hang is a failure of its own)."""
    box: list[ActionResult] = []
    thread = threading.Thread(target=lambda: box.append(executor.execute(request)), daemon=True)
    thread.start()
    thread.join(ACTION_TIMEOUT_S)
    assert box, f"action hung for {ACTION_TIMEOUT_S}s: {request.spec.argv}"
    return box[0]


def _run(stack: Stack, execroot: Path, script: str, outputs: list[str], inputs: list[str] = ()) -> ActionResult:  # type: ignore[assignment]
    spec = ActionSpec(argv=["sh", "-c", script], outputs=outputs)
    listed = [RequestInput(path, _sha((execroot / path).read_bytes())) for path in inputs]
    return _execute(stack.executor, ActionRequest(spec, listed, execroot))


def _blobs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in (root / "cas").rglob("*") if p.is_file()}


def test_an_action_without_inputs_is_sandboxed_too(stack: Stack, execroot: Path) -> None:
    """The sandbox used to depend on a hardlinked input: with none, the tool ran with no namespace at all."""
    result = _run(stack, execroot, "readlink /proc/self/ns/pid > out/ns; echo $$ >> out/ns", ["out/ns"])
    assert result.exit_code == 0, result.output
    namespace, pid = (execroot / "out/ns").read_text().split()
    assert namespace != os.readlink("/proc/self/ns/pid"), "the tool shares the worker's pid namespace"
    assert pid == "2", "the tool runs under the sandbox's own init"
    assert stack.counters.snapshot().get(f"actions_isolation_{stack.isolation}") == 1


def test_no_process_of_a_tool_outlives_its_action(stack: Stack, execroot: Path) -> None:
    """A double-forked setsid daemon used to survive the action (and could rewrite outputs after the reply)."""
    token = f"treemat-daemon-{secrets.token_hex(6)}"
    script = (
        f"setsid sh -c 'touch daemon.started; sleep 300; : {token}' </dev/null >/dev/null 2>&1 & "
        "until [ -e daemon.started ]; do sleep 0.01; done; echo done > out/x"
    )
    result = _run(stack, execroot, script, ["out/x"], ["in/a.txt"])
    assert result.exit_code == 0, result.output
    survivors = subprocess.run(["pgrep", "-f", token], capture_output=True, text=True).stdout.split()
    for pid in survivors:  # never leave it running, whatever the verdict
        subprocess.run(["kill", "-9", pid], check=False)
    assert not survivors, f"a process of the tool outlived its action: {survivors}"


def test_the_execroot_is_read_only_to_the_tool(stack: Stack, execroot: Path) -> None:
    victim = execroot / "in/a.txt"
    script = f"chmod u+w {victim} 2>/dev/null; echo EVIL > {victim}; touch {execroot}/planted; echo ok > out/x"
    result = _run(stack, execroot, script, ["out/x"])
    assert victim.read_bytes() == PRISTINE, "the tool wrote Bazel's execroot"
    assert not (execroot / "planted").exists(), "the tool created a file in Bazel's execroot"
    assert result.exit_code == 0, result.output


def test_the_treemat_root_is_out_of_the_tools_reach(stack: Stack, execroot: Path) -> None:
    root = stack.root
    assert _run(stack, execroot, "cat in/a.txt > out/warm", ["out/warm"], ["in/a.txt"]).exit_code == 0
    before = _blobs(root)
    assert before, "the input was ingested"
    blob = next(iter(before))
    script = (
        f"ls -A {root} > out/seen; chmod u+w {root}/{blob}; echo EVIL > {root}/{blob}; "
        f"touch {root}/planted; mkdir -p {root}/verified && echo forged >> {root}/verified/forged.log; true"
    )
    result = _run(stack, execroot, script, ["out/seen"], ["in/a.txt"])
    assert result.exit_code == 0, result.output
    assert (execroot / "out/seen").read_text() == "", "the tool could list TREEMAT_ROOT"
    assert _blobs(root) == before and not (root / "planted").exists()
    assert not (root / "verified/forged.log").exists(), "the tool could write the verified ledger"


def test_a_planted_symlink_never_redirects_the_output_copy(stack: Stack, execroot: Path) -> None:
    """The confused deputy: the declared output's parent replaced by a link into TREEMAT_ROOT (or anywhere)."""
    root = stack.root
    assert _run(stack, execroot, "cat in/a.txt > out/warm", ["out/warm"], ["in/a.txt"]).exit_code == 0
    before = _blobs(root)
    for target in (f"{root}/cas", str(root), "/etc"):
        script = f"rm -rf out && ln -s {target} out"
        result = _run(stack, execroot, script, ["out/x"], ["in/a.txt"])
        assert result.exit_code != 0 and "refused" in result.output, result.output
    assert _blobs(root) == before, "the CAS changed"
    assert (execroot / "in/a.txt").read_bytes() == PRISTINE


def test_an_output_is_never_a_cas_inode(stack: Stack, execroot: Path) -> None:
    result = _run(stack, execroot, "ln in/a.txt out/x 2>/dev/null || cp in/a.txt out/x", ["out/x"], ["in/a.txt"])
    assert result.exit_code == 0, result.output
    output = execroot / "out/x"
    assert output.read_bytes() == PRISTINE
    assert output.stat().st_nlink == 1, "Bazel's output shares its inode with something else"
    blob_inodes = {p.stat().st_ino for p in (stack.root / "cas").rglob("*") if p.is_file()}
    assert output.stat().st_ino not in blob_inodes


def test_the_tool_gets_a_private_tmp(stack: Stack, execroot: Path) -> None:
    marker = f"treemat-tmp-{secrets.token_hex(4)}"
    first = _run(stack, execroot, f"touch /tmp/{marker} && ls -A /tmp > out/x", ["out/x"])
    assert first.exit_code == 0, first.output
    assert not Path("/tmp", marker).exists(), "the tool wrote the host's /tmp"
    second = _run(stack, execroot, f"ls -A /tmp > out/y; test ! -e /tmp/{marker}", ["out/y"])
    assert second.exit_code == 0, "one action's /tmp is seen by the next"


@pytest.mark.skipif(SWIFTC is None, reason=NO_SWIFTC)
def test_a_same_size_header_edit_behind_a_module_map_is_seen(stack: Stack, execroot: Path) -> None:
    """Clang checks a cached module against its headers by size and mtime; staged inputs all share one mtime,
    so a module cache kept across actions served the old header: edited 1 -> 2 -> 3, the binary printed 1, 1, 1."""
    (execroot / "mod").mkdir()
    (execroot / "mod/module.modulemap").write_text('module CVal {\n  header "val.h"\n  export *\n}\n')
    (execroot / "main.swift").write_text("import CVal\nprint(val())\n")
    argv = [
        str(SWIFTC),
        "-module-cache-path",
        "{TOOL_CACHE}/swift-module-cache",
        "-Xcc",
        "-fmodule-map-file=mod/module.modulemap",
        "main.swift",
        "-o",
        "out/bin",
    ]
    printed = []
    for value in (1, 2, 3):
        (execroot / "mod/val.h").write_text(f"static inline int val(void) {{ return {value}; }}\n")
        paths = ["mod/module.modulemap", "mod/val.h", "main.swift"]
        inputs = [RequestInput(p, _sha((execroot / p).read_bytes())) for p in paths]
        result = _execute(stack.executor, ActionRequest(ActionSpec(argv=argv, outputs=["out/bin"]), inputs, execroot))
        assert result.exit_code == 0, result.output
        printed.append(subprocess.run([execroot / "out/bin"], capture_output=True, text=True, check=True).stdout)
    assert printed == ["1\n", "2\n", "3\n"]


@pytest.mark.parametrize("removed", [("cas",), ("tmp",), ("exec",), ("cas", "tmp", "exec", "verified", "dircache")])
def test_a_warm_worker_survives_its_root_being_cleared(
    removed: tuple[str, ...], execroot: Path, tmp_path: Path
) -> None:
    """`rm -rf ~/.cache/treemat/cas` (a user clearing the cache) under a warm worker failed every later action."""
    root = tmp_path / "root"
    worker = Worker(execroot, root)
    try:
        for round_ in range(3):
            worker.send(request(execroot, ["in/a.txt"], [f"out/r{round_}"], ["cp", "in/a.txt", f"out/r{round_}"]))
            reply = worker.read()
            assert reply["exitCode"] == 0, (round_, reply)
            assert (execroot / f"out/r{round_}").read_bytes() == PRISTINE
            for name in removed:
                shutil.rmtree(root / name, ignore_errors=True)
    finally:
        assert worker.close() == 0, worker.stderr


def test_a_tool_kept_in_the_hosts_tmp_runs_where_the_overlay_shows_it(
    stack: Stack, execroot: Path, tmp_path: Path
) -> None:
    """Overlay mode shows the host's /tmp (read-only below, writes private): a toolchain kept there still runs;
    copy-on-write mode gives an empty private /tmp, and says what it could not run."""
    tool = tmp_path / "toolchain" / "hello"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho hello from /tmp > out/x\necho scribble > " + str(tool) + "\n")
    tool.chmod(0o755)
    result = _execute(stack.executor, ActionRequest(ActionSpec(argv=[str(tool)], outputs=["out/x"]), [], execroot))
    assert tool.read_text().startswith("#!/bin/sh"), "the tool wrote the host's /tmp"
    if stack.isolation == ISOLATION_OVERLAY:
        assert result.exit_code == 0, result.output
        assert (execroot / "out/x").read_text() == "hello from /tmp\n"
    else:
        assert result.exit_code == 127 and f"cannot run {str(tool)!r}" in result.output, result.output


def test_the_tool_starts_with_every_signal_at_its_default(stack: Stack, execroot: Path) -> None:
    """The tool inherited the Python helper's ignored SIGPIPE and SIGXFSZ: `yes | head -1` never got SIGPIPE."""
    result = _run(stack, execroot, "grep -E '^(SigIgn|SigBlk)' /proc/self/status > out/x", ["out/x"])
    assert result.exit_code == 0, result.output
    masks = {
        name: int(value, 16)
        for name, value in (line.split(":") for line in (execroot / "out/x").read_text().splitlines())
    }
    # (glibc's own signals 32 and 33 are no program's to set: they pass through as the worker got them)
    settable = sum(1 << (sig - 1) for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP))
    assert masks["SigIgn"] & settable == 0 and masks["SigBlk"] == 0, masks


def test_the_tool_holds_no_capability_now_or_after_exec(stack: Stack, execroot: Path) -> None:
    """Every capability set empty (the bounding set too, so no exec gains one) and no_new_privs set."""
    script = "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status > out/x"
    result = _run(stack, execroot, script, ["out/x"])
    assert result.exit_code == 0, result.output
    fields = dict(line.split(":") for line in (execroot / "out/x").read_text().splitlines())
    assert {name: int(value, 16) for name, value in fields.items()} == {
        "CapInh": 0,
        "CapPrm": 0,
        "CapEff": 0,
        "CapBnd": 0,
        "CapAmb": 0,
        "NoNewPrivs": 1,
    }
