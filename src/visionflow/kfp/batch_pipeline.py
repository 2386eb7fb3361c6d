"""The batch inference pipeline: configure → predict, beside the training pipeline.

A registered model (`name@alias`, `name/version`) over a directory or an S3 prefix of images,
into Parquet files in the artifact store (visionflow.steps.predict). Its steps get what the
training pipeline's get on a cluster (visionflow.kfp.pipeline.on_cluster: the release's env
ConfigMap and cluster config, the S3 Secret, resources, /dev/shm). A run's parameters are checked
against the same allow-list (`predict.*` and the rest of README "Run parameters"); rerun with the
same `run_id`, a killed or failed run resumes, skipping the shards it finished.
"""

from kfp import dsl

from visionflow.kfp.components.predict import configure_predict, predict
from visionflow.kfp.pipeline import on_cluster


@dsl.pipeline(
    name="visionflow-batch-inference",
    description="A registered vision model over a directory or S3 prefix of images, into Parquet.",
)
def batch_inference_pipeline(
    model: str = "",
    input: str = "",
    output: str = "",
    shard_size: int = 0,
    batch_size: int = 0,
    top_k: int = 0,
    max_bad_fraction: float = -1.0,
    variant: str = "",
    overrides: list = [],  # noqa: B006  (KFP reads the default as the parameter's default)
    run_id: str = "",
) -> str:
    cfg = configure_predict(
        model=model, input=input, output=output, shard_size=shard_size, batch_size=batch_size,
        top_k=top_k, max_bad_fraction=max_bad_fraction, variant=variant, overrides=overrides,
        run_id=run_id, pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )  # fmt: skip
    # Never cached: the same parameters over an input that changed must predict again (a rerun
    # with the same run_id resumes from the shards in the store instead).
    predict_task = predict(overrides=cfg.outputs["overrides"], run_id=cfg.outputs["run_id"])
    predict_task.set_caching_options(enable_caching=False)
    on_cluster(cfg, "configure")
    on_cluster(predict_task, "predict")
    return predict_task.outputs["Output"]
