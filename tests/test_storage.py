from __future__ import annotations

import os

import pytest

from pipeline import storage


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_output(target) as f:
            f.write(b"partial")
            raise RuntimeError("disk full")
    assert not target.exists()
    assert os.listdir(tmp_path / "sub") == []  # no temporary file left behind either
    storage.write_bytes_atomic(target, b"complete")
    assert storage.read_bytes(target) == b"complete"
    assert storage.list_names(tmp_path / "sub") == ["file.bin"]
    assert storage.size(target) == 8


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(tmp_path / "nope.bin")
    assert storage.list_names(tmp_path / "absent") == []


def test_uri_join():
    assert storage.join("s3://bucket/tokens/", "abc", "shard-000000.tar") == "s3://bucket/tokens/abc/shard-000000.tar"
    assert storage.is_uri("gs://b/x") and not storage.is_uri("/tmp/x")
