"""The execroot watch: what may have changed an input's type or exec bit is checked again; when it cannot tell,
everything is."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from treemat import execrootwatch
from treemat.execrootwatch import ExecrootWatch
from treemat.writewatch import open_inotify

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _has_inotify() -> bool:
    inotify, _why = open_inotify()
    if inotify is None:
        return False
    inotify.close()
    return True


pytestmark = pytest.mark.skipif(not _has_inotify(), reason="no inotify instance (tests/faults covers that case)")


def _execroot(tmp_path: Path, files: list[str]) -> str:
    execroot = tmp_path / "execroot"
    for rel in files:
        path = execroot / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode())
    return str(execroot)


def _checked(watch: ExecrootWatch, execroot: str, files: list[str]) -> int:
    """A first request: everything is checked (and watched); the generation to pass back."""
    plan = watch.plan(execroot, None)
    assert plan.everything
    for rel in files:
        assert stat.S_ISREG(watch.check(execroot, rel))
    return plan.generation


FILES = ["a/b/one", "a/b/two", "a/three", "top"]


def test_nothing_changed_means_nothing_to_check(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    (Path(execroot) / "a/b/one").write_bytes(b"new content, same exec bit")  # the digest says that
    plan = watch.plan(execroot, seen)
    assert not plan.everything and plan.paths == set()


def test_a_chmod_between_two_requests_is_seen(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    os.chmod(Path(execroot) / "a/b/two", 0o755)
    plan = watch.plan(execroot, seen)
    assert not plan.everything and plan.paths == {"a/b/two"}
    assert watch.check(execroot, "a/b/two") & 0o111
    assert watch.plan(execroot, plan.generation).paths == set(), "checked again: vouched for again"


def test_a_chmod_through_another_hardlink_is_seen(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    elsewhere = tmp_path / "elsewhere"
    os.link(Path(execroot) / "top", elsewhere)
    os.chmod(elsewhere, 0o755)
    assert "top" in watch.plan(execroot, seen).paths


def test_a_file_replaced_by_rename_is_seen(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    new = Path(execroot) / "a/new"
    new.write_bytes(b"x")
    new.chmod(0o755)
    os.rename(new, Path(execroot) / "a/three")
    assert "a/three" in watch.plan(execroot, seen).paths


@pytest.mark.parametrize("change", ["rename", "chmod", "replace by a symlink"])
def test_a_directory_on_the_path_changed_means_everything(tmp_path: Path, change: str) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    directory = Path(execroot) / "a/b"
    if change == "rename":
        os.rename(directory, Path(execroot) / "a/moved")
    elif change == "chmod":
        directory.chmod(0o700)
    else:
        os.rename(directory, Path(execroot) / "a/moved")
        directory.symlink_to("moved")
    assert watch.plan(execroot, seen).everything


def test_an_ancestor_of_the_execroot_renamed_means_everything(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    (tmp_path / "unrelated").mkdir()  # another name in an ancestor: not on the path
    assert not watch.plan(execroot, seen).everything
    seen = watch.plan(execroot, seen).generation
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
    try:
        assert watch.plan(execroot, seen).everything
    finally:
        os.rename(tmp_path.with_name(tmp_path.name + "-moved"), tmp_path)


def test_a_chmod_of_an_ancestor_checks_nothing_again(tmp_path: Path) -> None:
    """A directory's mode changes no input's type or exec bit; asking the kernel for an ancestor's attribute
    changes cost 10 ms a new execroot (/tmp: it marks every cached entry of the directory)."""
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    os.chmod(tmp_path, 0o750)
    plan = watch.plan(execroot, seen)
    assert not plan.everything and plan.paths == set()
    os.chmod(Path(execroot) / "a/b/one", 0o755)  # still watched
    assert watch.plan(execroot, plan.generation).paths == {"a/b/one"}


@pytest.mark.parametrize("order", ["directories first", "file first"])
def test_a_directory_listed_as_an_input_keeps_its_directory_watch(tmp_path: Path, order: str) -> None:
    """A request that lists a directory as a file input (or one that replaced a file): its check put a file's
    watch on the directory, which narrowed the directory's own watch (a new directory swapped in below it went
    unseen) or filed its events as a file's (they marked that path only): an executable swapped in kept its
    stale exec bit."""
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, ["a/b/one"])
    plan = watch.plan(execroot, None)
    checks = ["a", "a/b", "a/b/one"] if order == "directories first" else ["a/b/one", "a", "a/b"]
    for rel in checks:
        watch.check(execroot, rel)
    replacement = Path(execroot) / "a/new"
    replacement.mkdir()
    (replacement / "one").write_bytes(b"a/b/one")
    (replacement / "one").chmod(0o755)
    os.rename(Path(execroot) / "a/b", Path(execroot) / "a/old")
    os.rename(replacement, Path(execroot) / "a/b")
    again = watch.plan(execroot, plan.generation)
    assert again.everything or "a/b/one" in again.paths


def test_a_watch_that_could_not_start_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of inotify instances once (the old execroot's still closing, say): every input is checked on that
    request, and the next one starts the watch, instead of checking everything until another execroot comes."""
    real_open = execrootwatch.open_inotify
    failures = [(None, "no inotify instance (EMFILE: the inotify instance limit)")]
    monkeypatch.setattr(execrootwatch, "open_inotify", lambda: failures.pop() if failures else real_open())
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)  # no watch: everything checked
    seen = _checked(watch, execroot, FILES)  # the watch placed
    assert watch.plan(execroot, seen) == (seen + 1, False, set())


def test_an_input_under_a_relative_or_file_symlink_is_checked_every_time(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    (tmp_path / "source").mkdir()
    (tmp_path / "source/file").write_bytes(b"s")
    (Path(execroot) / "rel").symlink_to("../source")
    (Path(execroot) / "link").symlink_to(tmp_path / "source/file")
    seen = _checked(watch, execroot, [*FILES, "rel/file", "link"])
    plan = watch.plan(execroot, seen)
    assert not plan.everything and plan.paths == {"rel/file", "link"}
    os.chmod(tmp_path / "source/file", 0o755)
    assert watch.check(execroot, "rel/file") & 0o111 and watch.check(execroot, "link") & 0o111


def _source_symlink(tmp_path: Path) -> tuple[ExecrootWatch, str, int]:
    """An execroot whose `src` is an absolute symlink to a real directory elsewhere, as Bazel plants sources."""
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    source = tmp_path / "workspace/source"
    (source / "sub").mkdir(parents=True)
    (source / "sub/file").write_bytes(b"s")
    (source / "top").write_bytes(b"t")
    (Path(execroot) / "src").symlink_to(source)
    seen = _checked(watch, execroot, [*FILES, "src/sub/file", "src/top"])
    return watch, execroot, seen


def test_an_input_under_a_source_symlink_is_watched_through_it(tmp_path: Path) -> None:
    watch, execroot, seen = _source_symlink(tmp_path)
    plan = watch.plan(execroot, seen)
    assert not plan.everything and plan.paths == set()
    os.chmod(tmp_path / "workspace/source/sub/file", 0o755)
    plan = watch.plan(execroot, plan.generation)
    assert plan.paths == {"src/sub/file"}
    new = tmp_path / "workspace/source/new"
    new.write_bytes(b"n")
    os.rename(new, tmp_path / "workspace/source/top")
    assert "src/top" in watch.plan(execroot, plan.generation).paths


@pytest.mark.parametrize("change", ["retarget the link", "rename the target", "rename above the target"])
def test_a_changed_source_symlink_or_target_path_means_everything(tmp_path: Path, change: str) -> None:
    watch, execroot, seen = _source_symlink(tmp_path)
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "sub/file").write_bytes(b"s")
    os.chmod(other / "sub/file", 0o755)
    if change == "retarget the link":
        link = Path(execroot) / "src"
        link.unlink()
        link.symlink_to(other)
    elif change == "rename the target":
        os.rename(tmp_path / "workspace/source", tmp_path / "workspace/old")
        os.rename(other, tmp_path / "workspace/source")
    else:
        os.rename(tmp_path / "workspace", tmp_path / "old")
        (tmp_path / "workspace").mkdir()
        os.rename(other, tmp_path / "workspace/source")
    plan = watch.plan(execroot, seen)
    assert plan.everything
    assert watch.check(execroot, "src/sub/file") & 0o111


def test_a_queue_overflow_means_everything(tmp_path: Path) -> None:
    """More events than the kernel queues (fs.inotify.max_queued_events, alternating so none are merged)."""
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    one, two = Path(execroot) / "a/b/one", Path(execroot) / "a/b/two"
    for turn in range(limit // 2 + 2):
        os.chmod(one, 0o644 if turn % 2 else 0o600)
        os.chmod(two, 0o644 if turn % 2 else 0o600)
    plan = watch.plan(execroot, seen)
    assert plan.everything
    _checked_again = [watch.check(execroot, rel) for rel in FILES]
    assert not watch.plan(execroot, plan.generation).everything, "watched afresh after the overflow"


def test_another_execroot_starts_afresh(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    first = _execroot(tmp_path / "1", FILES)
    second = _execroot(tmp_path / "2", FILES)
    seen = _checked(watch, first, FILES)
    assert watch.plan(second, seen).everything


def test_an_execroot_on_no_known_local_filesystem_is_checked_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS or FUSE (another machine's change raises no event here): no filesystem counts as local in this test."""
    monkeypatch.setattr(execrootwatch, "LOCAL_FILESYSTEMS", set())
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    assert watch.plan(execroot, seen).everything


MOUNTED_OVER = """
import subprocess, sys
from treemat.execrootwatch import ExecrootWatch
execroot, files = sys.argv[1], sys.argv[2:]
watch = ExecrootWatch()
plan = watch.plan(execroot, None)
modes = [watch.check(execroot, rel) for rel in files]
seen = watch.plan(execroot, plan.generation).generation
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", f"{execroot}/a"], check=True)
sys.exit(0 if watch.plan(execroot, seen).everything else 1)
"""


def test_a_mount_over_an_execroot_directory_means_everything(tmp_path: Path) -> None:
    """A mount raises no inotify event: the mount table's change (/proc/self/mountinfo) stands in for it."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.fail("this test needs unshare(1) and mount(8)")
    execroot = _execroot(tmp_path, FILES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")])}
    command = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", MOUNTED_OVER, execroot, *FILES]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_check_in_another_execroot_reads_that_one(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    first = _execroot(tmp_path / "1", FILES)
    second = _execroot(tmp_path / "2", FILES)
    seen = _checked(watch, first, FILES)
    os.chmod(Path(second) / "top", 0o755)
    assert watch.check(second, "top") & 0o111 and not watch.check(first, "top") & 0o111
    assert watch.plan(first, seen).paths == set()


def test_an_execroot_made_again_is_watched_again(tmp_path: Path) -> None:
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    os.rename(execroot, tmp_path / "old")
    assert watch.plan(execroot, seen).everything
    _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    assert watch.plan(execroot, seen) == execrootwatch.CheckPlan(seen + 1, everything=False)
    os.rename(Path(execroot) / "a/b", Path(execroot) / "a/moved")  # no event on the files: only on a/ and a/b
    _execroot(tmp_path, ["a/b/one"])
    os.chmod(Path(execroot) / "a/b/one", 0o755)
    assert watch.plan(execroot, seen).everything, "the new directories are watched, not the old ones"


def test_a_chmod_through_a_descriptor_is_seen(tmp_path: Path) -> None:
    """fchmod on a descriptor opened before the watch, and chmod through /proc/self/fd: the inode's watch."""
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    held = os.open(Path(execroot) / "a/three", os.O_RDONLY)
    try:
        seen = _checked(watch, execroot, FILES)
        os.fchmod(held, 0o755)
        plan = watch.plan(execroot, seen)
        assert plan.everything or "a/three" in plan.paths
        os.chmod(f"/proc/self/fd/{held}", 0o644)
        assert "a/three" in watch.plan(execroot, plan.generation).paths
    finally:
        os.close(held)


def test_a_chmod_through_a_bind_mount_in_another_mount_namespace_is_seen(tmp_path: Path) -> None:
    """The bind mount is not in this process's mount table (no mountinfo change): the inode's watch tells."""
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    seen = _checked(watch, execroot, FILES)
    mountpoint = tmp_path / "bind"
    mountpoint.mkdir()
    as_root = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    script = f"mount --bind {execroot}/a/b {mountpoint} && chmod 755 {mountpoint}/one"
    subprocess.run(["unshare", *as_root, "--mount", "--propagation", "private", "sh", "-c", script], check=True)
    assert (Path(execroot) / "a/b/one").stat().st_mode & 0o100, "the chmod went through"
    plan = watch.plan(execroot, seen)
    assert plan.everything or "a/b/one" in plan.paths


def test_a_check_that_spans_a_restart_never_vouches_in_the_new_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread A placed an input's watches, then the watch started afresh (a lost event, read by another request)
    before A's lstat; another request (C) checked the input in the new watch but could not watch it (out of
    watches): unsure. A then took it off the unsure list on the strength of a watch the restart had dropped, and
    a chmod after that was never seen by a request planned after the restart (a wrong exec bit, exit 0)."""
    watch = ExecrootWatch()
    execroot = _execroot(tmp_path, FILES)
    _checked(watch, execroot, FILES)
    target = f"{execroot}/a/b/one"
    real_lstat, real_watch_input = os.lstat, watch._watch_input
    late: list[int] = []

    def lstat_after_a_restart(path: str, *args: object, **kwargs: object) -> os.stat_result:
        if path == target and not late:  # thread A, between its watch and its lstat
            watch._start(execroot)  # another request read a lost event: afresh
            plan = watch.plan(execroot, None)
            late.append(plan.generation)
            monkeypatch.setattr(watch, "_watch_input", lambda _execroot, _path: None)  # C: out of watches
            watch.check(execroot, "a/b/one")  # C's check: unsure in the new watch
            monkeypatch.setattr(watch, "_watch_input", real_watch_input)
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(execrootwatch.os, "lstat", lstat_after_a_restart)
    watch.check(execroot, "a/b/one")  # A's check, its watch placed before the restart
    monkeypatch.setattr(execrootwatch.os, "lstat", real_lstat)
    os.chmod(target, 0o755)
    assert "a/b/one" in watch.plan(execroot, late[0]).paths, "vouched for with no watch on it"


def test_a_new_execroot_never_waits_for_the_old_watch_to_close(tmp_path: Path) -> None:
    """Closing an inotify instance waits for the kernel to free its watches (0-20 ms): a new output base's first
    request took that wait on its staging path. The old instance is closed on another thread, and it is closed."""
    watch = ExecrootWatch()
    first = _execroot(tmp_path / "one", FILES)
    _checked(watch, first, FILES)
    old = watch._inotify
    assert old is not None
    closed_on: list[str] = []
    real_close = old.close

    def close() -> None:
        closed_on.append(threading.current_thread().name)
        real_close()

    old.close = close  # type: ignore[method-assign]
    second = _execroot(tmp_path / "two", FILES)
    assert _checked(watch, second, FILES)
    for _ in range(1000):  # polled: the closing thread runs on its own
        if old.closed:
            break
        threading.Event().wait(0.01)
    assert old.closed and closed_on and closed_on[0] != threading.current_thread().name
    watch.close()
    assert watch._inotify is None


def test_the_old_watch_is_closed_inline_when_no_thread_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = ExecrootWatch()
    _checked(watch, _execroot(tmp_path / "one", FILES), FILES)
    old = watch._inotify
    assert old is not None

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    _checked(watch, _execroot(tmp_path / "two", FILES), FILES)
    assert old.closed
    watch.close()
