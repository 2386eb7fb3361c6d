"""The MLflow pyfunc model that every registered version carries ("models from code").

`mlflow.pyfunc.load_model("models:/<name>@champion")` returns it; `predict` takes float32 images
(N, 3, H, W) in [0, 1]. Classification returns logits (N, classes); segmentation logits
(N, classes + 1, H, W) with class 0 the background; detection one
`{"boxes", "labels", "scores"}` dict per image (labels from 1; 0 is the background). The model
config chooses the file it runs: `variant: int8` (where the version has one) or `fp32`. Register
sets the default to the variant that quantize found faster on its host; the TorchScript file
rides along for PyTorch servers. Each file runs with the ONNX Runtime settings quantize measured
it with: register ships `visionflow/sessions.py` in the model's code (`code_paths`), imported
here as `sessions`, so loading the model needs ONNX Runtime and numpy, not visionflow or torch.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

try:  # loading: sessions.py is in the model's code, which MLflow puts on sys.path
    from sessions import ort_session
except ModuleNotFoundError:  # logging: MLflow imports this file before the model has code
    from visionflow.sessions import ort_session


class OnnxModel(PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config or {}
        variant = config.get("variant") or ("int8" if "onnx_int8" in context.artifacts else "fp32")
        key = {"int8": "onnx_int8", "fp32": "onnx"}.get(variant)
        if key is None:
            raise ValueError(f"unknown variant {variant!r}; use 'int8' or 'fp32'")
        if key not in context.artifacts:
            raise ValueError(f"this model has no {variant} file; use variant 'fp32'")
        self.task = config.get("task", "classification")
        self.classes = list(config.get("classes", []))
        self.session = ort_session(context.artifacts[key])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, context, model_input, params=None):
        images = np.asarray(model_input, dtype=np.float32)
        if self.task != "detection":
            return self.session.run(None, {self.input_name: images})[0]
        out = []
        for image in images:  # the detection graph takes one image at a time
            boxes, labels, scores = self.session.run(None, {self.input_name: image})
            out.append({"boxes": boxes, "labels": labels, "scores": scores})
        return out


mlflow.models.set_model(OnnxModel())
