"""Compiled modules of a runfiles tree kept by content (treemat/bytecode.py): a new output base compiles nothing
again and leaves nothing behind; an edited module runs as edited; a damaged stored module is compiled again."""

from __future__ import annotations

import errno
import marshal
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from treemat.bytecode import KEY_BYTES, entry_name, seal

from ..support.harness import TOOLS_DIR

PROBE = """
import os, sys
os.makedirs(sys.argv[2], 0o700, exist_ok=True)
from treemat.bytecode import keep_compiled_by_content
keep_compiled_by_content(sys.argv[1], sys.argv[2])
import probe
print(probe.VALUE, probe.__file__)
probe.fail()
"""


def _runfiles_tree(where: Path, package: Path) -> Path:
    """A copy of treemat's modules as Bazel lays out a runfiles tree (`X.runfiles/<workspace>/tools`)."""
    tools = where / "bin/tools/treemat/launcher.runfiles/treemat/tools"
    shutil.copytree(package, tools / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    return tools


def _run_main(tools: Path, cache: Path, *args: str, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """treemat's __main__ run as the launcher runs it (`python -S`, the runfiles' tools dir on PYTHONPATH), under
    `wrapper` (e.g. `unshare ...`)."""
    env = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    }
    env.update(PYTHONPATH=str(tools), XDG_CACHE_HOME=str(cache))
    return subprocess.run(
        [*wrapper, sys.executable, "-S", str(tools / "treemat/__main__.py"), *args],
        env=env,
        cwd=tools.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _files(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()}


def test_a_new_output_base_compiles_no_module_again_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Python keyed compiled modules by path: each output base (each CI build) compiled the worker again and kept
    another tree of them in the user's cache for good."""
    cache = tmp_path / "cache"
    first = _runfiles_tree(tmp_path / "output_base-1", TOOLS_DIR / "treemat")
    ran = _run_main(first, cache, "stats", "--help")
    assert ran.returncode == 0 and "Usage:" in ran.stdout, ran.stderr
    kept = _files(cache / "treemat")
    stored = {name for name in kept if name.startswith("bytecode/")}
    assert len(stored) >= 5, kept  # __init__, cli, commands...: every treemat module it imported
    assert not list(first.rglob("__pycache__")), "compiled modules written into Bazel's runfiles tree"
    second = _runfiles_tree(tmp_path / "output_base-2", TOOLS_DIR / "treemat")
    ran = _run_main(second, cache, "stats", "--help")
    assert ran.returncode == 0 and "Usage:" in ran.stdout, ran.stderr
    assert _files(cache / "treemat") == kept  # nothing compiled again, nothing added for the new path


def _probe(tmp_path: Path, name: str, body: str) -> tuple[Path, Path]:
    runfiles = tmp_path / name / "x.runfiles"
    (runfiles / "lib").mkdir(parents=True)
    (runfiles / "lib/probe.py").write_text(body)
    return runfiles, runfiles / "lib"


def _run_probe(
    runfiles: Path, lib: Path, store: Path, timeout: float = 60, first: str = ""
) -> subprocess.CompletedProcess[str]:
    """PROBE in a new interpreter (`first`: code run before it), the probe module in `lib`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), str(TOOLS_DIR)])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return subprocess.run(
        [sys.executable, "-c", first + PROBE, str(runfiles), str(store)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_edited_moved_and_damaged_modules_run_as_their_source_says(tmp_path: Path) -> None:
    store = tmp_path / "store"
    body = "VALUE = {}\n\ndef fail():\n    raise SystemExit(__import__('traceback').format_stack()[-1])\n"
    runfiles, lib = _probe(tmp_path, "a", body.format(1))
    ran = _run_probe(runfiles, lib, store)
    assert ran.stdout.split() == ["1", str(lib / "probe.py")], ran.stderr
    assert len(os.listdir(store)) == 1
    moved_runfiles, moved_lib = _probe(tmp_path, "b", body.format(1))  # the same source elsewhere: one entry
    ran = _run_probe(moved_runfiles, moved_lib, store)
    assert ran.stdout.split() == ["1", str(moved_lib / "probe.py")], ran.stderr
    assert str(moved_lib / "probe.py") in ran.stderr, ran.stderr  # the code's file is this copy's, nested too
    assert len(os.listdir(store)) == 1
    (moved_lib / "probe.py").write_text(body.format(2))  # edited: its own entry, never the old code
    assert _run_probe(moved_runfiles, moved_lib, store).stdout.split()[0] == "2"
    for entry in store.iterdir():  # cut short or replaced by garbage: compiled again and stored again
        entry.write_bytes(b"\xe3\x00garbage")
    assert _run_probe(moved_runfiles, moved_lib, store).stdout.split()[0] == "2"
    entries = [entry.read_bytes() for entry in store.iterdir()]  # 1's and 2's: 2's is compiled code again
    assert len(entries) == 2 and sorted(b"garbage" in entry for entry in entries) == [False, True]
    assert not list(tmp_path.rglob("__pycache__")), "compiled modules written next to the runfiles' sources"


def test_a_store_on_a_full_disk_keeps_nothing_and_the_module_still_runs(tmp_path: Path) -> None:
    """A write cut short (here: a 1-byte file size limit, as a disk filling up) left a short file under the final
    name; nothing is kept unless all of it was written."""
    store = tmp_path / "store"
    runfiles, lib = _probe(tmp_path, "a", "VALUE = 7\n\ndef fail():\n    pass\n")
    store.mkdir()
    ran = _run_probe(runfiles, lib, store, first="import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))\n")
    assert ran.stdout.split()[0] == "7", ran.stderr
    assert list(store.iterdir()) == []


def _plant_cli(tools: Path, where: Path) -> Path:
    """In `where`, the stored module of `tools`' treemat/cli.py replaced by code that says it ran: its name and
    digest are what anyone can compute from the public source."""
    planted = where / entry_name((tools / "treemat/cli.py").read_bytes())
    planted.write_bytes(seal(marshal.dumps(compile("raise SystemExit('planted code ran')", "cli.py", "exec"))))
    return planted


def _damaged_so_that_marshal_raises(data: bytes, kind: type[BaseException]) -> bytes | None:
    """`data` with one byte changed such that marshal.loads raises `kind` (None if no such byte is found)."""
    for index in range(len(data)):
        for value in range(256):
            damaged = data[:index] + bytes([value]) + data[index + 1 :]
            try:
                marshal.loads(damaged)
            except kind:
                return damaged
            except Exception:  # another error: look on
                continue
    return None


def test_a_stored_module_that_marshal_rejects_with_a_system_error_is_compiled_again(tmp_path: Path) -> None:
    """A flipped bit in a stored module can make marshal raise SystemError (a code object's fields not as the
    interpreter's constructor wants them), not ValueError/EOFError: the import failed, and with it every start of
    the worker until someone deleted the file by hand."""
    store = tmp_path / "store"
    runfiles, lib = _probe(tmp_path, "a", "VALUE = 7\n\ndef fail():\n    pass\n")
    assert _run_probe(runfiles, lib, store).stdout.split()[0] == "7"
    [entry] = store.iterdir()
    payload = entry.read_bytes()[KEY_BYTES:]  # after its digest
    damaged_payload = _damaged_so_that_marshal_raises(payload, SystemError)
    if damaged_payload is None:
        pytest.skip("no one-byte change of this interpreter's marshal data raises SystemError")
    damaged = seal(damaged_payload)  # its digest matches
    entry.write_bytes(damaged)
    ran = _run_probe(runfiles, lib, store)
    assert ran.stdout.split()[:1] == ["7"], ran.stderr
    assert entry.read_bytes() != damaged  # compiled again and replaced


@pytest.mark.parametrize("hostile", ["others can write it", "it is a symlink to a dir others can write"])
def test_no_compiled_module_is_loaded_from_a_store_dir_another_user_could_write(tmp_path: Path, hostile: str) -> None:
    """Only the cache's `treemat` dir and those above it were checked, not its `bytecode` dir: one others can
    write (a chmod, a cache restored with its modes) or a symlink to a shared scratch dir let another user plant
    the compiled code of a treemat module (its name is the digest of the public source), run inside the worker."""
    cache = tmp_path / "cache"
    (cache / "treemat").mkdir(parents=True, mode=0o700)
    store = cache / "treemat/bytecode"
    if hostile == "others can write it":
        store.mkdir()
        store.chmod(0o777)
        writable = store
    else:
        writable = tmp_path / "shared"
        writable.mkdir()
        writable.chmod(0o777)
        store.symlink_to(writable)
    tools = _runfiles_tree(tmp_path / "output_base", TOOLS_DIR / "treemat")
    planted = _plant_cli(tools, writable)
    ran = _run_main(tools, cache, "stats", "--help")
    assert "planted" not in ran.stderr and ran.returncode == 0 and "Usage:" in ran.stdout, ran.stderr
    assert [entry.name for entry in writable.iterdir()] == [planted.name]  # nothing stored where others write


@pytest.mark.parametrize("entry_kind", ["a FIFO", "a symlink to /dev/zero"])
def test_a_stored_module_that_is_no_regular_file_is_compiled_again_not_waited_on(
    tmp_path: Path, entry_kind: str
) -> None:
    """The stored module was opened and read as it was: a FIFO (no writer) blocked the import for good, a symlink
    to /dev/zero read until memory ran out: the worker never started."""
    store = tmp_path / "store"
    runfiles, lib = _probe(tmp_path, "a", "VALUE = 7\n\ndef fail():\n    pass\n")
    assert _run_probe(runfiles, lib, store).stdout.split()[0] == "7"
    [entry] = store.iterdir()
    entry.unlink()
    if entry_kind == "a FIFO":
        os.mkfifo(entry)
    else:
        entry.symlink_to("/dev/zero")
    try:
        ran = _run_probe(runfiles, lib, store, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the import waited on {entry_kind} in the store")
    assert ran.stdout.split()[:1] == ["7"], ran.stderr
    assert entry.is_file() and not entry.is_symlink()  # compiled again and replaced


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root (chown) and unshare")
def test_no_compiled_module_is_loaded_from_a_store_dir_another_user_made_seen_from_a_user_namespace(
    tmp_path: Path,
) -> None:
    """In a user namespace that does not map root, another user's dir shows as the overflow uid, which trustpath
    accepts as root's (/, /home, /tmp): a store dir another user made where ours would go (a cache under a
    sticky /tmp: XDG_CACHE_HOME or HOME=/tmp) passed, and the code planted in it ran inside the worker."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o1777)
    store = cache / "treemat/bytecode"
    store.mkdir(parents=True)
    tools = _runfiles_tree(tmp_path / "output_base", TOOLS_DIR / "treemat")
    planted = _plant_cli(tools, store)
    for path in (cache / "treemat", store, planted):
        try:
            os.chown(path, 1001, 1001)
        except OSError as exc:  # in a user namespace of its own (Bazel's sandbox) uid 1001 is not mapped
            if exc.errno != errno.EINVAL:
                raise
            pytest.skip(f"uid 1001 is not mapped here: {exc}")
    (cache / "treemat").chmod(0o755)
    store.chmod(0o755)
    namespaced = ("unshare", "--user", "--map-user=1000", "--map-group=1000")
    ran = _run_main(tools, cache, "stats", "--help", wrapper=namespaced)
    if "unshare:" in ran.stderr:
        pytest.skip(f"no user namespace here: {ran.stderr.strip()}")
    assert "planted" not in ran.stderr and ran.returncode == 0 and "Usage:" in ran.stdout, ran.stderr


def test_a_stored_module_damaged_into_other_valid_code_is_compiled_again(tmp_path: Path) -> None:
    """marshal has no checksum: a changed byte can decode into other, valid code (here the constant 1 became 2)
    that ran as the module; a stored module is loaded only if its digest matches."""
    store = tmp_path / "store"
    runfiles, lib = _probe(tmp_path, "a", "VALUE = 1\n\ndef fail():\n    pass\n")
    assert _run_probe(runfiles, lib, store).stdout.split()[0] == "1"
    (entry,) = store.iterdir()
    data = entry.read_bytes()
    one, two = marshal.dumps(1), marshal.dumps(2)
    assert one in data
    entry.write_bytes(data.replace(one, two))
    ran = _run_probe(runfiles, lib, store)
    assert ran.stdout.split()[0] == "1", ran.stdout + ran.stderr
