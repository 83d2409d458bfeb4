"""treemat: fast, hermetic input materialization for Bazel actions.

Layers, each with one job, data flowing one way:

    digest -> cas -> tree -> backends/materializer -> dircache -> executor -> worker -> cli
"""

__version__ = "0.1.0"
