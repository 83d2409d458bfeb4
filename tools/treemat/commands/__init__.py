"""The `treemat` subcommands, one module each; cli.py declares the group and registers them.

Every command is a click command that returns its exit status; failures it raises (TreematError, OSError)
become one line on stderr through the group's single error handler (`_common.error_handler`).
"""
