"""Cluster mode: PyTorchJob and Kubeflow Pipelines."""
