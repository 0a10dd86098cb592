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


def test_file_uri_is_the_local_path(tmp_path):
    storage.write_bytes_atomic(f"file://{tmp_path}/a/b.bin", b"x")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"x"
    assert storage.scheme(f"file://{tmp_path}") == "file" and storage.scheme(tmp_path) == ""
    with pytest.raises(ValueError, match="unsupported scheme 'hdfs'"):
        storage.exists("hdfs://namenode/x")


def test_list_files_recursive_sorted_without_hidden(tmp_path):
    for rel in ("b/2.png", "a/1.png", "a/.ipynb_checkpoints/1.png", ".cache/x", "top.txt"):
        storage.write_bytes_atomic(tmp_path / rel, b"x")
    assert storage.list_files(tmp_path) == [str(tmp_path / r) for r in ("a/1.png", "b/2.png", "top.txt")]
    assert storage.list_files(tmp_path / "absent") == []


def test_object_store_round_trip(s3_server):
    """The same calls on a real S3-compatible server on loopback as on a local disk."""
    root = s3_server("mimflow-storage") + "/run"
    assert not storage.exists(root + "/x.bin")
    with pytest.raises(FileNotFoundError, match="s3://mimflow-storage/run/x.bin"):
        storage.read_bytes(root + "/x.bin")
    storage.write_bytes_atomic(root + "/x.bin", b"0123456789")
    storage.write_bytes_atomic(root + "/sub/y.bin", b"y")
    assert storage.read_bytes(root + "/x.bin") == b"0123456789" and storage.size(root + "/x.bin") == 10
    with storage.open_input(root + "/x.bin") as f:
        assert f.read(4) == b"0123" and f.read() == b"456789"
    assert storage.is_dir(root) and storage.list_names(root) == ["sub", "x.bin"]
    assert storage.list_files(root) == [root + "/sub/y.bin", root + "/x.bin"]
    with pytest.raises(RuntimeError):  # a failed write leaves no object behind
        with storage.atomic_output(root + "/z.bin") as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    assert not storage.exists(root + "/z.bin")
    storage.remove(root + "/x.bin")
    assert storage.list_files(root) == [root + "/sub/y.bin"]


def test_bytes_are_the_bytes_whatever_the_extension(tmp_path):
    """pyarrow guesses compression from a file's extension unless told not to: storage never does."""
    import gzip

    packed = gzip.compress(b"payload")
    storage.write_bytes_atomic(tmp_path / "x.gz", packed)
    assert (tmp_path / "x.gz").read_bytes() == packed
    assert storage.read_bytes(tmp_path / "x.gz") == packed
    with storage.open_input(tmp_path / "x.gz") as f:
        assert f.read() == packed
