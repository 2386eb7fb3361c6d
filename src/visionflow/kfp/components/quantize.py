from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def quantize(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    onnx: Input[Model],
    int8: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Portable int8 static quantization, measured against fp32 side by side on this host.

    int8 that loses more than `quantize.max_accuracy_drop` points is rejected and the run goes on
    with fp32 (`quantize.required=true` fails instead); a task without int8 support (detection)
    records why and goes on with fp32.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: The prepared dataset (training images calibrate, test images measure).
        onnx: The fp32 ONNX model, with the export step's result (the model's task, image size).
        int8: The int8 ONNX model (its uri is empty where none was stored, with the reason);
            its file holds the quantize step's result, for register.
        metrics: The task's metric for both, the drop in points, agreement, speed-ups at batch 1 and 64.
        report: fp32 and int8 side by side, the host's CPU, and which variant is faster there.
    """
    from visionflow.kfp.io import read_result, step_config, write_pointer
    from visionflow.kfp.reports import quantize_report
    from visionflow.results import ExportResult
    from visionflow.retry import retrying
    from visionflow.steps.quantize import quantize as run

    r = retrying(run)(
        step_config(overrides, run_id),
        dataset_id=dataset.metadata["dataset_id"],
        exported=read_result(onnx, ExportResult),
    )
    write_pointer(int8, r.int8_uri, r, status=r.status, reason=r.reason, accuracy_drop=r.accuracy_drop,
                  speedup_b1=r.speedup_b1, speedup_b64=r.speedup_b64, serve_variant=r.serve_variant)  # fmt: skip
    for key in ("fp32_score", "int8_score", "accuracy_drop", "speedup_b1", "speedup_b64"):
        if getattr(r, key) is not None:
            metrics.log_metric(key, getattr(r, key))
    if r.parity is not None:
        metrics.log_metric("agreement", r.parity.agreement)
    with open(report.path, "w") as f:
        f.write(quantize_report(r))
