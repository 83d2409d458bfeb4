"""Generated REAPI, Remote Workers API, ByteStream and google.rpc protos, taken from BuildGrid's package.

BuildGrid (the engine the bot serves) ships these `_pb2`/`_pb2_grpc` modules; importing them from one place
keeps the bot on exactly the message definitions its server uses.
"""

from __future__ import annotations

from buildgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from buildgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildgrid._protos.google.bytestream import bytestream_pb2 as bs_pb2
from buildgrid._protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from buildgrid._protos.google.rpc import code_pb2, status_pb2

__all__ = ["bots_pb2", "bots_pb2_grpc", "bs_grpc", "bs_pb2", "code_pb2", "re_grpc", "re_pb2", "status_pb2"]
