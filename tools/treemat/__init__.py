"""treemat: fast, hermetic input materialization for Bazel actions.

The modules are layered: each imports only from the layers below it. The one list of layers is the
import-linter contract in pyproject.toml (`lint-imports` enforces it); docs/architecture.md explains it.
"""

__version__ = "0.1.0"
