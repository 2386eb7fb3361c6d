"""Files in S3 carry their SHA-256 (x-amz-meta-sha256) and a corrupt download is refused."""

import io

import pytest

from tests.integration.conftest import BUCKET, S3_ENV
from visionflow.storage import ChecksumError, open_store

pytestmark = pytest.mark.slow


def test_a_file_corrupted_in_s3_is_refused_and_copies_keep_the_checksum(
    tmp_path, s3_server, monkeypatch
):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    store = open_store(f"s3://{BUCKET}/checksums", s3_server.endpoint)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(bytes(range(256)) * 100)
    store.put_file(ckpt, "checkpoints/r1/last.ckpt")
    store.copy("checkpoints/r1/last.ckpt", "checkpoints/r1/last-prev.ckpt")
    assert store.get_file("checkpoints/r1/last.ckpt", tmp_path / "a").read_bytes() == (
        ckpt.read_bytes()
    )

    # The bytes change in the store while the recorded checksum stays: bit rot, a bad disk.
    client, key = s3_server.client(), "checksums/checkpoints/r1/last-prev.ckpt"
    metadata = {"sha256": client.stat_object(BUCKET, key).metadata["x-amz-meta-sha256"]}
    broken = ckpt.read_bytes()[:-1] + b"\x00"
    client.put_object(BUCKET, key, io.BytesIO(broken), len(broken), metadata=metadata)
    with pytest.raises(ChecksumError, match=f"{store.uri('checkpoints/r1/last-prev.ckpt')} is"):
        store.get_file("checkpoints/r1/last-prev.ckpt", tmp_path / "b")
    assert not (tmp_path / "b").exists()
