"""manifest.py: lazily decoded input lists, and deltas between two of them that cost O(changed)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treemat import manifest, protos
from treemat.errors import ProtocolError
from treemat.manifest import InputDelta, InputManifest, RequestInput


def _hex(seed: object) -> str:
    return hashlib.sha256(repr(seed).encode()).hexdigest()


def _payload(entries: list[RequestInput], *, digest_bytes: bool = False, **fields: Any) -> bytes:
    request = protos.WorkRequest(arguments=["@bazel-out/k8/bin/x.params"], request_id=fields.pop("request_id", 3))
    for path, hash_hex in entries:
        digest = b"" if hash_hex is None else bytes.fromhex(hash_hex) if digest_bytes else hash_hex.encode()
        request.inputs.add(path=path, digest=digest)
    for name, value in fields.items():
        setattr(request, name, value)
    return bytes(request.SerializeToString())


def _from_wire(payload: bytes) -> InputManifest:
    message = protos.WorkRequest()
    message.ParseFromString(payload)
    return InputManifest.from_proto(message, payload)


def _apply(old: list[RequestInput], delta: InputDelta) -> set[RequestInput]:
    left = set(old) - set(delta.earlier)
    return left | set(delta.later)


def _tree(size: int) -> list[RequestInput]:
    paths = (f"bazel-out/k8/bin/mod{i % 37}/sub{i % 6}/f{i}.swiftmodule" for i in range(size))
    return sorted(RequestInput(path, _hex(path)) for path in paths)


# --------------------------------------------------------------------------------------- decoding


def test_decodes_hex_and_raw_digests_and_empty_ones() -> None:
    entries = [RequestInput("a", _hex(1)), RequestInput("b", None), RequestInput("c", _hex(2).upper())]
    decoded = _from_wire(_payload(entries)).entries()
    assert decoded == [RequestInput("a", _hex(1)), RequestInput("b", None), RequestInput("c", _hex(2))]
    raw = _from_wire(_payload([RequestInput("a", _hex(1))], digest_bytes=True))
    assert list(raw) == [RequestInput("a", _hex(1))] and len(raw) == 1


@pytest.mark.parametrize("digest", [b"short", b"g" * 64, b"a" * 64 + b"\n"])
def test_an_undecodable_digest_is_a_protocol_error_naming_the_input(digest: bytes) -> None:
    request = protos.WorkRequest(arguments=["x"])
    request.inputs.add(path="src/a.swift", digest=digest)
    payload = request.SerializeToString()
    with pytest.raises(ProtocolError, match=re.escape("src/a.swift")):
        _from_wire(payload).entries()


# --------------------------------------------------------------------------------------- deltas


def test_one_changed_input_decodes_one_record_on_each_side(monkeypatch: pytest.MonkeyPatch) -> None:
    old = _tree(5000)
    new = list(old)
    new[2500] = RequestInput(new[2500].path, _hex("edited"))
    earlier, later = _from_wire(_payload(old)), _from_wire(_payload(new))
    decoded: list[int] = []
    real = manifest._decode_record
    monkeypatch.setattr(manifest, "_decode_record", lambda *args: decoded.append(1) or real(*args))
    monkeypatch.setattr(manifest, "_decode_all", lambda message: pytest.fail("decoded the whole list"))
    delta = later.delta(earlier)
    assert delta == InputDelta([old[2500]], [new[2500]])
    assert len(decoded) == 2
    unchanged = _from_wire(_payload(new))
    assert unchanged.delta(later) == InputDelta([], [])  # and a third request, chained through the new index
    again = list(new)
    again[10] = RequestInput(again[10].path, _hex("again"))
    assert _from_wire(_payload(again)).delta(unchanged) == InputDelta([new[10]], [again[10]])


edits = st.lists(
    st.tuples(st.sampled_from(["change", "insert", "delete", "rename"]), st.integers(0, 10_000), st.integers()),
    max_size=4,
)


def _edit(entries: list[RequestInput], steps: list[tuple[str, int, int]]) -> list[RequestInput]:
    out = list(entries)
    for kind, where, salt in steps:
        if kind == "insert" or not out:
            out.append(RequestInput(f"new/{where}/{salt}", _hex(salt)))
            out.sort()
            continue
        at = where % len(out)
        if kind == "change":
            out[at] = RequestInput(out[at].path, _hex((out[at].hash, salt)))
        elif kind == "delete":
            del out[at]
        else:
            out[at] = RequestInput(f"{out[at].path}.{salt}", out[at].hash)
            out.sort()
    return list(dict.fromkeys(out))


@settings(max_examples=150, deadline=None)
@given(size=st.integers(0, 300), rounds=st.lists(edits, min_size=1, max_size=4), build_index=st.booleans())
def test_chained_deltas_equal_the_set_difference(
    size: int, rounds: list[list[tuple[str, int, int]]], build_index: bool
) -> None:
    """Any chain of edits: each delta, applied to the previous list, gives the next (wire and list manifests)."""
    entries = _tree(size)
    wire, listed = _from_wire(_payload(entries)), InputManifest.of(entries)
    if build_index:
        assert wire._build_index()
    for steps in rounds:
        following = _edit(entries, steps)
        next_wire, next_listed = _from_wire(_payload(following)), InputManifest.of(following)
        for delta in (next_wire.delta(wire), next_listed.delta(listed)):
            assert _apply(entries, delta) == set(following)
            assert len(delta.earlier) + len(delta.later) <= len(entries) + len(following)
        assert next_wire._index is not None  # a real span delta, not the list fallback
        assert next_wire._index == _full_index(next_wire)
        entries, wire, listed = following, next_wire, next_listed


def _full_index(manifest_: InputManifest) -> list[tuple[int, int]]:
    """Every indexed boundary must be a real record boundary with its record number."""
    span = manifest_._span
    assert span is not None
    boundaries, at, number = {0: 0}, 0, 0
    while at < len(span):
        at, number = manifest._record_end(span, at)[1], number + 1
        boundaries[at] = number
    index = manifest_._index or []
    assert all(boundaries.get(offset) == record for offset, record in index)
    return index


def test_another_field_order_falls_back_to_comparing_decoded_lists() -> None:
    old, new = _tree(50), _tree(50)
    new[7] = RequestInput(new[7].path, _hex("x"))
    # request_id written before the inputs: the inputs are not one contiguous run of records
    message = protos.WorkRequest(request_id=9)
    tail = protos.WorkRequest(arguments=["a"])
    for path, digest in new:
        tail.inputs.add(path=path, digest=(digest or "").encode())
    payload = message.SerializeToString() + tail.SerializeToString()
    later = _from_wire(payload)
    assert later._span is None
    assert later.delta(_from_wire(_payload(old))) == InputDelta([old[7]], [new[7]])


def test_a_bad_digest_inside_the_changed_run_is_reported() -> None:
    old = _tree(100)
    request = protos.WorkRequest(arguments=["@bazel-out/k8/bin/x.params"], request_id=3)
    for index, (path, digest) in enumerate(old):
        request.inputs.add(path=path, digest=b"bad" if index == 40 else (digest or "").encode())
    later = _from_wire(request.SerializeToString())
    with pytest.raises(ProtocolError, match=re.escape(old[40].path)):
        later.delta(_from_wire(_payload(old)))


def test_json_and_list_manifests_compare_equal_to_lists() -> None:
    entries = _tree(3)
    assert InputManifest.of(entries) == [tuple(entry) for entry in entries]
    assert InputManifest.of(entries) == _from_wire(_payload(entries))
    assert InputManifest.of(entries)[1] == entries[1] and InputManifest.of(entries)[:2] == entries[:2]
