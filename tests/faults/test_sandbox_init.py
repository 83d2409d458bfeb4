"""Attacks on the tool's init (pid 1 of its namespace): the one process of the sandbox a tool can see.

Init holds the status socket on which the client hears the tool's end. A tool of the same uid could once reach
into init (ptrace, pidfd_getfd, /proc/1/fd: init was dumpable), take that socket and report its own end while its
processes went on running: the action replied, collected outputs a live process still changed, and the tool
outlived it. Both sandboxed modes; tools/test.sh runs them as an ordinary user too.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from treemat.executor import ActionRequest, ActionResult
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.stack import ISOLATION_COW, ISOLATION_OVERLAY, Stack, open_stack

from ..support.harness import worker_env

ACTION_TIMEOUT_S = 120

# Steals every descriptor of pid 1 it can (pidfd_getfd, x86_64 and aarch64 share the number), writes a forged
# `{"exit": 0}` on each socket, then leaves a process running that writes out/x after the forged report.
HIJACK = r"""
import ctypes, marshal, os, socket, sys, time
token, = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
stolen = []
try:
    names = os.listdir("/proc/1/fd")
except OSError as exc:
    names = []
    print("no /proc/1/fd:", exc.strerror, file=sys.stderr)
if names:
    pidfd = os.pidfd_open(1)
    for name in names:
        fd = libc.syscall(438, pidfd, int(name), 0)
        if fd >= 0:
            stolen.append(fd)
with open("out/stolen", "w") as handle:
    handle.write(f"{len(stolen)} stolen, {len(os.listdir('/proc/self/fd'))} of its own")
if os.fork() == 0:  # the survivor: it rewrites the output once the forged report went out
    os.setsid()
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(0.2)
    with open("out/x", "w") as handle:
        handle.write("late " + token)
    time.sleep(300)
    os._exit(0)
with open("out/x", "w") as handle:
    handle.write("first")
for fd in stolen:
    try:
        socket.socket(fileno=fd).send(marshal.dumps({"exit": 0}))
    except OSError:
        pass
if stolen:
    for fd in (0, 1, 2):
        os.close(fd)
    time.sleep(300)  # init waits for this one: only the forged report can end the action now
"""


@pytest.fixture(params=[ISOLATION_OVERLAY, ISOLATION_COW])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    opened = open_stack(Root(tmp_path / "root"), isolation=request.param, background_cleanup=False)
    try:
        yield opened
    finally:
        opened.close()


def _execute(stack: Stack, execroot: Path, argv: list[str], outputs: list[str]) -> ActionResult:
    box: list[ActionResult | BaseException] = []
    request = ActionRequest(ActionSpec(argv=argv, outputs=outputs), [], execroot)

    def run() -> None:
        try:
            box.append(stack.executor.execute(request))
        except BaseException as exc:  # an exception out of the executor is a failure of its own
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(ACTION_TIMEOUT_S)
    assert box, f"action hung for {ACTION_TIMEOUT_S}s"
    assert isinstance(box[0], ActionResult), f"the executor raised {box[0]!r}"
    return box[0]


def _kill_all(token: str) -> list[str]:
    survivors = subprocess.run(["pgrep", "-f", token], capture_output=True, text=True).stdout.split()
    for pid in survivors:
        subprocess.run(["kill", "-9", pid], check=False)
    return survivors


def test_a_tool_cannot_take_inits_status_socket_and_end_its_action_early(stack: Stack, tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    token = f"treemat-hijack-{secrets.token_hex(6)}"
    try:
        result = _execute(stack, execroot, [sys.executable, "-c", HIJACK, token], ["out/x", "out/stolen"])
    finally:
        survivors = _kill_all(token)
    assert result.exit_code == 0, result.output
    assert not survivors, f"a process of the tool outlived its action: {survivors}"
    stolen, _, own = (execroot / "out/stolen").read_text().partition(" stolen, ")
    assert stolen == "0", "the tool took descriptors of its sandbox's init"
    assert own != "0 of its own", "the tool cannot see its own descriptors (it must stay dumpable after exec)"
    assert (execroot / "out/x").read_text() == "first"


def test_dev_shm_counts_against_the_tools_one_tmpfs(stack: Stack, tmp_path: Path) -> None:
    """/dev/shm was a tmpfs of its own with no size: a tool could pin its /tmp's size in RAM, then as much again
    in /dev/shm (memory no OOM kill frees while the namespace lives). Every layer it writes shares one tmpfs."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    script = (
        "df -P -k /tmp | tail -1 > out/df; dd if=/dev/zero of=/dev/shm/fill bs=1M count=16 2>/dev/null; "
        "df -P -k /tmp | tail -1 >> out/df; ls -ld /dev/shm | cut -c1-10 >> out/df"
    )
    result = _execute(stack, execroot, ["sh", "-c", script], ["out/df"])
    assert result.exit_code == 0, result.output
    before, after, mode = (execroot / "out/df").read_text().splitlines()
    used = int(after.split()[2]) - int(before.split()[2])
    assert used >= 16 * 1024, f"16 MiB written to /dev/shm did not count in the tool's tmpfs:\n{before}\n{after}"
    assert mode == "drwxrwxrwt", mode


def _ipc_ids(listing: str) -> set[str]:
    """The ids of `ipcs -m` / `ipcs -q` output (the second column of its data rows)."""
    return {line.split()[1] for line in listing.splitlines() if line.startswith("0x") and len(line.split()) > 1}


def test_sysv_ipc_of_a_tool_neither_outlives_it_nor_reaches_the_next(stack: Stack, tmp_path: Path) -> None:
    """The tool shared the worker's IPC namespace: a SysV shared memory segment or message queue it made stayed
    after its kill-all (memory no namespace teardown freed) and the next tool could read it."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    before_m = subprocess.run(["ipcs", "-m"], capture_output=True, text=True, check=True).stdout
    before_q = subprocess.run(["ipcs", "-q"], capture_output=True, text=True, check=True).stdout
    made = _execute(stack, execroot, ["sh", "-c", "ipcmk -M 65536 > out/x && ipcmk -Q >> out/x"], ["out/x"])
    after_m = subprocess.run(["ipcs", "-m"], capture_output=True, text=True, check=True).stdout
    after_q = subprocess.run(["ipcs", "-q"], capture_output=True, text=True, check=True).stdout
    leaked_m, leaked_q = _ipc_ids(after_m) - _ipc_ids(before_m), _ipc_ids(after_q) - _ipc_ids(before_q)
    for flag, ids in (("-m", leaked_m), ("-q", leaked_q)):
        for ipc_id in ids:
            subprocess.run(["ipcrm", flag, ipc_id], check=False)
    assert made.exit_code == 0, made.output
    assert not leaked_m and not leaked_q, f"the tool's IPC objects outlived it: {leaked_m} {leaked_q}"
    seen = _execute(stack, execroot, ["sh", "-c", "ipcs -m > out/y; ipcs -q >> out/y"], ["out/y"])
    assert seen.exit_code == 0, seen.output
    assert not _ipc_ids((execroot / "out/y").read_text()), "the next tool sees IPC objects made outside it"


def test_a_tree_too_deep_to_recurse_left_in_the_exec_dir_is_removed(stack: Stack, tmp_path: Path) -> None:
    """A tool leaving a 1500-level tree in its exec dir (on disk under copy-on-write) made the exec dir's removal
    raise RecursionError out of the executor, and left the tree behind for good."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    deep = "mkdir t && cd t && i=0; while [ $i -lt 1500 ]; do mkdir a && cd a; i=$((i+1)); done; chmod 0 ."
    try:
        result = _execute(stack, execroot, ["sh", "-c", f"({deep}) && echo ok > out/x"], ["out/x"])
        assert result.exit_code == 0, result.output
        assert (execroot / "out/x").read_text() == "ok\n"
        after = _execute(stack, execroot, ["sh", "-c", "ls > out/x"], ["out/x"])
        assert after.exit_code == 0 and (execroot / "out/x").read_text() == "out\n", after.output
        stack.close()
        assert os.listdir(stack.root / "exec") == [], "the tool's tree was left behind"
    finally:
        subprocess.run(["rm", "-rf", str(tmp_path / "root")], check=False)  # (pytest's own removal recurses)


def test_signals_a_tool_sends_its_init_are_lost(stack: Stack, tmp_path: Path) -> None:
    """Init is a Python process: SIGINT had a handler there, so a tool's `kill -INT 1` reached it (pid 1 drops
    only signals it has no handler for), killed it and the whole namespace with it: exit 126 and not a word."""
    execroot = tmp_path / "execroot"
    execroot.mkdir()
    script = "for sig in INT TERM HUP USR1 USR2 QUIT ALRM PIPE; do kill -$sig 1; done; echo ok > out/x"
    result = _execute(stack, execroot, ["sh", "-c", script], ["out/x"])
    assert result.exit_code == 0, result.output
    assert (execroot / "out/x").read_text() == "ok\n"


def test_the_sandbox_knows_its_syscalls_under_another_personality(tmp_path: Path) -> None:
    """`setarch i686 bazel build` on x86_64: uname says i686, and the syscall numbers were looked up by it, so none
    was known: the helper sent a descriptor of -1, closed it, died with a traceback, and every action failed."""
    if not shutil.which("setarch") or os.uname().machine != "x86_64":
        pytest.skip("needs setarch(8) on x86_64")
    probe = "from treemat.sandboxview import Kernel; print(Kernel().numbers)"
    done = subprocess.run(
        ["setarch", "i686", sys.executable, "-c", probe], env=worker_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(56, 442, 126, 428)"
