"""visionflow: vision models from raw images to a registered model, as Kubeflow pipelines."""

__version__ = "0.1.0"

# The component images. Their tag is the package version, so a compiled pipeline runs the code
# it was compiled from.
IMAGE_REGISTRY = "ghcr.io/visionflow"
CPU_IMAGE = f"{IMAGE_REGISTRY}/visionflow:{__version__}"  # prepare, evaluate, export, ... serving
TRAIN_IMAGE = f"{IMAGE_REGISTRY}/visionflow-train:{__version__}"  # CUDA: train, PyTorchJob pods
