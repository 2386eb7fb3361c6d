from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def configure_predict(
    model: str,
    input: str,
    output: str,
    shard_size: int,
    batch_size: int,
    top_k: int,
    max_bad_fraction: float,
    variant: str,
    overrides: list,
    run_id: str,
    pipeline_job: str,
    config: Output[Markdown],
) -> NamedTuple("Configured", overrides=list, run_id=str):
    """Turn the batch inference pipeline's parameters into Hydra overrides, check them, show them.

    Args:
        model: Registered model: NAME@ALIAS, NAME/VERSION or NAME (the latest version).
        input: The images: a directory or s3://bucket/prefix, searched recursively.
        output: Where the Parquet files go (s3://bucket/prefix); empty: predictions/<run_id>/ in the artifact store.
        shard_size: Images per Parquet file (a finished file is never redone); 0 keeps the config's.
        batch_size: Images per model call; 0 keeps the config's.
        top_k: Classification: labels kept per image; 0 keeps the config's.
        max_bad_fraction: Share of undecodable images that fails the step; negative keeps the config's.
        variant: auto (int8 where it is faster here), fp32 or int8; empty keeps the config's.
        overrides: More Hydra overrides (`key=value`), applied last.
        run_id: The run's id; a rerun with the same id resumes, skipping finished shards. Empty: the KFP job's name.
        pipeline_job: Filled in by KFP with the pipeline job's name.
        config: The resolved `predict` settings, for a person to read.
    """
    from omegaconf import OmegaConf

    from visionflow.kfp.io import PREDICT_KNOBS, configure_step
    from visionflow.steps.predict import check_config

    resolved, run, cfg = configure_step(
        dict(model=model, input=input, output=output, shard_size=shard_size,
             batch_size=batch_size, top_k=top_k, max_bad_fraction=max_bad_fraction,
             variant=variant),
        overrides, run_id, pipeline_job, PREDICT_KNOBS,
    )  # fmt: skip
    check_config(cfg)
    with open(config.path, "w") as f:
        f.write(f"# batch inference run {run}\n\n```yaml\n{OmegaConf.to_yaml(cfg.predict)}```\n")
    return NamedTuple("Configured", overrides=list, run_id=str)(resolved, run)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def predict(
    overrides: list,
    run_id: str,
    predictions: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> str:
    """Batch inference: a registered model over a directory or S3 prefix of images, into Parquet.

    One Parquet file per shard of `predict.shard_size` images; rerun with the same run_id, the
    step resumes its stored plan (the same images, model version and variant) and skips the
    shards already written.

    Args:
        overrides: Hydra overrides for this run (`predict.model=...`, `predict.input=...`).
        run_id: The run's id.
        predictions: Points at the Parquet files (their store prefix); metadata holds counts.
        metrics: Images, undecodable images, images/s, and the class histogram.
        report: The class histogram as a bar chart and a table, and the undecodable images.

    Returns:
        The step's result as one JSON line (at most 100 undecodable images named; all of them
        are in the `_bad_images.json` beside the predictions).
    """
    import dataclasses
    import json

    from visionflow.kfp.io import step_config, write_pointer
    from visionflow.kfp.reports import predict_html
    from visionflow.retry import retrying
    from visionflow.steps.predict import predict as run

    cfg = step_config(overrides, run_id)
    r = retrying(run)(cfg)
    write_pointer(predictions, r.output, model_name=r.model_name, model_version=r.model_version,
                  variant=r.variant, task=r.task, images=r.images, predicted=r.predicted,
                  bad_images=len(r.bad_images), shards=r.shards)  # fmt: skip
    for key in ("images", "predicted", "shards", "shards_skipped", "images_per_s"):
        metrics.log_metric(key, getattr(r, key))
    metrics.log_metric("bad_images", len(r.bad_images))
    metrics.log_metric("model_version", r.model_version)
    for label, value in r.histogram.items():
        metrics.log_metric(f"class_{label}", value)
    with open(report.path, "w") as f:
        f.write(predict_html(cfg, r))
    out = dataclasses.asdict(r)
    out["bad_images"] = out["bad_images"][:100]
    return json.dumps({"run_id": run_id, **out})
