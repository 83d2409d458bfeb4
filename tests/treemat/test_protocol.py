"""Tests for treemat.protocol's JSON stream decoder: back-to-back objects, reads split anywhere, bad JSON."""

from __future__ import annotations

import base64
import hashlib
import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from treemat import protos
from treemat.errors import ProtocolError
from treemat.protocol import (
    JsonRequestDecoder,
    Malformed,
    WorkItem,
    WorkReply,
    encode_delimited,
    encode_reply,
    read_json_requests,
    read_proto_requests,
    sniff_protocol,
)

TRICKY = [
    {"requestId": 3, "arguments": ["--", "echo", "}{", '{"', "\\", "é☃𝄞", "\u0000\n"], "inputs": []},
    {"arguments": ["a"], "inputs": [{"path": "x}{y", "digest": "ab=="}, {"path": "n", "digest": ""}]},
    {"n": [-1, 2.5e-3, 1e10, True, False, None, {}, [], [[{}]]], "s": "\\u", "t": "\ud83d"},
]


def _decode(chunks: list[bytes]) -> tuple[list[object], list[ProtocolError], JsonRequestDecoder]:
    decoder = JsonRequestDecoder()
    objects: list[object] = []
    errors: list[ProtocolError] = []
    for chunk in chunks:
        for piece in decoder.feed(chunk):
            (errors if isinstance(piece, ProtocolError) else objects).append(piece)
    return objects, errors, decoder


def test_every_prefix_of_a_stream_is_incomplete_never_an_error() -> None:
    for separator in ("", "\n", " \r\n\t"):
        data = separator.join(json.dumps(obj) for obj in TRICKY).encode()
        for cut in range(len(data) + 1):
            objects, errors, _ = _decode([data[:cut]])
            assert not errors, (cut, data[:cut], errors)
            assert objects == TRICKY[: len(objects)]
            objects, errors, decoder = _decode([data[:cut], data[cut:]])
            assert objects == TRICKY and not errors and not decoder.pending, (cut, separator)


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(
        st.dictionaries(
            st.text(max_size=5),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                max_leaves=8,
            ),
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    ascii_only=st.booleans(),
)
def test_random_requests_split_at_random_points(
    requests: list[dict[str, object]], cuts: list[int], ascii_only: bool
) -> None:
    data = "".join(json.dumps(r, ensure_ascii=ascii_only) for r in requests).encode()
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    objects, errors, decoder = _decode(chunks)
    assert objects == requests and not errors and not decoder.pending


def test_garbage_between_objects_is_reported_once_per_run() -> None:
    objects, errors, _ = _decode([b'junk{"a": 1}', b"more ", b"junk", b'  {"b": 2}', b" ]"])
    assert objects == [{"a": 1}, {"b": 2}]
    assert len(errors) == 3 and all("undecodable bytes" in str(e) for e in errors)


def test_invalid_json_is_reported_and_decoding_resumes_at_the_next_request() -> None:
    objects, errors, decoder = _decode([b'{"a": tru}{"b": {"c": [1, 2]}}', b'{"bad" 1}', b'\n{"d": 4}'])
    assert objects == [{"b": {"c": [1, 2]}}, {"d": 4}]
    assert [str(e).split(":")[0] for e in errors] == ["invalid JSON", "invalid JSON"]
    assert not decoder.pending


def test_end_of_input_inside_a_request_is_reported() -> None:
    stream = io.BytesIO(json.dumps({"arguments": ["--", "true"]}).encode() + b'{"arguments": ["--"')
    results = list(read_json_requests(stream))
    assert isinstance(results[0], WorkItem) and results[0].arguments == ["--", "true"]
    assert isinstance(results[1], Malformed) and "ended inside a request" in str(results[1].error)


def test_a_request_split_over_many_reads_is_decoded_once() -> None:
    """1,978 inputs in 64 KiB reads: one decode attempt, not one per read (no quadratic re-parsing)."""
    digest = base64.b64encode(hashlib.sha256(b"x").hexdigest().encode()).decode()
    body = {"arguments": ["@f"], "inputs": [{"path": f"src/f{i}.swift", "digest": digest} for i in range(1978)]}
    data = json.dumps(body).encode()
    decoder = JsonRequestDecoder()
    attempts = 0
    real = decoder._json.raw_decode

    def counting(text: str, index: int = 0) -> tuple[object, int]:
        nonlocal attempts
        attempts += 1
        return real(text, index)

    decoder._json.raw_decode = counting  # type: ignore[method-assign]
    pieces = [p for i in range(0, len(data), 1 << 16) for p in decoder.feed(data[i : i + (1 << 16)])]
    assert pieces == [body] and attempts == 1 and len(data) > 3 << 16


def test_malformed_json_request_keeps_its_request_id() -> None:
    stream = io.BytesIO(b'{"requestId": 5, "arguments": [1]}{"requestId": "x"}')
    results = list(read_json_requests(stream))
    assert [(type(r).__name__, getattr(r, "request_id", None)) for r in results] == [("Malformed", 5), ("Malformed", 0)]


def test_sniffing_replays_the_peeked_bytes() -> None:
    wire, stream = sniff_protocol(io.BytesIO(b' {"arguments": []}'))
    assert wire == "json" and stream.read(-1) == b' {"arguments": []}'
    request = protos.WorkRequest(arguments=["--", "true"], request_id=7)
    request.inputs.add(path="a", digest=hashlib.sha256(b"a").hexdigest().encode())
    wire, stream = sniff_protocol(io.BytesIO(encode_delimited(request) * 2))
    assert wire == "proto"
    items = list(read_proto_requests(stream))
    assert [(i.request_id, i.inputs) for i in items if isinstance(i, WorkItem)] == [
        (7, [("a", hashlib.sha256(b"a").hexdigest())])
    ] * 2


def test_json_reply_omits_zero_request_id() -> None:
    assert json.loads(encode_reply(WorkReply(0, 1, "x"), "json")) == {"exitCode": 1, "output": "x"}
    cancelled = json.loads(encode_reply(WorkReply(4, 0, "", was_cancelled=True), "json"))
    assert cancelled == {"exitCode": 0, "output": "", "requestId": 4, "wasCancelled": True}


def test_a_request_too_big_for_memory_fails_alone_and_the_next_is_read() -> None:
    """A worker or service under an address-space limit given a request it cannot hold: MemoryError ended the
    session (the service's relay: every request in flight failed, said to be the service's end) or the worker."""
    from treemat import protos
    from treemat.framing import encode_delimited
    from treemat.protocol import Malformed, WorkItem, read_requests

    big = protos.WorkRequest(arguments=["--", "echo", "x" * (3 << 20)], request_id=5)
    data = encode_delimited(big) + encode_delimited(protos.WorkRequest(arguments=["--", "true"], request_id=6))

    class OutOfMemoryOnce(io.BytesIO):
        chunks = 0

        def read(self, size: int | None = -1, /) -> bytes:
            if size is not None and size > 1000:
                self.chunks += 1
                if self.chunks == 2:  # inside the big message, once
                    raise MemoryError
            return super().read(size)

    items = list(read_requests(OutOfMemoryOnce(data), "proto"))
    assert [type(item) for item in items] == [Malformed, WorkItem], items
    assert items[0].request_id == 5 and "does not fit in this process's memory" in str(items[0].error)
    assert items[1].request_id == 6


def test_an_undecodable_proto_request_is_answered_under_its_id_and_a_cancel_not_at_all() -> None:
    """A WorkRequest protobuf refuses to parse (a path that is not UTF-8) was answered with request id 0: a
    multiplex Bazel waits for its id forever. An undecodable cancel gets no reply, as a decodable one."""
    from treemat.framing import encode_delimited
    from treemat.protocol import Malformed, WorkItem, read_requests
    from treemat.relaywire import encode_varint

    def raw(body: bytes) -> bytes:
        return encode_varint(len(body)) + body

    bad_input = b"\x12\x05\x0a\x03a\xff\x00"  # inputs { path: "a\xff\x00" }: not UTF-8
    data = raw(bad_input + b"\x18\x07") + raw(bad_input + b"\x18\x08\x20\x01")  # id 7; a cancel of id 8
    data += encode_delimited(protos.WorkRequest(arguments=["--", "true"], request_id=9))
    items = list(read_requests(io.BytesIO(data), "proto"))
    assert [type(item) for item in items] == [Malformed, WorkItem], items
    assert items[0].request_id == 7 and "UTF-8" in str(items[0].error)
    assert items[1].request_id == 9
