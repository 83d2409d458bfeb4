"""Starting the stager service (servicespawn.py): a relay that finds none forks into it, hands it none of its
descriptors, and the service imports from a package copy shared by the user's roots (the root's own where the
user's cache is not ours alone). Real relay processes, real services."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from treemat.servicespawn import PROCESS_NAME, STALE_COPY_DAYS

from ..support import services as support_services
from ..support.harness import TOOLS_DIR
from ..support.markers import give_to_another_user
from ..support.relays import READ_TIMEOUT, RelayProcess, answered_within, execroot, root, the_service

__all__ = ["execroot", "root"]


def _pipe_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


def test_support_names_the_service_as_it_names_itself() -> None:
    assert support_services.PROCESS_NAME.decode() == PROCESS_NAME and len(PROCESS_NAME) <= 15


def test_a_relay_forks_into_the_service_which_holds_none_of_its_descriptors(execroot: Path, root: Path) -> None:
    relay = RelayProcess(execroot, root)
    assert relay.touch().exit_code == 0, relay.stderr
    service = the_service(root)
    assert Path(f"/proc/{service}/comm").read_text().strip() == "treemat-service"
    argv = Path(f"/proc/{service}/cmdline").read_bytes().split(b"\0")
    assert b"--persistent_worker" in argv and b"--service" not in argv  # forked from the relay, no new interpreter
    status = Path(f"/proc/{service}/status").read_text()
    assert f"PPid:\t{relay.proc.pid}\n" not in status  # detached: no child of the relay
    assert relay.proc.stdin is not None and relay.proc.stdout is not None
    relay_pipes = {f"pipe:[{os.fstat(end.fileno()).st_ino}]" for end in (relay.proc.stdin, relay.proc.stdout)}
    assert not relay_pipes & _pipe_inodes(service)  # Bazel's pipes end with the relay
    assert os.readlink(f"/proc/{service}/cwd") == "/"
    relay.proc.stdin.close()
    assert relay.proc.stdout.read() == b""  # EOF: nothing else holds the relay's stdout
    assert relay.proc.wait(timeout=READ_TIMEOUT) == 0
    assert the_service(root) == service  # and it outlives the relay
    second = RelayProcess(execroot, root)  # the service lock was released (no descriptor of it inherited)
    assert second.touch("out/y").exit_code == 0
    assert second.close() == 0 and the_service(root) == service


def test_roots_share_the_users_package_copy(execroot: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    roots = [tmp_path / "root-a", tmp_path / "root-b"]
    try:
        for number, path in enumerate(roots):
            relay = RelayProcess(execroot, path, env={"XDG_CACHE_HOME": str(cache)})
            assert relay.touch(f"out/{number}").exit_code == 0, relay.stderr
            assert relay.close() == 0
        (copy,) = (cache / "treemat/service-packages").glob("pkg-*")
        assert (copy / "treemat/relay.py").read_bytes() == (TOOLS_DIR / "treemat/relay.py").read_bytes()
        assert not [copy for path in roots for copy in (path / "service").glob("pkg-*")]
        assert stat.S_IMODE(os.stat(cache / "treemat/service-packages").st_mode) == 0o700
    finally:
        for path in roots:
            support_services.end_services_under(path)


def test_a_package_dir_others_can_write_is_not_used_the_roots_own_is(
    execroot: Path, root: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "cache/treemat/service-packages"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # anyone could plant modules there: the service must not import from it
    relay = RelayProcess(execroot, root, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert relay.touch().exit_code == 0, relay.stderr
    assert relay.close() == 0
    assert not list(shared.iterdir())
    assert len(list((root / "service").glob("pkg-*"))) == 1


def test_a_copy_unused_for_weeks_goes_when_another_is_made(execroot: Path, root: Path, tmp_path: Path) -> None:
    shared = tmp_path / "cache/treemat/service-packages"
    stale, recent = shared / "pkg-1-stale", shared / "pkg-1-recent"
    for old in (stale, recent):
        (old / "treemat").mkdir(parents=True)
    weeks_ago = os.stat(stale).st_mtime - (STALE_COPY_DAYS + 1) * 86400
    os.utime(stale, (weeks_ago, weeks_ago))
    relay = RelayProcess(execroot, root, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert relay.touch().exit_code == 0, relay.stderr
    assert relay.close() == 0
    assert not stale.exists() and recent.exists()
    assert len(list(shared.glob("pkg-*"))) == 2


def test_the_path_keyed_compiled_modules_of_older_versions_go_when_a_service_starts(
    execroot: Path, root: Path, tmp_path: Path
) -> None:
    """Before bytecode.py every output base left a tree of compiled modules in `<cache>/treemat/pycache` for good
    (hundreds of MB on a machine that builds often); nothing else of the user's cache goes with it."""
    ours = tmp_path / "cache/treemat"
    old = ours / "pycache/tmp/output_base-1/execroot/treemat/tools/treemat/__pycache__"
    old.mkdir(parents=True)
    (old / "relay.cpython-311.pyc").write_bytes(b"old")
    (ours / "bytecode").mkdir()
    (ours / "bytecode/kept.pyc").write_bytes(b"kept")
    relay = RelayProcess(execroot, root, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert relay.touch().exit_code == 0, relay.stderr
    assert relay.close() == 0
    assert not (ours / "pycache").exists() and not list(ours.glob(".old-*"))
    assert (ours / "bytecode/kept.pyc").read_bytes() == b"kept" and list(ours.glob("service-packages/pkg-*"))


def test_the_service_keeps_serving_after_the_relays_package_is_deleted(
    execroot: Path, root: Path, tmp_path: Path
) -> None:
    """`bazel clean` deletes the runfiles the first relay ran from; the service imports from its copy."""
    runfiles = [tmp_path / "runfiles-1", tmp_path / "runfiles-2"]
    for path in runfiles:
        shutil.copytree(TOOLS_DIR / "treemat", path / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    first = RelayProcess(execroot, root, env={"PYTHONPATH": str(runfiles[0])})
    assert first.touch("out/one").exit_code == 0, first.stderr
    assert first.close() == 0
    service = the_service(root)
    shutil.rmtree(runfiles[0])
    second = RelayProcess(execroot, root, env={"PYTHONPATH": str(runfiles[1])})
    reply = second.touch("out/two")
    assert reply.exit_code == 0, reply.output
    assert second.close() == 0 and the_service(root) == service


def test_a_copy_that_cannot_be_made_leaves_no_temp_dir_and_the_next_place_is_tried(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from treemat import servicespawn
    from treemat.layout import Root

    shared = tmp_path / "cache/treemat/service-packages"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_copytree = shutil.copytree
    calls: list[str] = []

    def copytree_full_disk_once(source: str, target: str, *args: object, **kwargs: object) -> object:
        calls.append(target)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_copytree(source, target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "copytree", copytree_full_disk_once)
    made = Path(servicespawn.package_copy(Root(root), "1-test"))
    assert made.parent == root / "service" and (made / "treemat/relay.py").is_file()
    assert shared.is_dir() and not list(shared.glob("*pkg-*"))  # the failed copy's temp dir went


def test_a_service_that_never_says_ready_is_given_up_on(tmp_path: Path) -> None:
    from treemat import servicespawn
    from treemat.serviceid import ServiceUnavailable

    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"o")  # half an answer, then nothing: a stopped or stuck service
        with pytest.raises(ServiceUnavailable, match=r"did not start within 0.2 s; see .*svc\.log"):
            servicespawn.read_until_closed(read_end, 0.2, tmp_path / "svc.log")
        os.write(write_end, b"k\n")
        os.close(write_end)
        write_end = -1
        assert servicespawn.read_until_closed(read_end, 5.0, tmp_path / "svc.log") == b"k\n"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_relay_without_a_home_serves_through_its_roots_service_and_writes_nothing_in_the_execroot(
    execroot: Path, tmp_path: Path
) -> None:
    """No $HOME and no passwd entry (an unmapped uid in a user namespace, a worker with a scrubbed environment):
    no user cache, so no shared copy and no compiled-module cache; never a relative `~/.cache` in the cwd."""
    tmp_path.chmod(0o1777)  # sticky: a dir anyone may rename in is refused above a package copy
    for directory in (execroot, execroot / "in", execroot / "out"):
        directory.chmod(0o777)
    root = tmp_path / "homeless-root"
    unmapped = ["unshare", "--user", "--map-user=12345", "--map-group=12345"]
    wrapper = [*unmapped, "env", "-u", "HOME", "-u", "XDG_CACHE_HOME"]
    relay = RelayProcess(execroot, root, wrapper=wrapper)
    try:
        reply = relay.touch()
        assert reply.exit_code == 0, reply.output + relay.stderr
        assert "unavailable" not in relay.stderr  # the service, not the in-process fallback
        assert relay.close() == 0
        assert len(list((root / "service").glob("pkg-*"))) == 1
        assert not (execroot / "~").exists()
    finally:
        support_services.end_services_under(root)


def test_the_default_root_without_a_home_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from treemat.errors import CasError
    from treemat.layout import default_root_path

    for name in ("HOME", "XDG_CACHE_HOME", "TREEMAT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # what it does without a passwd entry
    with pytest.raises(CasError, match="set TREEMAT_ROOT or pass --root"):
        default_root_path()


def test_a_relative_xdg_cache_home_is_ignored_never_resolved_in_the_execroot(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The XDG spec: a relative path in XDG_CACHE_HOME is invalid and ignored. Resolved against the relay's cwd
    (Bazel's execroot) it put the service's package copy, the default root and the compiled modules there:
    `bazel clean` deleted the modules a running service imports from, and Bazel saw treemat's files."""
    from treemat import servicespawn
    from treemat.__main__ import keep_bytecode_across_bazel_clean
    from treemat.layout import Root, default_root_path

    execroot, home = tmp_path / "execroot", tmp_path / "home"
    execroot.mkdir()
    home.mkdir(mode=0o700)
    monkeypatch.chdir(execroot)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative-cache")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("TREEMAT_ROOT", raising=False)
    made = Path(servicespawn.package_copy(Root(root), "1-test"))
    assert made.parent == home / ".cache/treemat/service-packages"
    assert default_root_path() == home / ".cache/treemat"
    monkeypatch.setattr("sys.pycache_prefix", None)
    keep_bytecode_across_bazel_clean()
    assert sys.pycache_prefix in (None, str(home / ".cache/treemat/pycache"))  # None under -B
    assert not list(execroot.iterdir())


@pytest.mark.parametrize("damage", ["a module missing", "a module cut short", "an empty dir", "a symlink"])
def test_a_damaged_copy_of_this_version_is_replaced_not_imported(
    execroot: Path, root: Path, tmp_path: Path, damage: str
) -> None:
    """`pkg-<version>` whose files are not the version's (a removal or a cache cleaner interrupted, a disk that
    filled under an older copier, an edit): the service must not import from it (it failed to start, and
    every later relay of the user fell back in-process, or it failed requests as it imported lazily)."""
    from treemat.relay import service_version

    copy = tmp_path / "cache/treemat/service-packages" / f"pkg-{service_version()}"
    shutil.copytree(TOOLS_DIR / "treemat", copy / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    if damage == "a module missing":
        (copy / "treemat/service.py").unlink()
    elif damage == "a module cut short":
        (copy / "treemat/servicepeer.py").write_text("raise SystemExit('cut short')\n")
    elif damage == "an empty dir":
        shutil.rmtree(copy / "treemat")
    else:  # to modules no check covers (the copy's dir is checked, not where a symlink leads)
        copy.rename(tmp_path / "elsewhere")
        copy.symlink_to(tmp_path / "elsewhere")
    leftover = copy.with_name(".pkg-killed")  # the temp dir of a relay killed while it copied
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    relay = RelayProcess(execroot, root, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        reply = relay.touch()
        assert reply.exit_code == 0, reply.output + relay.stderr
        assert "unavailable" not in relay.stderr  # served by the service, not in-process
        assert relay.close() == 0
        assert not copy.is_symlink() and not leftover.exists()
        for name in ("service.py", "servicepeer.py"):
            assert (copy / "treemat" / name).read_bytes() == (TOOLS_DIR / "treemat" / name).read_bytes()
    finally:
        support_services.end_services_under(root)


@pytest.mark.parametrize(
    "hostile", ["others can write it", "another user owns it", "it leads into a dir others can write"]
)
def test_no_package_copy_under_a_cache_dir_another_user_could_swap(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostile: str
) -> None:
    """XDG_CACHE_HOME pointing at a hostile dir: `service-packages` itself is ours alone, but whoever can rename an
    entry above it can swap in a tree of theirs between the check and the service's imports (their code, run as
    us). The copy goes to the root's own `service/` instead."""
    from treemat import servicespawn
    from treemat.layout import Root

    cache = tmp_path / "cache"
    if hostile == "it leads into a dir others can write":
        (tmp_path / "open").mkdir(mode=0o777)
        (tmp_path / "open").chmod(0o777)
        (tmp_path / "open/cache").mkdir(mode=0o700)
        cache.symlink_to(tmp_path / "open/cache")
    else:
        cache.mkdir(mode=0o700)
        if hostile == "others can write it":
            cache.chmod(0o777)
        else:
            give_to_another_user(cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    made = Path(servicespawn.package_copy(Root(root), "1-test"))
    assert made.parent == (root / "service").resolve()
    assert not list(cache.rglob("pkg-*"))


def test_the_dirs_above_the_package_copy_are_made_ours_alone_whatever_the_umask(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Path.mkdir(parents=True) made `<cache>/treemat` with the umask's mode (0775 under 002): the group could
    swap `service-packages` under it."""
    from treemat import servicespawn
    from treemat.layout import Root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    old_umask = os.umask(0o002)
    try:
        made = Path(servicespawn.package_copy(Root(root), "1-test"))
    finally:
        os.umask(old_umask)
    assert made.parent == tmp_path / "cache/treemat/service-packages"
    for directory in (tmp_path / "cache", tmp_path / "cache/treemat", made.parent):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory


@pytest.mark.parametrize("lock", ["the root's service lock", "the user's package lock"])
def test_a_relay_stuck_holding_a_start_lock_never_hangs_the_next_relay(
    execroot: Path, root: Path, tmp_path: Path, lock: str
) -> None:
    """A relay that hangs while it starts the service (its package copy on a hung NFS home, SIGSTOP) holds the
    root's service lock, and the user's package lock: every relay queued behind it waited for good (and Bazel with
    them). The next relay waits a bounded time, says why in one line and serves in-process."""
    import fcntl

    cache = tmp_path / "cache"
    first = RelayProcess(execroot, root, env={"XDG_CACHE_HOME": str(cache)})
    assert first.touch().exit_code == 0, first.stderr
    assert first.close() == 0
    os.kill(the_service(root), signal.SIGKILL)
    locks = list((root / "service").glob("*.lock")) if lock.startswith("the root") else []
    locks += [cache / "treemat/service-packages/.lock"]
    held = [os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) for path in locks]
    try:
        for fd in held:
            fcntl.flock(fd, fcntl.LOCK_EX)
        # the wait bounds the lock and the service's start alike: a start takes 0.3-0.6 s on a loaded 2-core machine
        wait = "1" if lock.startswith("the root") else "3"
        relay = RelayProcess(execroot, root, env={"XDG_CACHE_HOME": str(cache), "TREEMAT_SERVICE_WAIT_SECONDS": wait})
        relay.send(["touch", "out/y"], ["out/y"], ["in/a"], 1)
        reply = answered_within(relay, 30)
        assert reply.exit_code == 0, reply.output
        said = [line for line in relay.stderr.splitlines() if "stager service" in line]
        if lock.startswith("the root"):
            assert len(said) == 1 and "serving in this process" in said[0], relay.stderr
        else:  # the root's own copy serves
            assert not said, relay.stderr
        assert relay.close() == 0
    finally:
        for fd in held:
            os.close(fd)


@pytest.mark.parametrize("planted", ["a module hard-linked from outside", "a module symlinked", "a module not ours"])
def test_a_copy_with_the_right_bytes_but_a_module_another_could_change_is_replaced(
    execroot: Path, root: Path, tmp_path: Path, planted: str
) -> None:
    """The bytes check out, but a module's inode can be changed from outside the 0700 dir (a hard link to it
    elsewhere, a symlink to a file elsewhere, another user's file moved in): whoever holds it edits the module
    after the check, and a service imports it later (lazily, on a request), as us."""
    from treemat.relay import service_version

    copy = tmp_path / "cache/treemat/service-packages" / f"pkg-{service_version()}"
    shutil.copytree(TOOLS_DIR / "treemat", copy / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    module, outside = copy / "treemat/servicepeer.py", tmp_path / "outside.py"
    outside.write_bytes(module.read_bytes())
    module.unlink()
    if planted == "a module hard-linked from outside":
        os.link(outside, module)
    elif planted == "a module symlinked":
        module.symlink_to(outside)
    else:
        os.link(outside, module)
        outside.unlink()
        give_to_another_user(module)
    relay = RelayProcess(execroot, root, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        assert relay.touch().exit_code == 0, relay.stderr
        assert relay.close() == 0
        info = os.lstat(module)
        assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == os.geteuid()
        assert module.read_bytes() == (TOOLS_DIR / "treemat/servicepeer.py").read_bytes()
    finally:
        support_services.end_services_under(root)


def test_a_copy_of_a_group_writable_package_is_ours_alone_and_kept(tmp_path: Path) -> None:
    """The runfiles checked out under umask 002 (modules 0664): the copy must not keep their modes, else every
    relay would find it writable by the group and make it again, under a service importing from it."""
    runfiles = tmp_path / "runfiles"
    shutil.copytree(TOOLS_DIR / "treemat", runfiles / "treemat", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [runfiles / "treemat", *(runfiles / "treemat").rglob("*")]:
        path.chmod(path.stat().st_mode | 0o020)
    probe = "import sys; from treemat.layout import Root; from treemat.servicespawn import package_copy; "
    probe += "print(package_copy(Root(sys.argv[1]), '1-test'))"
    env = {**os.environ, "PYTHONPATH": str(runfiles), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "-c", probe, str(tmp_path / "root")]
    copy = Path(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip())
    (copy / "mark").touch(mode=0o600)
    assert Path(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()) == copy
    assert (copy / "mark").exists()  # the same copy, not made again
    assert not [path for path in [copy, *copy.rglob("*")] if path.stat().st_mode & 0o022]


def test_a_service_that_fails_before_it_is_ready_gives_the_relay_its_reason(execroot: Path, root: Path) -> None:
    """No /dev/null (a bare container, a mount namespace with an empty /dev): the forked service failed before
    its log was open, so the relay's line said `it exited; see <log>` of a log that did not say why."""
    empty_dev = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs none /dev && exec "$@"']
    relay = RelayProcess(execroot, root, wrapper=[*empty_dev, "sh"])
    relay.send(["touch", "out/x"], ["out/x"], ["in/a"], 1)
    reply = answered_within(relay, READ_TIMEOUT)  # in-process: one line, whatever it is (the sandbox needs /dev)
    assert reply.output.count("\n") <= 1, reply.output
    assert relay.close() == 0
    said = [line for line in relay.stderr.splitlines() if "stager service is unavailable" in line]
    assert len(said) == 1 and "/dev/null" in said[0], relay.stderr


@pytest.mark.parametrize("served_through_pth", [False, True])
def test_site_packages_without_pth_files_and_site_in_full_where_a_module_needs_one(
    tmp_path: Path, served_through_pth: bool
) -> None:
    """A service adds the site-packages directories but runs none of their .pth files, unless a module it imports
    is found only through one: then `site` runs in full."""
    site_dir = tmp_path / f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    elsewhere = tmp_path / "elsewhere"
    for directory in (site_dir, elsewhere):
        directory.mkdir(parents=True)
    (site_dir / "in_site.py").write_text("")
    (elsewhere / "through_pth.py").write_text("")
    hooked = tmp_path / "hook-ran"
    (site_dir / "a.pth").write_text(f"{elsewhere}\nimport os; open({str(hooked)!r}, 'a').write('ran')\n")
    needed = ("in_site", "through_pth") if served_through_pth else ("in_site", "google.protobuf")
    done = _site_probe(tmp_path, needed, "in_site, google.protobuf")
    assert done.returncode == 0, done.stderr
    assert hooked.exists() == served_through_pth


def _site_probe(user_base: Path, served: tuple[str, ...], imports: str) -> subprocess.CompletedProcess[str]:
    """`python -S`: add_site_packages(pth_files=False) with `served` as what the service needs from the site-packages
    (the user's site under `user_base`), then import `imports`."""
    probe = (
        "import treemat.servicespawn as spawn\n"
        f"spawn.SERVED_FROM_SITE = {served!r}\n"
        "spawn.add_site_packages(pth_files=False)\n"
        f"import {imports}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TOOLS_DIR), "PYTHONUSERBASE": str(user_base)}
    env.pop("PYTHONNOUSERSITE", None)
    return subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True, check=False)


def test_a_module_whose_parent_package_is_found_only_through_a_pth_file_runs_site_in_full(tmp_path: Path) -> None:
    """protobuf installed in a directory a .pth file names: its parent package (`google`) is not found either, which
    importlib.util.find_spec raises for instead of saying "not found"; `site` runs in full, the service starts."""
    site_dir = tmp_path / f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    package = tmp_path / "elsewhere/outer_ns/inner"
    for directory in (site_dir, package):
        directory.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (site_dir / "a.pth").write_text(f"{tmp_path / 'elsewhere'}\n")
    done = _site_probe(tmp_path, ("outer_ns.inner",), "outer_ns.inner")
    assert done.returncode == 0, done.stderr


def test_a_venvs_interpreter_gets_the_venvs_site_packages_and_not_the_users(tmp_path: Path) -> None:
    """Under `-S` a venv's interpreter still has the base install's prefix (site.main() reads pyvenv.cfg): the
    directories `site` would add are the venv's, and no user site (a venv leaves it out), not the base install's."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (venv / "lib" / version / "site-packages/in_venv.py").write_text("")
    user_site = tmp_path / "user-base/lib" / version / "site-packages"
    user_site.mkdir(parents=True)
    (user_site / "in_user_site.py").write_text("")
    probe = (
        "import importlib.util, treemat.servicespawn as spawn\n"
        "spawn.add_site_packages(pth_files=False)\n"
        "import in_venv\n"
        "assert importlib.util.find_spec('in_user_site') is None, 'the user site of a venv'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TOOLS_DIR), "PYTHONUSERBASE": str(tmp_path / "user-base")}
    env.pop("PYTHONNOUSERSITE", None)
    python = str(venv / "bin/python")
    done = subprocess.run([python, "-S", "-c", probe], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
