import pytest

from visionflow.storage import LocalStore, StorageError, open_store, split_uri


def test_local_store_round_trip_and_listing(tmp_path):
    store = open_store(str(tmp_path / "store"))
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 10)
    uri = store.put_file(src, "a/b/f.bin")
    store.put_bytes(b"hello", "a/c.txt")
    assert uri == str(tmp_path / "store" / "a" / "b" / "f.bin")
    assert store.list("a") == ["a/b/f.bin", "a/c.txt"]
    assert store.get_bytes("a/c.txt") == b"hello"
    assert store.get_file("a/b/f.bin", tmp_path / "out.bin").read_bytes() == b"x" * 10
    store.delete("a/c.txt")
    assert not store.exists("a/c.txt")
    with pytest.raises(StorageError, match="not in the artifact store"):
        store.get_bytes("a/c.txt")


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    store = LocalStore(tmp_path)

    class Boom(Exception):
        pass

    class Exploding:
        def read(self, *_):
            raise Boom

    from visionflow.storage import _atomic_write

    with pytest.raises(Boom):
        _atomic_write(tmp_path / "k", lambda dst: dst.write(Exploding().read()))
    assert list(tmp_path.iterdir()) == []
    assert store.list() == []


def test_split_uri_and_unsupported_schemes(tmp_path):
    (tmp_path / "x.txt").write_text("1")
    store, key = split_uri(str(tmp_path / "x.txt"))
    assert store.get_bytes(key) == b"1"
    with pytest.raises(StorageError, match="unsupported artifact store 'gs://b'"):
        open_store("gs://b")


def test_s3_needs_an_endpoint_and_credentials(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with pytest.raises(StorageError, match="needs an S3 endpoint"):
        open_store("s3://bucket")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(StorageError, match="needs credentials: set AWS_ACCESS_KEY_ID"):
        open_store("s3://bucket", "http://127.0.0.1:9")
