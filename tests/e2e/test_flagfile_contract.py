"""The Starlark side of the flagfile contract, pinned: what the rules write is what the worker parses.

`bazel aquery --output=jsonproto` gives every treemat action's command line as the rules built it (startup
flags, then the request flagfile's lines); each request must parse with `treemat.flagfile.parse_action_args`
into exactly the action's declared outputs and a tool argv. //tests/flagfile_contract:tricky carries every
argument shape that matters (`@` arguments, written `@@` by `escape_tool_arg` and unescaped by
`unescape_tool_argument`; `{EXEC_ROOT}`; spaces; a tool flag that looks like treemat's; a second `--`); it is
also built for real, on the worker and in one-shot mode, and the tool must see its arguments as written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from treemat.flagfile import parse_action_args, unescape_tool_argument

WORKSPACE = Path(__file__).resolve().parents[2]
TREEMAT_MNEMONICS = ("SwiftCompile", "SwiftLink", "TreematRun")
TRICKY = "//tests/flagfile_contract:tricky"
SHELL_ENV_PROBE = "TREEMAT_SHELL_ENV_PROBE"
# the tool arguments of :tricky after the output path, as written in BUILD.bazel (locations expanded)
TRICKY_ARGV = [
    "@response.rsp",
    "@@double",
    "-rpath",
    "@executable_path/Frameworks",
    "{EXEC_ROOT}/sub",
    "a b",
    "--output=not-a-treemat-flag",
    "--",
    "tests/flagfile_contract/in.txt",
]

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (tools/setup.sh installs it)"),
]


def _bazel(output_base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bazel", f"--output_base={output_base}", *args], cwd=WORKSPACE, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def output_base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("aquery") / "ob"
    yield base
    _bazel(base, "shutdown")


@pytest.fixture(scope="module")
def actions(output_base: Path) -> list[dict[str, Any]]:
    """Every treemat action of //examples/... and :tricky: mnemonic, command line, declared outputs."""
    query = f"mnemonic('{'|'.join(TREEMAT_MNEMONICS)}', set(//examples/... {TRICKY}))"
    probe = f"--action_env={SHELL_ENV_PROBE}=1"  # in the environment of exactly the actions that take Bazel's
    result = _bazel(output_base, "aquery", "--output=jsonproto", "--include_param_files", probe, query)
    assert result.returncode == 0, result.stderr[-3000:]
    graph = json.loads(result.stdout)
    fragments = {f["id"]: f for f in graph["pathFragments"]}

    def path_of(fragment_id: int) -> str:
        parts = []
        while fragment_id:
            fragment = fragments[fragment_id]
            parts.append(fragment["label"])
            fragment_id = fragment.get("parentId", 0)
        return "/".join(reversed(parts))

    artifacts = {a["id"]: path_of(a["pathFragmentId"]) for a in graph["artifacts"]}
    labels = {t["id"]: t["label"] for t in graph["targets"]}
    found = []
    for action in graph["actions"]:
        found.append(
            {
                "mnemonic": action["mnemonic"],
                "label": labels[action["targetId"]],
                "arguments": _command_line(action),
                "outputs": sorted(artifacts[i] for i in action["outputIds"]),
                "env": {v["key"]: v["value"] for v in action.get("environmentVariables", [])},
            }
        )
    return found


def _command_line(action: dict[str, Any]) -> list[str]:
    """The argv with the request flagfile's lines in place of `@flagfile` (Bazel >= 5 keeps the reference)."""
    params = {p["execPath"]: p["arguments"] for p in action.get("paramFiles", [])}
    argv: list[str] = []
    for arg in action["arguments"]:
        argv.extend(params.get(arg[1:], [arg]) if arg.startswith("@") and not arg.startswith("@@") else [arg])
    return argv


def test_every_treemat_action_writes_a_request_the_worker_parses(actions: list[dict[str, Any]]) -> None:
    mnemonics = {a["mnemonic"] for a in actions}
    assert {"SwiftCompile", "SwiftLink", "TreematRun"} <= mnemonics, mnemonics
    for action in actions:
        binary, startup, *request = action["arguments"]
        assert binary.endswith("tools/treemat/launcher") and startup == "--protocol=proto", action
        assert not any("\n" in arg for arg in request), "a multiline flagfile cannot carry a newline"
        spec = parse_action_args(request)
        assert sorted(spec.outputs + spec.output_dirs) == action["outputs"], action["label"]
        assert spec.argv and not spec.argv[0].startswith("-"), f"{action['label']}: the tool comes first"
        assert request.index("--") == len(request) - len(spec.argv) - 1


def test_at_arguments_are_escaped_by_the_rules_and_unescaped_by_treemat(actions: list[dict[str, Any]]) -> None:
    (tricky,) = [a for a in actions if a["label"] == TRICKY]
    _binary, _startup, *request = tricky["arguments"]
    written = request[request.index("--") + 1 :]
    assert written[2:] == [arg if not arg.startswith("@") else "@" + arg for arg in TRICKY_ARGV], written
    spec = parse_action_args(request)
    assert spec.env == {"TRICKY": "x=y z"}
    assert len(spec.outputs) == 1 and spec.outputs[0].endswith("/bin/tests/flagfile_contract/argv.txt")
    assert spec.argv[0].endswith("tests/flagfile_contract/record_args")
    assert spec.argv[2:] == TRICKY_ARGV
    assert [unescape_tool_argument(arg) for arg in written[2:]] == TRICKY_ARGV


@pytest.mark.parametrize("strategy", ["worker", "one-shot"])
def test_the_tool_sees_its_arguments_as_written(output_base: Path, tmp_path: Path, strategy: str) -> None:
    flags = ["--config=treemat"] if strategy == "worker" else ["--spawn_strategy=local"]
    roots = [f"--worker_extra_flag={m}=--root={tmp_path / 'root'}" for m in TREEMAT_MNEMONICS]
    build = _bazel(output_base, "build", *flags, *roots, TRICKY)
    assert build.returncode == 0, build.stderr[-3000:]
    assert ("worker" in build.stderr) == (strategy == "worker"), build.stderr[-2000:]
    bin_dir = Path(_bazel(output_base, "info", "bazel-bin").stdout.strip())
    seen = (bin_dir / "tests/flagfile_contract/argv.txt").read_text().splitlines()
    exec_root = seen[4].removesuffix("/sub")
    assert Path(exec_root).is_absolute() and "{EXEC_ROOT}" not in exec_root
    assert seen == [arg.replace("{EXEC_ROOT}", exec_root) for arg in TRICKY_ARGV] + ["TRICKY=x=y z"]
    _bazel(output_base, "clean")  # the next strategy runs the action again


def test_only_the_link_gets_the_shell_environment(actions: list[dict[str, Any]]) -> None:
    """use_default_shell_env only where a rule asks for it: SwiftLink (swiftc's clang driver finds `ld` on PATH);
    the compiles run swiftc by absolute path and treemat_run asks only through its attribute."""
    for action in actions:
        asked = action["mnemonic"] == "SwiftLink"
        assert (SHELL_ENV_PROBE in action["env"]) == asked, (action["mnemonic"], action["label"], action["env"])
