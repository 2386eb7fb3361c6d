from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
    onnx: Input[Model],
    int8: Input[Model],
    report: Output[Markdown],
) -> str:
    """Register the model in MLflow; move the `champion` alias if it passed the gate and is better.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: The prepared dataset (its test split decides the champion).
        model: The run's model: optimize's output (or train's), for the run's summary: the
            MLflow run, the checkpoints, optimize's figures where it pruned.
        evaluation: evaluate's result: the test score and the quality gate's verdict.
        onnx: The fp32 ONNX model, with export's result (the TorchScript file, parity).
        int8: The int8 ONNX model, with quantize's result (stored or why not, speed-ups).
        report: The registered version and the champion decision.

    Returns:
        The run's summary as one JSON line.
    """
    import json

    from visionflow.kfp.io import read_model, read_result, step_config
    from visionflow.results import EvaluateResult, ExportResult, QuantizeResult
    from visionflow.retry import retrying
    from visionflow.runs import summary
    from visionflow.steps.register import register as run

    cfg = step_config(overrides, run_id)
    evaluated, exported = read_result(evaluation, EvaluateResult), read_result(onnx, ExportResult)
    quantized = read_result(int8, QuantizeResult)
    r = retrying(run)(cfg, dataset.metadata["dataset_id"], evaluated, exported, quantized)
    with open(report.path, "w") as f:
        f.write(f"**{r.model_name} v{r.model_version}**; champion: {r.champion} ({r.reason})\n")
    trained, optimized = read_model(model)
    return json.dumps(
        summary(
            cfg.tracking.uri,
            run_id,
            dataset.metadata["uri"],
            trained,
            evaluated,
            exported,
            quantized,
            r,
            optimized,
        )  # fmt: skip
    )
