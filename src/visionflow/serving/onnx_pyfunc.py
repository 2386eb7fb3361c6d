"""The MLflow pyfunc model that every registered version carries ("models from code").

`mlflow.pyfunc.load_model("models:/<name>@champion")` returns it; `predict` takes float32 images
(N, 3, H, W) in [0, 1] and returns logits. The model config chooses the file it runs:
`variant: int8` (default) or `fp32`; the TorchScript file rides along for PyTorch servers.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class OnnxClassifier(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime as ort

        config = context.model_config or {}
        variant = config.get("variant", "int8")
        key = {"int8": "onnx_int8", "fp32": "onnx"}.get(variant)
        if key is None:
            raise ValueError(f"unknown variant {variant!r}; use 'int8' or 'fp32'")
        self.classes = list(config.get("classes", []))
        self.session = ort.InferenceSession(
            context.artifacts[key], providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, context, model_input, params=None) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.float32)
        return self.session.run(None, {self.input_name: images})[0]


mlflow.models.set_model(OnnxClassifier())
