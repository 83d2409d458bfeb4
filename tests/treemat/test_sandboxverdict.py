"""The sandbox probe's kept verdict (sandboxverdict.py): used only when every fact it depends on is unchanged and
the file is ours and intact; anything else means probing again (fail closed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from treemat import sandbox as sandbox_module
from treemat.layout import Root
from treemat.sandbox import ISOLATION_COW, ISOLATION_OVERLAY, Sandbox, open_sandbox
from treemat.sandboxverdict import (
    VERDICT_FILE,
    VERDICT_FORMAT,
    forget_verdict,
    kept_verdict,
    machine_key,
    usable_modes,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the probe and its verdict are Linux's")


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Counts the probe's real runs (each still runs: the spy only records the call)."""
    calls: list[bool] = []
    real = sandbox_module.probe_run

    def counting(sandbox: Sandbox, scratch: Path, *, overlay: bool) -> AbstractContextManager[tuple[int, bytes, bool]]:
        calls.append(overlay)
        return real(sandbox, scratch, overlay=overlay)

    monkeypatch.setattr(sandbox_module, "probe_run", counting)
    return calls


def _open(root: Path, want: str = "auto") -> str:
    sandbox = open_sandbox(Root(root), want)
    try:
        return sandbox.mode
    finally:
        sandbox.close()


def test_a_second_process_takes_the_kept_verdict_instead_of_probing(tmp_path: Path, probes: list[bool]) -> None:
    root = tmp_path / "root"
    mode = _open(root)
    assert probes and mode in (ISOLATION_OVERLAY, ISOLATION_COW)
    assert kept_verdict(root, machine_key(root, "auto")) == mode
    assert oct(os.stat(root / VERDICT_FILE).st_mode & 0o777) == oct(0o600)
    probes.clear()
    assert _open(root) == mode
    assert probes == [], "the kept verdict was not used"


@pytest.mark.parametrize(
    "damage",
    ["other key", "garbage", "empty", "unknown mode", "writable by others", "a symlink", "extra line"],
)
def test_a_stale_or_damaged_verdict_means_probing_again(tmp_path: Path, probes: list[bool], damage: str) -> None:
    root = tmp_path / "root"
    mode = _open(root)
    key = machine_key(root, "auto")
    path = root / VERDICT_FILE
    if damage == "other key":  # another kernel, boot, namespace, mount... (the facts are digested into the key)
        path.write_text(f"{VERDICT_FORMAT}\n{'0' * len(key)}\n{mode}\n")
    elif damage == "garbage":
        path.write_bytes(os.urandom(64))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "unknown mode":
        path.write_text(f"{VERDICT_FORMAT}\n{key}\nnone\n")
    elif damage == "writable by others":
        os.chmod(path, 0o666)
    elif damage == "a symlink":
        elsewhere = tmp_path / "planted"
        elsewhere.write_text(f"{VERDICT_FORMAT}\n{key}\n{mode}\n")
        path.unlink()
        path.symlink_to(elsewhere)
    else:
        path.write_text(f"{VERDICT_FORMAT}\n{key}\n{mode}\nmore\n")
    assert kept_verdict(root, key) is None
    probes.clear()
    assert _open(root) == mode
    assert probes, "a stale or damaged verdict was used"
    assert kept_verdict(root, key) == mode, "the probe's fresh verdict was not kept"


def test_a_verdict_owned_by_another_user_is_not_used(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    key = machine_key(root, "auto")
    (root / VERDICT_FILE).write_text(f"{VERDICT_FORMAT}\n{key}\n{ISOLATION_OVERLAY}\n")
    os.chmod(root / VERDICT_FILE, 0o600)
    assert kept_verdict(root, key) == ISOLATION_OVERLAY
    os.chown(root / VERDICT_FILE, 4242, 4242)
    assert kept_verdict(root, key) is None


def test_the_key_changes_with_the_namespace_the_isolation_asked_for_and_the_mount(tmp_path: Path) -> None:
    """Another user namespace (as another sandbox or container would be) or another mount means another key."""
    root = tmp_path / "root"
    root.mkdir()
    here = machine_key(root, "auto")
    assert machine_key(root, "auto") == here
    assert machine_key(root, ISOLATION_COW) != here
    unshare = shutil.which("unshare")
    assert unshare is not None
    code = "import sys; from pathlib import Path; from treemat.sandboxverdict import machine_key as key\n"
    code += "print(key(Path(sys.argv[1]), 'auto'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for flags in (["--user", "--map-root-user"], ["--user", "--map-root-user", "--mount"]):
        other = subprocess.run(
            [unshare, *flags, sys.executable, "-c", code, str(root)], env=env, capture_output=True, text=True
        )
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip() not in ("", here), flags


def test_a_kept_mode_stands_only_for_what_the_probe_of_that_isolation_could_find() -> None:
    assert usable_modes("auto") == (ISOLATION_OVERLAY, ISOLATION_COW)
    assert usable_modes(ISOLATION_OVERLAY) == (ISOLATION_OVERLAY,)
    assert usable_modes(ISOLATION_COW) == (ISOLATION_COW,)
    assert usable_modes("none") == ()


def test_a_sandbox_chosen_by_a_kept_verdict_knows_it_and_forgetting_means_probing(
    tmp_path: Path, probes: list[bool]
) -> None:
    """A tool start that fails in a kept mode forgets the verdict (sandbox.start): the next process probes."""
    root = tmp_path / "root"
    mode = _open(root)
    sandbox = open_sandbox(Root(root), "auto")
    try:
        assert sandbox.kept_in == Root(root).path and sandbox.mode == mode
    finally:
        sandbox.close()
    forget_verdict(root)
    probes.clear()
    assert _open(root) == mode and probes
