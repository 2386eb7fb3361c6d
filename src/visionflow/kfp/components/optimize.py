from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def optimize(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    model: Input[Model],
    optimized: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Prune the trained network to `optimize.target_macs` of its MACs and fine-tune it
    (`optimize=prune`); measures parameters, MACs, latency and the test metric before and after.

    Not part of the training pipeline yet: a component for pipelines of your own, between train
    and evaluate/export (which take `optimized` as their `model`).

    Args:
        overrides: Hydra overrides for this run (with optimize=prune).
        run_id: The run's id.
        dataset: The prepared dataset.
        model: The trained checkpoint.
        optimized: Points at the pruned, fine-tuned checkpoint; its file holds the step's result.
        metrics: Before and after: parameters, MACs, latency at batch 64, the test metric.
        report: The same as a table.
    """
    from visionflow.kfp.io import step_config, uri_of, write_pointer
    from visionflow.retry import retrying
    from visionflow.steps.optimize import optimize as run
    from visionflow.steps.optimize import report_markdown

    cfg = step_config(overrides, run_id)
    r = retrying(run)(cfg, dataset_id=dataset.metadata["dataset_id"], checkpoint_uri=uri_of(model))
    write_pointer(optimized, r.checkpoint_uri, r, macs_kept=r.macs_kept, speedup=r.speedup,
                  score_drop=r.score_drop)  # fmt: skip
    for key in ("params_before", "params_after", "macs_before", "macs_after", "latency_ms_before",
                "latency_ms_after", "score_before", "score_after", "speedup", "score_drop"):  # fmt: skip
        metrics.log_metric(key, float(getattr(r, key)))
    with open(report.path, "w") as f:
        f.write(report_markdown(r) + "\n")
