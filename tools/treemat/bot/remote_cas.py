"""The server's CAS (REAPI ContentAddressableStorage + ByteStream), filling treemat's local CAS on demand.

Small blobs travel in BatchReadBlobs/BatchUpdateBlobs requests; big ones stream through ByteStream. Every
blob read is verified against its digest before it is stored locally; only blobs the local CAS lacks are read.
Every local file uploaded is hashed as it is sent: a blob changed in the local CAS since it was ingested (a
write, or a damaged blob the ingest found already in place) raises LocalBlobChanged, never reaches the server.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from treemat.bot.rpc import bs_grpc, bs_pb2, code_pb2, re_grpc, re_pb2
from treemat.bot.stager import Digest, LocalStager, TreematError

BATCH_BYTES = 2 << 20  # per Batch* request (BuildGrid accepts up to ~4 MiB)
BATCH_COUNT = 400  # digests per request (BuildGrid caps at 500)
STREAM_CHUNK = 1 << 20


class RemoteCasError(TreematError):
    """The server's CAS lacks a blob, or sent one that does not match its digest."""


class LocalBlobChanged(RemoteCasError):
    """A local CAS file about to be uploaded no longer holds the bytes of its digest."""

    def __init__(self, digest: Digest, path: Path) -> None:
        super().__init__(f"local blob {digest} at {path} changed since it was stored (not uploaded)")
        self.digest = digest
        self.path = path


@dataclass(slots=True)
class TransferStats:
    """Blobs and bytes moved by one RemoteCas call sequence."""

    blobs_read: int = 0
    bytes_read: int = 0
    blobs_written: int = 0
    bytes_written: int = 0
    streamed: int = 0
    local_hits: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def to_digest(proto: Any) -> Digest:
    """REAPI Digest message -> treemat Digest."""
    return Digest(str(proto.hash), int(proto.size_bytes))


def to_proto(digest: Digest) -> Any:
    """treemat Digest -> REAPI Digest message."""
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


class RemoteCas:
    """Reads and writes blobs on a REAPI server for one instance name."""

    def __init__(self, channel: grpc.Channel, instance: str, local: LocalStager, *, timeout: float = 120.0) -> None:
        self.instance = instance
        self.local = local
        self.timeout = timeout
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)

    # --------------------------------------------------------------------------- reads

    def fetch(self, wanted: Iterable[tuple[Digest, bool]], stats: TransferStats) -> None:
        """Make sure every (digest, executable) blob is in the local CAS, reading only the missing ones."""
        missing: dict[str, list[tuple[Digest, bool]]] = {}
        for digest, executable in wanted:
            if self.local.has_blob(digest, executable):
                stats.local_hits += 1
                continue
            other = self._local_other_mode(digest, executable)
            if other is not None:  # same bytes under the other exec bit: copy locally, no network
                self.local.put_file(other, executable=executable, expected=digest)
                stats.local_hits += 1
                continue
            missing.setdefault(digest.hash, []).append((digest, executable))
        small = [modes[0][0] for modes in missing.values() if modes[0][0].size <= BATCH_BYTES // 2]
        big = [modes[0][0] for modes in missing.values() if modes[0][0].size > BATCH_BYTES // 2]
        for batch in _batches(small):
            for digest, data in self._batch_read(batch):
                stats.blobs_read += 1
                stats.bytes_read += len(data)
                for _, executable in missing[digest.hash]:
                    self.local.put_bytes(data, executable=executable)
        for digest in big:
            modes = missing[digest.hash]
            path = self._stream_read(digest)
            try:
                for _, executable in modes:
                    self.local.put_file(path, executable=executable, expected=digest)
            finally:
                path.unlink(missing_ok=True)
            stats.blobs_read += 1
            stats.bytes_read += digest.size
            stats.streamed += 1

    def read_messages(self, digests: Sequence[Digest], stats: TransferStats) -> dict[str, bytes]:
        """Bytes of small metadata blobs (Action, Command, Directory), via the local CAS when it has them."""
        found: dict[str, bytes] = {}
        self.fetch(((d, False) for d in digests), stats)
        for digest in digests:
            data = self.local.read_blob(digest)
            if data is None:
                raise RemoteCasError(f"blob {digest} vanished from the local CAS")
            found[digest.hash] = data
        return found

    def _local_other_mode(self, digest: Digest, executable: bool) -> Path | None:
        if self.local.has_blob(digest, not executable):
            return self.local.blob_path(digest, not executable)
        return None

    def _batch_read(self, digests: Sequence[Digest]) -> Iterator[tuple[Digest, bytes]]:
        request = re_pb2.BatchReadBlobsRequest(instance_name=self.instance, digests=[to_proto(d) for d in digests])
        response = self._cas.BatchReadBlobs(request, timeout=self.timeout)
        for item in response.responses:
            digest = to_digest(item.digest)
            if item.status.code != code_pb2.OK:
                raise RemoteCasError(f"server CAS cannot serve {digest}: {item.status.message or item.status.code}")
            _verify(digest, item.data)
            yield digest, bytes(item.data)

    def _stream_read(self, digest: Digest) -> Path:
        resource = f"{self.instance}/blobs/{digest.hash}/{digest.size}".lstrip("/")
        path = self.local.temp_dir() / f"bs-{os.getpid()}-{secrets.token_hex(6)}"
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(path, "wb") as out:
                for chunk in self._bytestream.Read(bs_pb2.ReadRequest(resource_name=resource), timeout=self.timeout):
                    out.write(chunk.data)
                    hasher.update(chunk.data)
                    size += len(chunk.data)
        except grpc.RpcError as exc:
            path.unlink(missing_ok=True)
            raise RemoteCasError(f"ByteStream read of {digest} failed: {exc.code()} {exc.details()}") from None
        if hasher.hexdigest() != digest.hash or size != digest.size:
            path.unlink(missing_ok=True)
            raise RemoteCasError(f"ByteStream sent {size} bytes that do not match {digest}")
        return path

    # --------------------------------------------------------------------------- writes

    def upload(self, blobs: dict[str, tuple[Digest, Path | bytes]], stats: TransferStats) -> None:
        """Upload the blobs the server lacks (FindMissingBlobs first); values are a local path or bytes."""
        digests = [digest for digest, _ in blobs.values()]
        missing: list[Digest] = []
        for batch in _batches(digests, by_size=False):
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.instance, blob_digests=[to_proto(d) for d in batch]
            )
            response = self._cas.FindMissingBlobs(request, timeout=self.timeout)
            missing.extend(to_digest(d) for d in response.missing_blob_digests)
        small = [d for d in missing if d.size <= BATCH_BYTES // 2]
        for batch in _batches(small):
            requests = [
                re_pb2.BatchUpdateBlobsRequest.Request(digest=to_proto(d), data=_content(d, blobs[d.hash][1]))
                for d in batch
            ]
            response = self._cas.BatchUpdateBlobs(
                re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance, requests=requests), timeout=self.timeout
            )
            for item in response.responses:
                if item.status.code != code_pb2.OK:
                    raise RemoteCasError(f"server refused blob {to_digest(item.digest)}: {item.status.message}")
            stats.blobs_written += len(batch)
            stats.bytes_written += sum(d.size for d in batch)
        for digest in (d for d in missing if d.size > BATCH_BYTES // 2):
            self._stream_write(digest, blobs[digest.hash][1])
            stats.blobs_written += 1
            stats.bytes_written += digest.size
            stats.streamed += 1

    def _stream_write(self, digest: Digest, source: Path | bytes) -> None:
        resource = f"{self.instance}/uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size}".lstrip("/")
        changed: list[bool] = []

        def chunks() -> Iterator[Any]:
            hasher, offset = hashlib.sha256(), 0
            for data in _iter_chunks(source):
                hasher.update(data)
                last = offset + len(data) >= digest.size
                if last and (offset + len(data) != digest.size or hasher.hexdigest() != digest.hash):
                    changed.append(True)  # end the stream unfinished: the server commits nothing
                    return
                yield bs_pb2.WriteRequest(
                    resource_name=resource if offset == 0 else "",
                    write_offset=offset,
                    data=data,
                    finish_write=last,
                )
                offset += len(data)
            if offset != digest.size:
                changed.append(True)

        try:
            response = self._bytestream.Write(chunks(), timeout=self.timeout)
        except grpc.RpcError as exc:
            if changed and isinstance(source, Path):
                raise LocalBlobChanged(digest, source) from None
            raise RemoteCasError(f"ByteStream write of {digest} failed: {exc.code()} {exc.details()}") from None
        if changed and isinstance(source, Path):
            raise LocalBlobChanged(digest, source)
        if response.committed_size != digest.size:
            raise RemoteCasError(f"ByteStream write of {digest} committed {response.committed_size} bytes")


def _verify(digest: Digest, data: bytes) -> None:
    if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.hash:
        raise RemoteCasError(f"server CAS sent bytes that do not match {digest}")


def _content(digest: Digest, source: Path | bytes) -> bytes:
    """The bytes to upload for `digest`; a local file is read and checked against the digest first."""
    if isinstance(source, bytes):
        return source
    data = source.read_bytes()
    if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.hash:
        raise LocalBlobChanged(digest, source)
    return data


def _iter_chunks(source: Path | bytes) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, max(len(source), 1), STREAM_CHUNK):
            yield source[start : start + STREAM_CHUNK]
        return
    with open(source, "rb") as handle:
        while data := handle.read(STREAM_CHUNK):
            yield data


def _batches(digests: Sequence[Digest], *, by_size: bool = True) -> Iterator[list[Digest]]:
    batch: list[Digest] = []
    total = 0
    for digest in digests:
        if batch and (len(batch) >= BATCH_COUNT or (by_size and total + digest.size > BATCH_BYTES)):
            yield batch
            batch, total = [], 0
        batch.append(digest)
        total += digest.size
    if batch:
        yield batch
