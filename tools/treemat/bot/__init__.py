"""treemat as a Remote Workers API bot for BuildGrid: lease actions, stage their input roots, run, upload.

Modules: `rpc` (BuildGrid's generated REAPI/RWAPI/ByteStream protos, imported in one place), `stager` (the one
narrow seam into treemat's core: CAS + materializer + directory cache), `remote_cas` (the server's CAS),
`runner` (one Action end to end), `session` (the bot session and its leases), `cluster` (PostgreSQL +
BuildGrid + bots on loopback, for tests and `tools/cluster.sh`).
"""
