from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    onnx: Input[Model],
    torchscript: Input[Model],
    int8: Input[Model],
    gate_passed: bool,
    report: Output[Markdown],
) -> str:
    """Register the model in MLflow; move the `champion` alias if it passed the gate and is better.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: The prepared dataset (its test split decides the champion).
        onnx: The fp32 ONNX model.
        torchscript: The TorchScript model.
        int8: The int8 ONNX model.
        gate_passed: The quality gate's verdict from evaluate.
        report: The registered version and the champion decision.

    Returns:
        The run's summary as one JSON line.
    """
    import json

    from visionflow.kfp.io import step_config, uri_of
    from visionflow.retry import retrying
    from visionflow.runs import summary
    from visionflow.steps.register import register as run
    from visionflow.storage import open_store

    cfg = step_config(overrides, run_id)
    r = retrying(run)(cfg, dataset_id=dataset.metadata["dataset_id"], onnx_uri=uri_of(onnx), int8_uri=uri_of(int8),
            torchscript_uri=uri_of(torchscript), gate_passed=gate_passed)  # fmt: skip
    with open(report.path, "w") as f:
        f.write(f"**{r.model_name} v{r.model_version}**; champion: {r.champion} ({r.reason})\n")
    return json.dumps(
        summary(open_store(cfg.storage.root, cfg.storage.endpoint), run_id, cfg.tracking.uri)
    )
