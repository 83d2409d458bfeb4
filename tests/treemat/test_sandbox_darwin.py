"""The macOS sandbox profile (sandbox_darwin.py): its text, checked here; its effect needs a macOS run."""

from __future__ import annotations

from pathlib import Path

import pytest
from treemat import sandbox_darwin
from treemat.sandbox import ISOLATION_DARWIN, RunDir, Sandbox, ToolPlan


def _forms(text: str) -> list[str]:
    """The top-level s-expressions of a profile (balanced parentheses outside string literals)."""
    forms, depth, start, in_string, escaped = [], 0, 0, False, False
    for index, char in enumerate(text):
        if in_string:
            escaped = not escaped and char == "\\"
            if char == '"' and not escaped:
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char == "(":
            depth += 1
            start = index if depth == 1 else start
        elif char == ")":
            depth -= 1
            assert depth >= 0, f"unbalanced at {index}"
            if depth == 0:
                forms.append(text[start : index + 1])
    assert depth == 0 and not in_string
    return forms


def test_writes_are_denied_but_in_the_listed_dirs_and_the_store_is_hidden() -> None:
    text = sandbox_darwin.profile(["/x/exec/1", "/x/exec/1.run/tmp"], ["/x/cas", "/x/verified"])
    forms = _forms(text)
    assert forms[:3] == ["(version 1)", "(allow default)", "(deny file-write*)"]
    allow = forms[3]
    assert allow.startswith("(allow file-write*")
    assert '(subpath "/x/exec/1")' in allow and '(subpath "/x/exec/1.run/tmp")' in allow
    assert '(literal "/dev/null")' in allow and "/x/cas" not in allow
    hidden = forms[4]  # last: SBPL lets later rules win
    assert hidden.startswith("(deny file-read* file-write*") and '(subpath "/x/cas")' in hidden
    assert len(forms) == 5


def test_paths_are_quoted_and_control_characters_refused() -> None:
    text = sandbox_darwin.profile(['/a "b"\\c'], [])
    assert '(subpath "/a \\"b\\"\\\\c")' in text
    _forms(text)
    with pytest.raises(ValueError, match="control characters"):
        sandbox_darwin.profile(["/a\nb"], [])


def test_an_in_place_darwin_sandbox_wraps_the_tool_in_sandbox_exec(tmp_path: Path) -> None:
    sandbox = Sandbox(ISOLATION_DARWIN, None, None, [str(tmp_path / "root/cas")])
    run_dir = RunDir(tmp_path / "exec/1.run")
    (tmp_path / "exec").mkdir()
    run_dir.create()
    plan = ToolPlan(["swiftc", "-v"], {}, tmp_path / "exec/1", run_dir, overlay=False)
    assert sandbox.in_place and not sandbox.overlay
    argv = sandbox.command(plan)
    assert argv == [sandbox_darwin.SANDBOX_EXEC, "-f", str(run_dir.path / "sandbox.sb"), "swiftc", "-v"]
    written = (run_dir.path / "sandbox.sb").read_text()
    assert f'(subpath "{tmp_path / "exec/1"}")' in written and f'(subpath "{tmp_path / "root/cas"}")' in written
