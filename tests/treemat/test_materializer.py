"""Tests for treemat.materializer: any tree in == the same tree out, for every backend that works here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from treemat.backends import BackendProbe, Method
from treemat.cas import ContentStore
from treemat.counters import Counters
from treemat.digest import digest_bytes
from treemat.errors import MaterializeError, MissingBlobError
from treemat.layout import Root
from treemat.materializer import Materializer
from treemat.tree import FileNode, InputTree

from .treegen import Spec, build_tree, expected_view, read_back, tree_specs

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _roundtrip(base: Path, spec: Spec, prefer: list[Method], concurrency: int) -> tuple[Spec, dict[str, int]]:
    if base.exists():
        shutil.rmtree(base)
    cas = ContentStore(Root(base / "root"), counters=Counters())
    tree = build_tree(spec, cas)
    materializer = Materializer(
        cas, BackendProbe(prefer=prefer), concurrency=concurrency, batch_size=3, counters=cas.counters
    )
    dest = base / "out"
    report = materializer.build(tree.root, dest)
    assert report.files == sum(1 for kind, _ in spec.values() if kind == "file")
    return read_back(dest), report.methods


@pytest.mark.parametrize("method", [Method.HARDLINK, Method.COPY])
@SETTINGS
@given(spec=tree_specs())
def test_any_tree_in_is_the_same_tree_out(tmp_path: Path, method: Method, spec: Spec) -> None:
    out, methods = _roundtrip(tmp_path / "t", spec, [method], concurrency=4)
    assert out == expected_view(spec)
    assert set(methods) <= {method.value, "zero_byte"}


@SETTINGS
@given(spec=tree_specs())
def test_reflink_round_trip_on_xfs(xfs_dir: Path, spec: Spec) -> None:
    out, methods = _roundtrip(xfs_dir / "prop", spec, [Method.REFLINK], concurrency=2)
    assert out == expected_view(spec)
    assert set(methods) <= {"reflink", "zero_byte"}


def test_inputs_read_only_outputs_creatable(tmp_path: Path) -> None:
    cas = ContentStore(Root(tmp_path / "root"), counters=Counters())
    tree = InputTree()
    tree.add_file("src/a.swift", FileNode(cas.ingest_bytes(b"let a = 1\n", executable=False)))
    tree.add_file("bin/tool", FileNode(cas.ingest_bytes(b"#!/bin/sh\n", executable=True), executable=True))
    tree.add_file("src/empty", FileNode(digest_bytes(b"")))
    counters = Counters()
    report = Materializer(cas, BackendProbe(), counters=counters).build(tree.root, tmp_path / "exec")
    exec_dir = tmp_path / "exec"
    assert os.stat(exec_dir / "src/a.swift").st_mode & 0o777 == 0o440
    assert os.stat(exec_dir / "bin/tool").st_mode & 0o777 == 0o550
    assert os.stat(exec_dir / "src/empty").st_mode & 0o777 == 0o440
    assert (exec_dir / "src/empty").read_bytes() == b""
    (exec_dir / "src" / "a.o").write_bytes(b"an output nested in an input directory")
    assert report.methods["zero_byte"] == 1 and counters.get("zero_byte") == 1
    assert counters.get("hardlink") == 2 and len(report.hardlinked) == 2
    if os.geteuid() != 0:  # root bypasses permission bits
        with pytest.raises(PermissionError):
            (exec_dir / "src/a.swift").write_bytes(b"overwrite")


def test_missing_blob_fails_cleanly(tmp_path: Path) -> None:
    cas = ContentStore(Root(tmp_path / "root"), counters=Counters())
    tree = InputTree()
    tree.add_file("present", FileNode(cas.ingest_bytes(b"here", executable=False)))
    tree.add_file("absent", FileNode(digest_bytes(b"never ingested")))
    with pytest.raises(MissingBlobError, match="absent"):
        Materializer(cas, BackendProbe(), concurrency=1, counters=cas.counters).build(tree.root, tmp_path / "exec")
    assert not (tmp_path / "exec").exists(), "a failed build leaves nothing behind"


def test_missing_blob_is_ingested_from_source(tmp_path: Path) -> None:
    cas = ContentStore(Root(tmp_path / "root"), counters=Counters())
    source = tmp_path / "src.txt"
    source.write_bytes(b"from source")
    tree = InputTree()
    tree.add_file("x/src.txt", FileNode(digest_bytes(b"from source"), source=source))
    Materializer(cas, BackendProbe(), counters=cas.counters).build(tree.root, tmp_path / "exec")
    assert (tmp_path / "exec/x/src.txt").read_bytes() == b"from source"
    assert cas.lookup(digest_bytes(b"from source").hash, False) is not None


def test_destination_must_not_exist(tmp_path: Path) -> None:
    (tmp_path / "exec").mkdir()
    with pytest.raises(MaterializeError, match="already exists"):
        Materializer(
            ContentStore(Root(tmp_path / "root"), counters=Counters()), BackendProbe(), counters=Counters()
        ).build(InputTree().root, tmp_path / "exec")


def test_cross_filesystem_falls_back_to_copy_visibly(tmp_path: Path, tiny_tmpfs: Path) -> None:
    cas = ContentStore(Root(tmp_path / "root"), counters=Counters())
    tree = InputTree()
    for i in range(10):
        tree.add_file(f"f{i}", FileNode(cas.ingest_bytes(f"blob {i}".encode(), executable=False)))
    counters = Counters()
    report = Materializer(cas, BackendProbe(), counters=counters).build(tree.root, tiny_tmpfs / "exec")
    assert report.methods == {"copy": 10}
    assert counters.get("copy") == 10 and counters.get("hardlink") == 0


def test_disk_full_during_materialization(tmp_path: Path, tiny_tmpfs: Path) -> None:
    cas = ContentStore(Root(tmp_path / "root"), counters=Counters())
    tree = InputTree()
    for i in range(4):
        tree.add_file(f"big{i}", FileNode(cas.ingest_bytes(os.urandom(400_000) + bytes([i]), executable=False)))
    with pytest.raises(MaterializeError, match="disk full"):
        Materializer(cas, BackendProbe(), concurrency=1, counters=cas.counters).build(tree.root, tiny_tmpfs / "exec")
    assert not (tiny_tmpfs / "exec").exists()
    assert cas.verify_all().corrupt == 0
