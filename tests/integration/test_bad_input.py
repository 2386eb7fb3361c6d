"""What a user can get wrong ends with a clear message, a non-zero exit, and nothing half-written.
(Too many unusable images: tests/features/workflows.feature.)"""

import io
import random

import pytest
from PIL import Image

from tests.conftest import tiny_overrides
from tests.integration.conftest import S3_ENV, visionflow


def _tree(root, per_class=10, bad=()):
    rng = random.Random(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            Image.new("RGB", (20, 20), colour).save(root / c / f"{i}.jpg", quality=90)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    for name in bad:
        if name == "corrupt":
            (root / "cat" / "corrupt.jpg").write_bytes(b"this is not an image at all")
        elif name == "truncated":
            (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        elif name == "stray":
            (root / "stray.png").write_bytes(buf.getvalue())  # not inside a class folder


def test_bad_images_are_skipped_and_reported(tmp_path):
    from visionflow.core.config import load_config
    from visionflow.steps.prepare import prepare

    _tree(tmp_path / "images", bad=("corrupt", "truncated", "stray"))
    cfg = load_config([f"workdir={tmp_path}", "data=imagefolder", f"data.root={tmp_path / 'images'}",
                       "data.max_bad_fraction=0.2", "data.val_fraction=0.2", "data.test_fraction=0.2"])  # fmt: skip
    m = prepare(cfg).manifest
    reasons = {b["source"].rsplit("/", 1)[-1]: b["reason"] for b in m["bad_files"]}
    assert set(reasons) == {"corrupt.jpg", "truncated.jpg", "stray.png"}
    assert (
        "not a decodable image" in reasons["corrupt.jpg"]
        and "not a decodable image" in reasons["truncated.jpg"]
    )
    assert "no class" in reasons["stray.png"]
    assert sum(m["splits"][s]["count"] for s in m["splits"]) == 20


@pytest.mark.slow  # a `visionflow` process: its imports take seconds
def test_unknown_model_fails_before_any_work(tmp_path):
    proc = visionflow("pipeline", "run", *tiny_overrides(tmp_path), "model.name=nope")
    assert proc.returncode == 2
    assert "unknown model 'nope'; available:" in proc.stderr and "resnet18" in proc.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "kfp").exists()


@pytest.mark.slow  # a `visionflow` process: its imports take seconds
def test_bad_override_names_the_key(tmp_path):
    proc = visionflow("prepare", *tiny_overrides(tmp_path), "trainer.max_epochs=many")
    assert proc.returncode == 2
    assert "trainer.max_epochs" in proc.stderr and "many" in proc.stderr
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_missing_bucket_is_named(tmp_path, s3_server):
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}
    proc = visionflow(
        "prepare",
        *tiny_overrides(tmp_path),
        "storage=minio",
        "storage.root=s3://no-such-bucket/x",
        env=env,
    )
    assert proc.returncode == 1
    assert f"bucket 'no-such-bucket' does not exist at {s3_server.endpoint}" in proc.stderr
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in proc.stderr + proc.stdout


@pytest.mark.slow  # a `visionflow` process: its imports take seconds
def test_unreachable_s3_endpoint_fails_fast(tmp_path):
    env = {**S3_ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    proc = visionflow("prepare", *tiny_overrides(tmp_path), "storage=minio", env=env, timeout=120)
    assert proc.returncode == 1
    assert "cannot reach S3 endpoint http://127.0.0.1:9" in proc.stderr


@pytest.mark.slow
def test_unreachable_tracking_server_fails_train_before_any_checkpoint(tmp_path):
    args = [*tiny_overrides(tmp_path), "run_id=unreachable"]
    assert visionflow("prepare", *args).returncode == 0
    proc = visionflow("train", *args, "tracking.uri=http://127.0.0.1:9", timeout=120)
    assert proc.returncode == 1
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in proc.stderr
    assert not (tmp_path / "artifacts" / "checkpoints").exists()
