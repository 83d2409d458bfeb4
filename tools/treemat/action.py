"""What an action is (its request) and what came of it (its result): the data the executor layers share."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from treemat.flagfile import ActionSpec
from treemat.manifest import InputManifest, RequestInput
from treemat.staging import StageReport

__all__ = ["ActionRequest", "ActionResult", "RequestInput"]


@dataclass(slots=True, init=False)
class ActionRequest:
    """Everything needed to run one action."""

    spec: ActionSpec
    inputs: InputManifest
    execroot: Path
    request_id: int
    base_env: Mapping[str, str] | None  # the tool's environment before the action's own; None: this process's
    output_root: Path | None  # where outputs are copied to, if not `execroot` (the service: the relay's descriptor)

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


@dataclass(slots=True)
class ActionResult:
    """Exit status and combined output to hand back to Bazel, plus what staging did."""

    exit_code: int
    output: str
    stage: StageReport | None = None
    stage_seconds: float = 0.0
    tool_seconds: float = 0.0
    cancelled: bool = False
    quarantined: list[str] = field(default_factory=list)

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
