"""treemat: fast, hermetic input materialization for Bazel actions.

Layers, top to bottom; each imports only from the layers below it (`|`: siblings that do not import each
other). docs/architecture.md explains them; `lint-imports` enforces this exact list (pyproject.toml):

    __main__
    cli
    commands
    bot
    worker | replay | bench
    stack
    executor
    inputs | toolcache
    action | outputs | toolrun | execpool | budget
    sandbox
    dircache | materializer
    staging | merkle | execlog | blobguard
    tree | protocol | cas | backends
    manifest
    protos
    digest | counters | locking | flagfile | fsprims | layout | sandboxd | sandbox_darwin | ledger | writewatch
    sandboxstart | sandboxview
    errors
"""

__version__ = "0.1.0"
