from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    overrides: list,
    run_id: str,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train with Lightning; checkpoints go to the artifact store, metrics to MLflow.

    On Kubernetes the training runs as a PyTorchJob over `cluster.nodes` pods (see
    visionflow.cluster); the step follows it and outputs the model rank 0 stored. Rerunning with
    the same run_id resumes from the last checkpoint.

    Args:
        overrides: Hydra overrides for this run.
        run_id: The run's id.
        dataset: The prepared dataset.
        model: Points at the best checkpoint; its file holds the train step's result.
        metrics: The best value of the task's validation metric, training length, and the
            last epoch's throughput (images/s, step time, data wait, GPU use: `perf_*`).
    """
    import math

    from visionflow.kfp.io import step_config, write_pointer
    from visionflow.retry import retrying
    from visionflow.steps.train import train_anywhere

    cfg = step_config(overrides, run_id)
    r = retrying(train_anywhere)(cfg, overrides, dataset_id=dataset.metadata["dataset_id"])
    write_pointer(model, r.checkpoint_uri, r, mlflow_run_id=r.mlflow_run_id, task=r.spec["task"],
                  monitor=r.monitor, best_score=r.best_score,
                  resumed_from_step=r.resumed_from_step)  # fmt: skip
    metrics.log_metric("best_" + r.monitor.replace("/", "_"), r.best_score)
    metrics.log_metric("global_step", r.global_step)
    for key, value in r.final_metrics.items():  # telemetry; a GPU's only where sampled
        if key.startswith("perf/") and math.isfinite(value):
            metrics.log_metric(key.replace("/", "_"), value)
