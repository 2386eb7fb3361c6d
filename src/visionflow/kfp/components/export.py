from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    model: Input[Model],
    onnx: Output[Model],
    torchscript: Output[Model],
    parity: Output[Metrics],
):
    """Export to ONNX (dynamic batch) and TorchScript; both checked against PyTorch on test images.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: The prepared dataset (test images for the parity check).
        model: The checkpoint to export.
        onnx: The fp32 ONNX model; its file holds the export step's result (both files' URIs,
            parity, the checkpoint's task, classes and image size), for quantize and register.
        torchscript: The TorchScript model.
        parity: Max |logit difference| and top-1 agreement of each export.
    """
    from visionflow.kfp.io import step_config, uri_of, write_pointer
    from visionflow.retry import retrying
    from visionflow.steps.export import export as run

    r = retrying(run)(
        step_config(overrides, run_id),
        dataset_id=dataset.metadata["dataset_id"],
        checkpoint_uri=uri_of(model),
    )
    write_pointer(onnx, r.onnx_uri, r, max_abs_diff=r.onnx.max_abs_diff,
                  image_size=r.image_size, exporter=r.onnx_exporter)  # fmt: skip
    write_pointer(
        torchscript,
        r.torchscript_uri,
        max_abs_diff=r.torchscript.max_abs_diff,
        image_size=r.image_size,
    )
    for name, p in (("onnx", r.onnx), ("torchscript", r.torchscript)):
        parity.log_metric(f"{name}_max_abs_diff", p.max_abs_diff)
        parity.log_metric(f"{name}_agreement", p.agreement)
