from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def quantize(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    onnx: Input[Model],
    int8: Output[Model],
    metrics: Output[Metrics],
):
    """int8 static quantization; metric drop and speed-up against fp32 measured side by side.

    For a task without int8 support (detection) it records why and the run goes on with fp32.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: The prepared dataset (training images calibrate, test images measure).
        onnx: The fp32 ONNX model.
        int8: The int8 ONNX model (its uri is empty where the task has none).
        metrics: The task's metric for both, the drop in points, the speed-ups at batch 1 and 64.
    """
    from visionflow.pipeline_io import step_config, uri_of, write_pointer
    from visionflow.steps.quantize import quantize as run

    r = run(
        step_config(overrides, run_id),
        dataset_id=dataset.metadata["dataset_id"],
        onnx_uri=uri_of(onnx),
    )
    write_pointer(int8, r.int8_uri, supported=r.supported, reason=r.reason,
                  accuracy_drop=r.accuracy_drop, speedup_b64=r.speedup_b64)  # fmt: skip
    for key in ("fp32_score", "int8_score", "accuracy_drop", "speedup_b1", "speedup_b64"):
        if getattr(r, key) is not None:
            metrics.log_metric(key, getattr(r, key))
