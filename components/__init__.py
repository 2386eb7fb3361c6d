"""KFP components, one per step. Each body imports visionflow and calls one step function.

The image tag is tied to the package version: a compiled pipeline runs the code it came from.
"""

from visionflow import __version__

REGISTRY = "ghcr.io/visionflow"
IMAGE = f"{REGISTRY}/visionflow:{__version__}"  # CPU image: prepare, evaluate, export, ...
TRAIN_IMAGE = f"{REGISTRY}/visionflow-train:{__version__}"  # CUDA image: train
