"""The training pipeline: configure → prepare → train → evaluate → export → quantize → register.

Every knob a person may change when rerunning from the Kubeflow UI is a pipeline parameter;
anything else goes through `overrides` (Hydra `key=value` strings).
"""

from kfp import dsl

from components.configure import configure
from components.evaluate import evaluate
from components.export import export
from components.prepare import prepare
from components.quantize import quantize
from components.register import register
from components.train import train


@dsl.pipeline(
    name="visionflow-training",
    description="Raw images to a registered, exported, int8-quantized vision model.",
)
def training_pipeline(
    data: str = "",
    data_root: str = "",
    data_test_root: str = "",
    model: str = "",
    max_epochs: int = 0,
    batch_size: int = 0,
    learning_rate: float = 0.0,
    min_accuracy: float = -1.0,
    max_int8_drop: float = -1.0,
    registered_model_name: str = "",
    overrides: list = [],  # noqa: B006  (KFP reads the default as the parameter's default)
    run_id: str = "",
) -> str:
    cfg = configure(
        data=data, data_root=data_root, data_test_root=data_test_root, model=model,
        max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
        min_accuracy=min_accuracy, max_int8_drop=max_int8_drop,
        registered_model_name=registered_model_name, overrides=overrides, run_id=run_id,
        pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )  # fmt: skip
    common = {"overrides": cfg.outputs["overrides"], "run_id": cfg.outputs["run_id"]}
    data_task = prepare(**common)
    dataset = data_task.outputs["dataset"]
    train_task = train(**common, dataset=dataset)
    # A training result is only reused when every input is the same; the run id is an input,
    # so a new run always trains.
    model_ckpt = train_task.outputs["model"]
    eval_task = evaluate(**common, dataset=dataset, model=model_ckpt)
    export_task = export(**common, dataset=dataset, model=model_ckpt)
    quant_task = quantize(**common, dataset=dataset, onnx=export_task.outputs["onnx"])
    reg_task = register(
        **common,
        dataset=dataset,
        onnx=export_task.outputs["onnx"],
        torchscript=export_task.outputs["torchscript"],
        int8=quant_task.outputs["int8"],
        gate_passed=eval_task.outputs["gate_passed"],
    )
    return reg_task.outputs["Output"]
