"""The relay's hand framing reads and writes request ids exactly as protobuf does (relaywire.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from treemat import protos
from treemat.protocol import parse_message
from treemat.relaywire import as_int32, encode_varint, failure_frame, payload_of, scan_fields, skim

UINT64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


def request_with(raw_id: int, raw_cancel: int) -> bytes:
    """A WorkRequest whose request_id and cancel are the varints given, as any sender may write them (Bazel
    never sends an id past 2^31 or a cancel other than 1, a hostile or buggy client may)."""
    return b"\x0a\x05touch" + b"\x18" + encode_varint(raw_id) + b"\x20" + encode_varint(raw_cancel)


@given(UINT64, UINT64)
def test_the_relay_reads_a_request_id_and_cancel_as_protobuf_does(raw_id: int, raw_cancel: int) -> None:
    payload = request_with(raw_id, raw_cancel)
    expected = parse_message(payload, protos.WorkRequest)
    fields = scan_fields(payload, (3, 4))
    assert (as_int32(fields[3]), bool(fields[4])) == (expected.request_id, expected.cancel)


@given(st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1))
def test_a_failure_answer_carries_the_id_protobuf_would(request_id: int) -> None:
    frame = failure_frame(request_id, "treemat: error: gone\n")
    reply = parse_message(payload_of(frame), protos.WorkResponse)
    assert (reply.request_id, reply.exit_code, reply.output) == (request_id, 1, "treemat: error: gone\n")
    assert as_int32(scan_fields(payload_of(frame), (3,)).get(3, 0)) == request_id


@given(
    st.lists(st.tuples(st.text(min_size=0, max_size=300), st.binary(max_size=20_000)), max_size=6),
    st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1),
    st.booleans(),
    st.lists(st.text(max_size=200), max_size=3),
)
def test_the_relay_skips_inputs_of_any_size_to_the_id_protobuf_reads(
    inputs: list[tuple[str, bytes]], request_id: int, cancel: bool, arguments: list[str]
) -> None:
    """Inputs are skipped without decoding them (a 10,000-input request: 3.0 -> 1.2 ms), whatever their size: one-,
    two- and three-byte lengths."""
    message = protos.WorkRequest(arguments=arguments, request_id=request_id, cancel=cancel)
    for path, digest in inputs:
        message.inputs.add(path=path, digest=digest)
    payload = message.SerializeToString()
    fields = scan_fields(payload, (3, 4))
    assert (as_int32(fields.get(3, 0)), bool(fields.get(4, 0))) == (request_id, cancel)


def group(field: int, body: bytes) -> bytes:
    """A group (wire types 3 and 4): protobuf reads one on a field it does not know as that field, to its end."""
    return encode_varint(field << 3 | 3) + body + encode_varint(field << 3 | 4)


@given(
    st.sampled_from([1, 2, 3, 4, 5, 6, 7, 2047, (1 << 29) - 1]),
    st.lists(st.sampled_from([b"\x18\x09", b"\x20\x01", b"\x0a\x01x", b"\x1d\x00\x00\x00\x00"]), max_size=4),
    st.booleans(),
    UINT64,
    UINT64,
)
def test_the_relay_reads_the_id_and_cancel_around_a_group_as_protobuf_does(
    field: int, inside: list[bytes], nested: bool, raw_id: int, raw_cancel: int
) -> None:
    """A request whose id follows a group was read as id 0 (the scan stopped at the group) while the service,
    which parses it, answered it under its id: the relay counted an answer to an id it never registered, and the
    next request of that id went unanswered when the service died (another id's failure written instead)."""
    body = b"".join(inside)
    if nested:
        body = group(9, body) + body
    payload = b"\x18" + encode_varint(raw_id ^ 1) + group(field, body) + request_with(raw_id, raw_cancel)
    expected = parse_message(payload, protos.WorkRequest)
    for fields in (scan_fields(payload, (3, 4)), skim([payload[:3], payload[3:]], lambda _n: b"", 0)):
        assert (as_int32(fields.get(3, 0)), bool(fields.get(4, 0))) == (expected.request_id, expected.cancel)
