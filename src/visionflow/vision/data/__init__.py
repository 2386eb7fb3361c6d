"""Datasets: generated shapes, ImageFolder trees; all served from prepare's WebDataset shards."""

from visionflow.vision.data import (
    cifar,  # noqa: F401  (registers cifar10, cifar100)
    coco,  # noqa: F401  (registers coco)
    datamodules,  # noqa: F401  (registers datamodules)
)
