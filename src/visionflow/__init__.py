"""visionflow: vision models from raw images to a registered model, as Kubeflow pipelines."""

__version__ = "0.1.0"
