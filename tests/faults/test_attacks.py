"""Hermeticity attacks: tools and outsiders trying to make treemat serve bytes other than the declared ones.

Every attack ends in one of: `prevented` (the action ran and saw exactly the declared bytes; the CAS is
pristine), `detected` (the action failed with a clear message), `wrong` (exit 0 with other bytes: must never
happen) or `hang` (must never happen). The table is printed at the end (`pytest -s tests/faults`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.errors import CasError
from treemat.executor import ActionExecutor, ActionRequest, ActionResult, RequestInput
from treemat.flagfile import ActionSpec
from treemat.layout import Root
from treemat.stack import ISOLATION_OVERLAY, open_stack

from ..support.harness import Worker, request
from ..support.stacks import make_executor
from .tampering import tamper_in_place

PRISTINE = b"pristine input bytes\n" * 20
ACTION_TIMEOUT_S = 60


class Tally:
    """Outcome per attack, printed as a table when the module's tests are done."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def record(self, attack: str, outcome: str) -> None:
        self.rows.append((attack, outcome))
        assert outcome in ("prevented", "detected"), f"{attack}: {outcome}"

    def table(self) -> str:
        counts = {
            name: sum(1 for _a, o in self.rows if o == name) for name in ("prevented", "detected", "wrong", "hang")
        }
        lines = [f"{'attack':<72} outcome", "-" * 82]
        lines += [f"{attack:<72} {outcome}" for attack, outcome in self.rows]
        lines.append("-" * 82)
        lines.append(
            f"attacks tried: {len(self.rows)}, prevented: {counts['prevented']}, detected (action failed): "
            f"{counts['detected']}, wrong bytes served: {counts['wrong']}, hangs: {counts['hang']}"
        )
        return "\n".join(lines)


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    board = Tally()
    yield board
    print("\n[hermeticity attacks]\n" + board.table())


@pytest.fixture
def execroot(tmp_path: Path) -> Path:
    root = tmp_path / "execroot"
    (root / "in").mkdir(parents=True)
    (root / "in/a.txt").write_bytes(PRISTINE)
    (root / "in/b.txt").write_bytes(b"other bytes entirely\n" * 20)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inputs(execroot: Path, *paths: str) -> list[RequestInput]:
    return [RequestInput(p, _sha((execroot / p).read_bytes())) for p in paths]


def _run(executor: ActionExecutor, execroot: Path, script: str, outputs: list[str], *inputs: str) -> ActionResult:
    """Run `sh -c script` as an action, with a hard deadline (a hang is a failure of its own)."""
    spec = ActionSpec(argv=["sh", "-c", script], outputs=outputs)
    box: list[ActionResult] = []
    thread = threading.Thread(
        target=lambda: box.append(executor.execute(ActionRequest(spec, _inputs(execroot, *inputs), execroot))),
        daemon=True,
    )
    thread.start()
    thread.join(ACTION_TIMEOUT_S)
    if not box:
        raise AssertionError(f"action hung for {ACTION_TIMEOUT_S}s: {script}")
    return box[0]


def _victim(executor: ActionExecutor, execroot: Path, name: str) -> str:
    """What a later action reads as in/a.txt: 'prevented' if pristine, 'detected' if it failed, else 'wrong'."""
    result = _run(executor, execroot, f"cat in/a.txt > out/{name}", [f"out/{name}"], "in/a.txt")
    if result.exit_code != 0:
        return "detected"
    return "prevented" if (execroot / "out" / name).read_bytes() == PRISTINE else "wrong"


def _blob(root: Path) -> Path:
    digest = _sha(PRISTINE)
    return root / "cas" / digest[:2] / digest


@pytest.fixture
def stack_root(tmp_path: Path) -> Path:
    return tmp_path / "root"


TOOL_ATTACKS: dict[str, Callable[[Path], str]] = {
    "tool: chmod u+w + cp -p over an input": lambda root: "chmod u+w in/a.txt; cp -p in/b.txt in/a.txt",
    "tool: python shutil.copy2 over an input": lambda root: (
        f"chmod u+w in/a.txt; {sys.executable} -c \"import shutil; shutil.copy2('in/b.txt', 'in/a.txt')\""
    ),
    "tool: write, then restore mode and mtime": lambda root: (
        "chmod u+w in/a.txt; echo EVIL > in/a.txt; chmod 440 in/a.txt; touch -d 2000-01-01Z in/a.txt"
    ),
    "tool: write the CAS blob by its path": lambda root: (
        f"chmod u+w {_blob(root)}; echo EVIL > {_blob(root)}; echo EVIL > {_blob(root)}.new; "
        f"mv {_blob(root)}.new {_blob(root)}"
    ),
    "tool: write through /proc/<pid>/root of every process": lambda root: (
        f"for p in /proc/[0-9]*; do chmod u+w $p/root{_blob(root)}; echo EVIL > $p/root{_blob(root)}; done"
    ),
    "tool: remount TREEMAT_ROOT rw, unmount it, nested userns": lambda root: (
        f"mount -o remount,rw {root}; umount -l {root}; "
        f"unshare -U -r -m sh -c 'mount -o remount,rw {root}; umount {root}; echo EVIL > {_blob(root)}'"
    ),
}


@pytest.mark.parametrize("attack", list(TOOL_ATTACKS))
def test_tools_cannot_change_what_later_actions_see(
    attack: str, execroot: Path, stack_root: Path, tally: Tally
) -> None:
    executor = make_executor(stack_root)
    assert _victim(executor, execroot, "warm-up") == "prevented"
    _run(executor, execroot, TOOL_ATTACKS[attack](stack_root), [], "in/a.txt", "in/b.txt")
    warm = _victim(executor, execroot, "warm")
    fresh = _victim(make_executor(stack_root), execroot, "fresh")
    assert _blob(stack_root).read_bytes() == PRISTINE, "the CAS blob itself is untouched"
    tally.record(attack, "prevented" if (warm, fresh) == ("prevented", "prevented") else f"{warm}/{fresh}")


def test_two_workers_sharing_a_cas_warm_worker_is_not_fooled(execroot: Path, stack_root: Path, tally: Tally) -> None:
    first, second = make_executor(stack_root), make_executor(stack_root)
    assert _victim(second, execroot, "warm-up") == "prevented"  # worker 2 now knows the blob
    _run(first, execroot, TOOL_ATTACKS["tool: write, then restore mode and mtime"](stack_root), [], "in/a.txt")
    tally.record("two workers: worker 1's tool writes, worker 2 (warm) stages", _victim(second, execroot, "w2"))


OUTSIDER_ATTACKS: dict[str, Callable[[Path], None]] = {
    "outsider: same-size in-place write, mode+mtime kept": lambda blob: tamper_in_place(
        blob, PRISTINE.replace(b"pristine", b"poisoned")
    ),
    "outsider: truncated in place, mode+mtime kept": lambda blob: tamper_in_place(blob, PRISTINE[:7]),
    "outsider: blob replaced by a symlink to /etc/passwd": lambda blob: (blob.unlink(), blob.symlink_to("/etc/passwd")),
    "outsider: blob replaced by another file, same mode+mtime": lambda blob: _replace_with_twin(blob),
}


def _replace_with_twin(blob: Path) -> None:
    twin = blob.with_name("twin")
    twin.write_bytes(PRISTINE.replace(b"pristine", b"poisoned"))
    info = blob.stat()
    os.chmod(twin, info.st_mode & 0o777)
    os.utime(twin, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.replace(twin, blob)


@pytest.mark.parametrize("warm", [True, False], ids=["warm-worker", "fresh-worker"])
@pytest.mark.parametrize("attack", list(OUTSIDER_ATTACKS))
def test_the_cas_never_serves_a_corrupt_blob(
    attack: str, warm: bool, execroot: Path, stack_root: Path, tally: Tally
) -> None:
    executor = make_executor(stack_root)
    assert _victim(executor, execroot, "warm-up") == "prevented"
    OUTSIDER_ATTACKS[attack](_blob(stack_root))
    outcome = _victim(executor if warm else make_executor(stack_root), execroot, "after")
    tally.record(f"{attack} ({'warm' if warm else 'fresh'} worker)", outcome)


def test_a_blob_written_while_an_action_runs_fails_that_action(execroot: Path, stack_root: Path, tally: Tally) -> None:
    executor = make_executor(stack_root)
    assert _victim(executor, execroot, "warm-up") == "prevented"
    # a handshake through two FIFOs outside /tmp (the tool's /tmp is private; a FIFO opens for writing on a
    # read-only mount): the tool says it runs, waits while the blob is written, then reads its input
    pipes = Path(tempfile.mkdtemp(prefix="treemat-handshake-", dir="/var/tmp"))
    started, go = pipes / "started", pipes / "go"
    os.mkfifo(started)
    os.mkfifo(go)
    script = f"echo running > {started}; read answer < {go}; cat in/a.txt > out/during"
    box: list[ActionResult] = []
    spec = ActionSpec(argv=["sh", "-c", script], outputs=["out/during"])
    thread = threading.Thread(
        target=lambda: box.append(executor.execute(ActionRequest(spec, _inputs(execroot, "in/a.txt"), execroot)))
    )
    thread.start()
    try:
        assert started.read_text() == "running\n"
        tamper_in_place(_blob(stack_root), PRISTINE.replace(b"pristine", b"poisoned"))
        go.write_text("go\n")
    finally:
        shutil.rmtree(pipes)
    thread.join(ACTION_TIMEOUT_S)
    result = box[0]
    if result.exit_code == 0:
        outcome = "prevented" if (execroot / "out/during").read_bytes() == PRISTINE else "wrong"
    else:
        assert "modified in the CAS while the action ran" in result.output and "in/a.txt" in result.output
        outcome = "detected"
    tally.record("outsider writes a blob while an action that staged it runs", outcome)
    assert _victim(executor, execroot, "next") == "prevented", "the blob was quarantined and re-ingested"


def test_at_arguments_reach_the_tool_verbatim(execroot: Path, stack_root: Path, tally: Tally) -> None:
    (execroot / "in/args.rsp").write_text("SHOULD-NOT-BE-EXPANDED\n")
    worker = Worker(execroot, stack_root)
    argv = [
        "sh",
        "-c",
        'printf "%s\\n" "$@" > out/argv',
        "sh",
        "-rpath",
        "@executable_path/Frameworks",
        "@in/args.rsp",
        "@/dev/zero",
        "@loader_path",
    ]
    worker.send(request(execroot, ["in/args.rsp"], ["out/argv"], argv))
    reply = worker.read()
    seen = (execroot / "out/argv").read_text().splitlines() if reply["exitCode"] == 0 else []
    assert worker.close() == 0
    ok = seen == ["-rpath", "@executable_path/Frameworks", "@in/args.rsp", "@/dev/zero", "@loader_path"]
    tally.record("@rpath / @args.rsp / @/dev/zero tool arguments", "prevented" if ok else f"wrong {seen}")


def test_a_request_flagfile_of_dev_zero_is_a_one_line_error(execroot: Path, stack_root: Path, tally: Tally) -> None:
    worker = Worker(execroot, stack_root)
    worker.send({"arguments": ["@/dev/zero"], "inputs": []})
    reply = worker.read()
    worker.send(request(execroot, ["in/a.txt"], ["out/ok"], ["cp", "in/a.txt", "out/ok"]))
    after = worker.read()
    assert worker.close() == 0
    assert reply["exitCode"] != 0 and "not a regular file" in reply["output"] and reply["output"].count("\n") <= 1
    assert after["exitCode"] == 0, "the worker keeps serving"
    tally.record("request flagfile @/dev/zero", "detected")


def test_gc_in_a_loop_never_breaks_concurrent_ingests(tmp_path: Path, tally: Tally) -> None:
    store = ContentStore(Root(tmp_path / "root"), counters=Counters())
    stop = threading.Event()
    failures: list[str] = []
    ingested = [0]

    def ingest(worker: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                store.ingest_bytes(f"blob {worker} {n}\n".encode() * 64, executable=False)
                ingested[0] += 1
            except CasError as exc:
                failures.append(str(exc))
            n += 1

    threads = [threading.Thread(target=ingest, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    gc_runs = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        ContentStore(Root(tmp_path / "root"), counters=Counters()).gc(0)
        gc_runs += 1
    stop.set()
    for thread in threads:
        thread.join()
    print(f"\n[gc vs ingest] {gc_runs} gc runs, {ingested[0]} ingests, {len(failures)} failures")
    assert gc_runs > 5 and ingested[0] > 50
    assert failures == []
    tally.record("cas gc in a loop against concurrent ingests", "prevented")


def test_odd_input_types_are_refused_without_hanging(execroot: Path, stack_root: Path, tally: Tally) -> None:
    executor = make_executor(stack_root)
    os.mkfifo(execroot / "in/fifo")
    (execroot / "in/dir").mkdir()
    os.mkfifo(execroot / "in/dir/fifo")
    for inputs, name in ((["in/fifo"], "FIFO input"), (["in/dir"], "FIFO inside a directory input")):
        request_inputs = [RequestInput(p) for p in inputs]
        result = _run_request(executor, execroot, ActionSpec(argv=["true"]), request_inputs)
        assert result.exit_code != 0 and "FIFO" in result.output, result.output
        tally.record(name, "detected")


def _run_request(
    executor: ActionExecutor, execroot: Path, spec: ActionSpec, inputs: list[RequestInput]
) -> ActionResult:
    box: list[ActionResult] = []
    thread = threading.Thread(target=lambda: box.append(executor.execute(ActionRequest(spec, inputs, execroot))))
    thread.daemon = True
    thread.start()
    thread.join(ACTION_TIMEOUT_S)
    assert box, "hang"
    return box[0]


def test_symlinks_inside_directory_inputs_are_staged_or_refused(execroot: Path, stack_root: Path, tally: Tally) -> None:
    executor = make_executor(stack_root)
    tree = execroot / "in/tree"
    (tree / "real").mkdir(parents=True)
    (tree / "real/f.txt").write_text("inside\n")
    os.symlink("real", tree / "dirlink")
    os.symlink("real/f.txt", tree / "filelink")
    spec = ActionSpec(argv=["sh", "-c", "cat in/tree/dirlink/f.txt in/tree/filelink > out/seen"], outputs=["out/seen"])
    result = _run_request(executor, execroot, spec, [RequestInput("in/tree")])
    assert result.exit_code == 0, result.output
    assert (execroot / "out/seen").read_text() == "inside\ninside\n"
    os.symlink("/etc", tree / "escape")
    result = _run_request(executor, execroot, ActionSpec(argv=["true"]), [RequestInput("in/tree")])
    assert result.exit_code != 0 and "outside directory input" in result.output
    tally.record("symlink to a directory inside a directory input", "prevented")
    tally.record("symlink leaving a directory input", "detected")


@pytest.mark.parametrize(
    ("name", "script"),
    [
        ("output is a symlink to /dev/zero", "ln -s /dev/zero out/x"),
        ("output is a symlink outside the exec dir", "ln -s /etc/passwd out/x"),
        ("output is a relative symlink escaping the exec dir", "ln -s ../../../../../../../etc/passwd out/x"),
        ("output is a FIFO", "mkfifo out/x"),
        ("output dir holds a symlink to /dev/zero", "mkdir -p out/x && ln -s /dev/zero out/x/z"),
        ("output dir links back to its own ancestor", 'mkdir -p out/x/d && ln -s "$PWD/out/x" out/x/d/up'),
    ],
)
def test_hostile_outputs_are_refused(name: str, script: str, execroot: Path, stack_root: Path, tally: Tally) -> None:
    dirs = ["out/x"] if name.startswith("output dir") else []  # declared a directory: its entries are walked
    spec = ActionSpec(argv=["sh", "-c", script], outputs=[] if dirs else ["out/x"], output_dirs=dirs)
    result = _run_request(make_executor(stack_root), execroot, spec, _inputs(execroot))
    assert result.exit_code != 0 and "refused" in result.output, result.output
    assert not (execroot / "out/x").exists() or (execroot / "out/x").is_symlink() is False
    tally.record(name, "detected")


def test_a_background_child_holding_stdout_cannot_hold_the_action(
    execroot: Path, stack_root: Path, tally: Tally
) -> None:
    executor = make_executor(stack_root)
    started = time.monotonic()
    result = _run(executor, execroot, "(sleep 300 &) ; echo done > out/x", ["out/x"])
    elapsed = time.monotonic() - started
    print(f"\n[background child] action returned after {elapsed:.2f}s")
    assert result.exit_code == 0 and elapsed < 30, (elapsed, result.output)
    tally.record("background child keeps stdout open", "prevented")


def test_signal_exits_are_reported_as_128_plus_n(execroot: Path, stack_root: Path) -> None:
    result = _run(make_executor(stack_root), execroot, "kill -9 $$", [])
    assert result.exit_code == 128 + 9, result.output


def test_a_process_the_tool_left_cannot_rewrite_an_output_once_it_sees_the_tool_end(
    execroot: Path, stack_root: Path, tally: Tally
) -> None:
    """A detached child spins until the tool's pid is gone, then rewrites the output: the namespace's init reaped
    the tool before it killed what was left, and in between the child wrote (exit 0, wrong bytes; seen once on
    CI through the bot; a narrow window: 300 rounds here did not hit it on the old init). What is left is now killed
    while the tool is still a zombie."""
    executor = make_executor(stack_root)
    script = (
        "printf 'good\\n' > out/x; "
        "setsid sh -c 'while kill -0 '\"$$\"' 2>/dev/null; do :; done; echo corrupted > out/x' & "
        "while [ ! -s out/x ]; do :; done"
    )
    for _ in range(40):
        result = _run(executor, execroot, script, ["out/x"])
        assert result.exit_code == 0, result.output
        assert (execroot / "out/x").read_text() == "good\n"
    tally.record("a detached child rewriting an output once the tool ended", "prevented")


def test_root_is_private_and_unsafe_roots_are_refused(tmp_path: Path, tally: Tally) -> None:
    old = os.umask(0)
    try:
        layout = Root(tmp_path / "fresh")
        digest = ContentStore(layout, counters=Counters()).ingest_bytes(b"secret\n", executable=False)
    finally:
        os.umask(old)
    assert layout.path.stat().st_mode & 0o777 == 0o700
    assert (layout.cas / digest.hash[:2] / digest.hash).stat().st_mode & 0o007 == 0, "no blob is world-readable"
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(CasError, match="writable by others"):
        Root(tmp_path / "open")
    if os.geteuid() == 0:
        (tmp_path / "foreign").mkdir(mode=0o700)
        os.chown(tmp_path / "foreign", 65534, 65534)
        with pytest.raises(CasError, match="belongs to uid"):
            Root(tmp_path / "foreign")
    tally.record("foreign-owned or world-writable TREEMAT_ROOT", "detected")


def test_a_root_below_a_directory_others_can_write_is_refused(tmp_path: Path, tally: Tally) -> None:
    """Whoever can rename an entry of a directory above the root can swap the root's path to a tree of theirs after
    the check: every later path through it reaches their blobs (served as verified). A sticky dir (/tmp) is
    fine: there only the owner renames. A symlinked root is held to both its link's directory and its target's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(CasError, match="another user could swap what is under it"):
        Root(shared / "team" / "root")
    os.chmod(shared, 0o777 | 0o1000)
    assert Root(shared / "sticky-root").path.is_dir()
    os.chmod(shared, 0o777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "link").symlink_to(shared / "team" / "root")
    with pytest.raises(CasError, match="another user could swap what is under it"):
        Root(private / "link")
    (private / "target").mkdir(mode=0o700)
    (shared / "link").symlink_to(private / "target")
    with pytest.raises(CasError, match="another user could swap what is under it"):
        Root(shared / "link")
    os.chmod(shared, 0o755)
    assert Root(private / "link").path.is_dir()
    tally.record("a TREEMAT_ROOT below a directory others can write", "detected")


def test_isolation_in_use_is_overlay_where_the_kernel_allows(stack_root: Path) -> None:
    """This machine class allows user namespaces + overlayfs: hardlinks are only used under the overlay."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(["unshare", "-U", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    stack = open_stack(Root(stack_root))
    assert stack.isolation == ISOLATION_OVERLAY, stack.isolation_detail
