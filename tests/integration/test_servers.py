"""The pipeline against a real S3-protocol server (moto, standing in for MinIO) and a real
MLflow tracking server, both on 127.0.0.1: everything it promises is really stored there."""

import json

import pytest
import torch

from tests.integration.conftest import BUCKET, S3_ENV, visionflow

pytestmark = pytest.mark.slow


def test_imagefolder_from_s3_prefix(tmp_path, s3_server):
    from tests.integration.conftest import BUCKET
    from tests.unit.test_imagefolder import make_tree

    make_tree(tmp_path / "tree", per_class=8)
    client = s3_server.client()
    for path in sorted((tmp_path / "tree").rglob("*.jpg")):
        client.fput_object(BUCKET, f"raw/pets/{path.relative_to(tmp_path / 'tree')}", str(path))
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}
    proc = visionflow(
        "prepare",
        f"workdir={tmp_path}",
        "data=imagefolder",
        f"data.root=s3://{BUCKET}/raw/pets",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["uri"].startswith(
        str(tmp_path)
    )  # the dataset goes to the configured (local) store
    manifest = json.loads(
        (tmp_path / "artifacts" / "datasets" / result["dataset_id"] / "manifest.json").read_text()
    )
    assert (
        manifest["classes"] == ["cat", "dog", "eel"]
        and manifest["source"] == f"s3://{BUCKET}/raw/pets"
    )
    assert (
        sum(manifest["splits"][s]["count"] for s in manifest["splits"]) == 24
        and not manifest["bad_files"]
    )


def test_coco_from_s3_serves_boxes_and_masks_to_both_tasks(tmp_path, s3_server, monkeypatch):
    """COCO images and instances JSON in S3 → prepare → the datamodule's detection targets and
    segmentation masks, checked against what the fixture drew."""
    from tests.unit.test_cifar_coco import make_coco
    from visionflow.compose.data import build_datamodule
    from visionflow.core.config import load_config
    from visionflow.steps.prepare import prepare
    from visionflow.storage import open_store

    images, annotations = make_coco(tmp_path / "coco", n_extra=6)
    client = s3_server.client()
    for path in sorted(images.iterdir()):
        client.fput_object(BUCKET, f"raw/coco/images/{path.name}", str(path))
    client.fput_object(BUCKET, "raw/coco/instances.json", str(annotations))
    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}.items():
        monkeypatch.setenv(key, value)
    common = [f"workdir={tmp_path}", "data=coco", f"data.root=s3://{BUCKET}/raw/coco/images",
              f"data.annotations=s3://{BUCKET}/raw/coco/instances.json", "data.image_size=40",
              "data.val_fraction=0.25", "data.test_fraction=0.25", "transforms=none",
              "transforms.train=[]", "transforms.eval=[]", "run_id=coco"]  # fmt: skip
    cfg = load_config([*common, "model=fasterrcnn_mobilenet_v3"])
    dataset_id = prepare(cfg).dataset_id
    store = open_store(cfg.storage.root)

    detection = build_datamodule(cfg, store, dataset_id, "detection")
    segmentation = build_datamodule(cfg, store, dataset_id, "segmentation")
    seen, dog_images = 0, 0
    for split in ("train", "val", "test"):
        boxes, masks = detection.dataset(split), segmentation.dataset(split)
        for i in range(len(boxes)):
            image, target = boxes[i]
            _, mask = masks[i]
            seen += 1
            assert mask.shape == image.shape[-2:] and mask.dtype == torch.int64
            for (x0, y0, x1, y1), label in zip(
                target["boxes"].tolist(), target["labels"].tolist(), strict=True
            ):
                box = mask[int(y0) : int(y1 + 0.999), int(x0) : int(x1 + 0.999)]
                assert (box == label).any()  # detection labels = mask classes (0: background)
            if 3 in target["labels"].tolist() and 2 in target["labels"].tolist():
                dog_images += 1  # the dog with a car painted on it, a crowd beside them
                assert {0, 2, 3, 255} <= set(mask.unique().tolist())
    assert seen == 8 and dog_images == 1
