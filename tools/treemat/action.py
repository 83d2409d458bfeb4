"""What an action is (its request) and what came of it (its result): the data the executor layers share."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from treemat.flagfile import ActionSpec
from treemat.manifest import InputManifest, RequestInput
from treemat.staging import StageReport

__all__ = ["ActionRequest", "ActionResult", "RequestInput"]


class ActionRequest:
    """Everything needed to run one action."""

    __slots__ = ("base_env", "execroot", "inputs", "output_root", "request_id", "spec")

    def __init__(
        self,
        spec: ActionSpec,
        inputs: InputManifest | Iterable[RequestInput | tuple[str, str | None]],
        execroot: Path,
        request_id: int = 0,
        base_env: Mapping[str, str] | None = None,
        output_root: Path | None = None,
    ) -> None:
        self.spec = spec
        self.inputs = InputManifest.of(inputs)
        self.execroot = execroot
        self.request_id = request_id
        self.base_env = base_env
        self.output_root = output_root


class ActionResult:
    """Exit status and combined output to hand back to Bazel, plus what staging did."""

    __slots__ = ("cancelled", "exit_code", "output", "quarantined", "stage", "stage_seconds", "tool_seconds")

    def __init__(
        self,
        exit_code: int,
        output: str,
        stage: StageReport | None = None,
        stage_seconds: float = 0.0,
        tool_seconds: float = 0.0,
        cancelled: bool = False,
        quarantined: list[str] | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.output = output
        self.stage = stage
        self.stage_seconds = stage_seconds
        self.tool_seconds = tool_seconds
        self.cancelled = cancelled
        self.quarantined: list[str] = [] if quarantined is None else quarantined

    def __repr__(self) -> str:
        return f"ActionResult(exit_code={self.exit_code}, output={self.output!r}, cancelled={self.cancelled})"

    def summary(self, tool: str, inputs: int) -> dict[str, object]:
        """A small JSON-able record for `treemat stats`."""
        record: dict[str, object] = {
            "tool": os.path.basename(tool),
            "inputs": inputs,
            "exit_code": self.exit_code,
            "stage_ms": round(self.stage_seconds * 1000, 2),
            "tool_ms": round(self.tool_seconds * 1000, 2),
        }
        if self.stage is not None:
            record.update(methods=dict(self.stage.methods), subtree_hits=self.stage.subtree_hits)
        if self.quarantined:
            record["quarantined"] = len(self.quarantined)
        return record
