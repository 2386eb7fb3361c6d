"""Datasets: generated shapes, ImageFolder trees; all served from prepare's WebDataset shards."""

from visionflow.vision.data import datamodules  # noqa: F401  (registers datamodules)
