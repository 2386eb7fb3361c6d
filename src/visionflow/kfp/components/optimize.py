from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def optimize(
    overrides: list,
    run_id: str,
    method: str,
    dataset: Input[Dataset],
    model: Input[Model],
    optimized: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Prune the trained network to `optimize.target_macs` of its MACs and fine-tune it
    (`optimize=prune`); measures parameters, MACs, latency and the test metric before and after.
    With `optimize.method=none` (the default) it passes train's checkpoint through unchanged.

    On Kubernetes the pruning and fine-tuning run as a cluster job on the training nodes, like
    train's (see visionflow.cluster); the step follows it and outputs what rank 0 recorded.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        method: The run's `optimize.method`, as configure resolved it: `prune`, or `none` to
            pass train's checkpoint through without loading the config, torch or the data.
        dataset: The prepared dataset.
        model: train's output: the trained checkpoint and train's result.
        optimized: The run's model for evaluate, export and register: the pruned, fine-tuned
            checkpoint, or train's; its file holds train's result and optimize's (null when
            nothing was optimized).
        metrics: Before and after: parameters, MACs, latency at batch 64, the test metric.
        report: The same as a table, or how to switch pruning on.
    """
    from visionflow.kfp.io import read_result, step_config, write_model
    from visionflow.kfp.reports import NOT_OPTIMIZED
    from visionflow.results import TrainResult

    trained = read_result(model, TrainResult)
    if method == "none":
        write_model(optimized, trained, None, method="none")
        with open(report.path, "w") as f:
            f.write(NOT_OPTIMIZED)
        return

    from visionflow.retry import retrying
    from visionflow.steps.optimize import optimize_anywhere, report_markdown

    r = retrying(optimize_anywhere)(
        step_config(overrides, run_id),
        overrides,
        dataset_id=dataset.metadata["dataset_id"],
        checkpoint_uri=trained.checkpoint_uri,
    )
    assert r is not None  # this process is rank 0, or followed the job that recorded it
    write_model(optimized, trained, r, method=r.method, macs_kept=r.macs_kept, speedup=r.speedup,
                score_drop=r.score_drop)  # fmt: skip
    for key in ("params_before", "params_after", "macs_before", "macs_after", "latency_ms_before",
                "latency_ms_after", "score_before", "score_after", "speedup", "score_drop"):  # fmt: skip
        metrics.log_metric(key, float(getattr(r, key)))
    with open(report.path, "w") as f:
        f.write(report_markdown(r) + "\n")
