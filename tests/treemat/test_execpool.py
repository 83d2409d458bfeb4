"""Exec-dir reuse: a pooled exec dir is patched into exactly the next action's inputs, or discarded."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treemat import protos
from treemat.blobstate import NO_BLOB
from treemat.executor import ActionExecutor, ActionRequest, RequestInput
from treemat.flagfile import ActionSpec
from treemat.manifest import InputManifest
from treemat.writewatch import open_inotify

from ..support.stacks import make_executor

LIST_TREE = (
    "find . -path ./out -prune -o \\( -type f -o -type d \\) -print | sort > out/listing; "
    "cat in/* > out/cat 2>/dev/null; true"
)


def _executor_with_pool(root: Path) -> ActionExecutor:
    executor = make_executor(root)
    if executor.pool is None:
        pytest.skip("exec-dir reuse needs the overlay sandbox (user namespaces + overlayfs)")
    return executor


def _write(execroot: Path, files: dict[str, bytes]) -> list[RequestInput]:
    inputs = []
    for rel, data in files.items():
        path = execroot / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        inputs.append(RequestInput(rel, hashlib.sha256(data).hexdigest()))
    return inputs


def _listing(execroot: Path, files: dict[str, bytes]) -> list[str]:
    dirs = {"."} | {"./out"}
    for rel in files:
        parent = os.path.dirname(rel)
        while parent:
            dirs.add(f"./{parent}")
            parent = os.path.dirname(parent)
    return sorted([*dirs - {"./out"}, *(f"./{rel}" for rel in files)])


def _wire(inputs: list[RequestInput]) -> InputManifest:
    """The inputs as the worker gets them from Bazel: a proto WorkRequest, sorted by path, decoded lazily."""
    request = protos.WorkRequest(arguments=["@x.params"], request_id=1)
    for path, digest in sorted(inputs):
        request.inputs.add(path=path, digest=(digest or "").encode())
    payload = request.SerializeToString()
    message = protos.WorkRequest()
    message.ParseFromString(payload)
    return InputManifest.from_proto(message, payload)


def _run(executor: ActionExecutor, execroot: Path, inputs: list[RequestInput], *, wire: bool = False) -> str:
    spec = ActionSpec(argv=["sh", "-c", LIST_TREE], outputs=["out/listing", "out/cat"])
    result = executor.execute(ActionRequest(spec, _wire(inputs) if wire else inputs, execroot))
    assert result.exit_code == 0, result.output
    return (execroot / "out/listing").read_text()


@pytest.mark.parametrize("wire", [False, True], ids=["list", "proto"])
def test_a_changed_input_is_patched_in_place(tmp_path: Path, wire: bool) -> None:
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    files = {f"in/f{i}.txt": f"file {i}\n".encode() for i in range(50)}
    _run(executor, execroot, _write(execroot, files), wire=wire)
    files["in/f7.txt"] = b"edited\n"
    del files["in/f8.txt"]
    (execroot / "in/f8.txt").unlink()
    files["in/sub/new.txt"] = b"new\n"
    listing = _run(executor, execroot, _write(execroot, files), wire=wire)
    assert listing.splitlines() == _listing(execroot, files)
    top_level = sorted(rel for rel in files if rel.count("/") == 1)  # what `cat in/*` reads, in glob order
    assert (execroot / "out/cat").read_bytes() == b"".join(files[rel] for rel in top_level)
    assert executor.counters.get("execpool_reused") == 1
    assert executor.counters.get("hardlink") == 50 + 2, "first action 50 links, then only the edited and new file"


def test_what_the_tool_wrote_is_gone_on_reuse(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    inputs = _write(execroot, {"in/a.txt": b"a\n"})
    spec = ActionSpec(
        argv=[
            "sh",
            "-c",
            "test ! -e scratch && echo x > scratch && chmod u+w in/a.txt && echo EVIL > in/a.txt; "
            "cat in/a.txt > out/seen",
        ],
        outputs=["out/seen"],
    )
    for _round in range(3):
        result = executor.execute(ActionRequest(spec, inputs, execroot))
        assert result.exit_code == 0, result.output
    assert (execroot / "out/seen").read_text() == "EVIL\n", "each run starts clean: scratch absent, input pristine"
    assert executor.counters.get("execpool_reused") == 2


def test_an_outsider_change_discards_the_pooled_dir(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    files = {"in/a.txt": b"a\n", "in/b.txt": b"b\n"}
    inputs = _write(execroot, files)
    _run(executor, execroot, inputs)
    assert executor.pool is not None
    (pooled,) = executor.pool._idle.values()
    (pooled.path / "in" / "planted.txt").write_text("not an input\n")
    listing = _run(executor, execroot, inputs)
    assert listing.splitlines() == _listing(execroot, files), "the planted file is not seen"
    assert executor.counters.get("execpool_discarded") == 1 and executor.counters.get("execpool_reused") == 0


def test_a_tainted_blob_discards_the_pooled_dir(tmp_path: Path) -> None:
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    files = {"in/a.txt": b"pristine\n"}
    inputs = _write(execroot, files)
    _run(executor, execroot, inputs)
    assert executor.pool is not None
    (pooled,) = executor.pool._idle.values()
    staged = pooled.path / "in" / "a.txt"  # the CAS inode itself
    os.chmod(staged, 0o644)
    with open(staged, "r+b") as handle:
        handle.write(b"POISONED")
    os.chmod(staged, 0o440)
    _run(executor, execroot, inputs)
    assert (execroot / "out/cat").read_bytes() == b"pristine\n"
    assert executor.counters.get("execpool_discarded") == 1


file_maps = st.dictionaries(
    st.sampled_from([f"in/{d}/{n}" for d in ("a", "b", "a/deep") for n in ("x", "y", "z")] + ["in/top"]),
    st.binary(min_size=0, max_size=8),
    min_size=1,
    max_size=10,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(file_maps, min_size=2, max_size=5), wire=st.booleans())
def test_any_sequence_of_trees_is_staged_exactly(
    tmp_path_factory: pytest.TempPathFactory, sequence: list[dict[str, bytes]], wire: bool
) -> None:
    """Whatever the previous action held, the next one sees exactly its own tree (reuse or not)."""
    base = tmp_path_factory.mktemp("seq")
    executor = _executor_with_pool(base / "root")
    for files in sequence:
        execroot = base / f"execroot-{len(list(base.iterdir()))}"
        if any(other != rel and other.startswith(rel + "/") for rel in files for other in files):
            continue  # a path that is both a file and a directory is not a valid tree
        listing = _run(executor, execroot, _write(execroot, files), wire=wire)
        assert listing.splitlines() == _listing(execroot, files)


@pytest.mark.parametrize("wire", [False, True], ids=["list", "proto"])
def test_an_input_listed_twice_gets_the_answer_of_fresh_staging(tmp_path: Path, wire: bool) -> None:
    """A request naming one path twice (with two digests) is not patched in: it fails as a fresh one does."""
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    files = {f"in/f{i}.txt": f"file {i}\n".encode() for i in range(20)}
    inputs = _write(execroot, files)
    _run(executor, execroot, inputs, wire=wire)
    twice = [*inputs, RequestInput("in/f3.txt", hashlib.sha256(b"other").hexdigest())]
    spec = ActionSpec(argv=["sh", "-c", LIST_TREE], outputs=["out/listing", "out/cat"])
    reused = executor.execute(ActionRequest(spec, _wire(twice) if wire else twice, execroot))
    fresh = make_executor(tmp_path / "root2").execute(ActionRequest(spec, twice, execroot))
    assert reused.exit_code == fresh.exit_code == 1
    assert "in/f3.txt" in reused.output and "in/f3.txt" in fresh.output
    assert executor.counters.get("execpool_reused") == 0


def test_every_path_of_a_shared_blob_is_known_as_that_blob(tmp_path: Path) -> None:
    """Two inputs with the same content are two hardlinks to one blob: the pool must know both are (when one
    is unlinked, the blob's link count changes and its ledger state is refreshed)."""
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    inputs = _write(execroot, {"in/a.txt": b"same\n", "in/b.txt": b"same\n", "in/c.txt": b"other\n"})
    _run(executor, execroot, inputs)
    assert executor.pool is not None
    (entry,) = executor.pool.drain()
    a, b, c = (entry.files[f"in/{name}.txt"].identity for name in "abc")
    assert a == b and a != c
    assert a != NO_BLOB and c != NO_BLOB


def test_a_dir_watched_only_in_part_is_verified_by_lstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of inotify watches halfway through a dir: a change in a directory left unwatched is still caught."""
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    assert executor.pool is not None
    real = executor.pool.watch.watch_directory
    placed: list[str] = []

    def watch_one(path: str, on_event: Callable[[], None]) -> int | None:
        if placed:
            return None  # fs.inotify.max_user_watches reached
        placed.append(path)
        return real(path, on_event)

    monkeypatch.setattr(executor.pool.watch, "watch_directory", watch_one)
    files = {"in/deep/a.txt": b"a\n", "in/deep/b.txt": b"b\n"}
    inputs = _write(execroot, files)
    _run(executor, execroot, inputs)
    assert executor.pool is not None
    (pooled,) = executor.pool._idle.values()
    assert not pooled.watches, "no partial watching"
    (pooled.path / "in" / "deep" / "planted.txt").write_text("not an input\n")
    listing = _run(executor, execroot, inputs)
    assert listing.splitlines() == _listing(execroot, files), "the planted file is not seen"
    assert executor.counters.get("execpool_discarded") == 1 and executor.counters.get("execpool_reused") == 0


def test_reuse_reads_each_unchanged_inputs_exec_bit_and_kind(tmp_path: Path) -> None:
    """A reuse stats every input it keeps: `chmod +x` (same bytes, same digest) is relinked; an input that became
    a directory is not patched in (fresh staging decides)."""
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    inputs = _write(execroot, {f"in/f{i}": f"file {i}\n".encode() for i in range(5)})
    _run(executor, execroot, inputs)
    os.chmod(execroot / "in/f2", 0o755)
    check = "test -x in/f2 && test ! -x in/f3 && touch out/listing out/cat"
    spec = ActionSpec(argv=["sh", "-c", check], outputs=["out/listing", "out/cat"])
    result = executor.execute(ActionRequest(spec, inputs, execroot))
    assert result.exit_code == 0, result.output
    assert executor.counters.get("execpool_reused") == 1
    (execroot / "in/f3").unlink()
    (execroot / "in/f3").mkdir()
    spec = ActionSpec(argv=["sh", "-c", "test -d in/f3 && touch out/listing out/cat"], outputs=spec.outputs)
    result = executor.execute(ActionRequest(spec, inputs, execroot))
    assert result.exit_code == 0, result.output  # what fresh staging makes of it: a directory input
    assert executor.counters.get("execpool_reused") == 1, "not patched in: the pooled dir holds a file there"


def test_a_chmod_between_two_reuses_is_seen_by_the_tool(tmp_path: Path) -> None:
    """After its first reuse a pooled dir's unchanged inputs are not `stat`ed again unless the execroot watch marked
    them (execrootwatch.py): a `chmod +x` is marked, relinked, and seen by the tool; without inotify every input
    is checked on every reuse."""
    execroot = tmp_path / "execroot"
    executor = _executor_with_pool(tmp_path / "root")
    inputs = _write(execroot, {f"in/f{i}": f"file {i}\n".encode() for i in range(5)})
    _run(executor, execroot, inputs)
    _run(executor, execroot, inputs)  # the first reuse reads every exec bit, under watches
    os.chmod(execroot / "in/f2", 0o755)
    check = "test -x in/f2 && test ! -x in/f3 && touch out/listing out/cat"
    spec = ActionSpec(argv=["sh", "-c", check], outputs=["out/listing", "out/cat"])
    result = executor.execute(ActionRequest(spec, inputs, execroot))
    assert result.exit_code == 0, result.output
    assert executor.counters.get("execpool_reused") == 2
    inotify, _why = open_inotify()
    if inotify is not None:
        inotify.close()
        assert executor.counters.get("execbit_checks_marked") == 1, "the second reuse read only what was marked"
    else:
        assert executor.counters.get("execbit_checks_all") == 2
