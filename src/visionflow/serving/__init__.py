"""Serving from the registry: registered versions are MLflow pyfunc models over ONNX Runtime."""
