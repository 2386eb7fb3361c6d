from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from visionflow.kfp.components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def configure(
    data: str,
    data_root: str,
    data_test_root: str,
    model: str,
    optimize: str,
    max_epochs: int,
    batch_size: int,
    learning_rate: float,
    min_score: float,
    max_int8_drop: float,
    registered_model_name: str,
    overrides: list,
    run_id: str,
    pipeline_job: str,
    config: Output[Markdown],
) -> NamedTuple("Configured", overrides=list, run_id=str, optimize_method=str):
    """Turn the pipeline's parameters into Hydra overrides, check them, and show the config;
    the resolved `optimize.method` tells the optimize step whether it has anything to do.

    Args:
        data: Dataset config (`shapes`, `imagefolder`); empty keeps the config's.
        data_root: Image tree for `imagefolder`: a path or s3://bucket/prefix.
        data_test_root: Separate test tree (e.g. ImageNet's val); empty carves one from data_root.
        model: Registered model name (e.g. `resnet18`); empty keeps the config's.
        optimize: `prune` prunes and fine-tunes the trained network before evaluate and export
            (`optimize.target_macs`, `optimize.epochs` in overrides); empty keeps the config's
            (`none`: the trained network as it is).
        max_epochs: Training epochs; 0 keeps the config's.
        batch_size: Batch size; 0 keeps the config's.
        learning_rate: Peak learning rate; 0 keeps the config's.
        min_score: Quality gate on the task's main test metric (accuracy, mAP@.5, mIoU); negative keeps the config's.
        max_int8_drop: Largest allowed int8 accuracy drop in points; negative keeps the config's.
        registered_model_name: MLflow registered model name; empty: visionflow-<data>.
        overrides: More Hydra overrides (`key=value`), applied last.
        run_id: The run's id; a rerun with the same id resumes training. Empty: the KFP job's name.
        pipeline_job: Filled in by KFP with the pipeline job's name.
        config: The resolved config, for a person to read.
    """
    from omegaconf import OmegaConf

    from visionflow.kfp.io import configure_step

    resolved, run, cfg = configure_step(
        dict(data=data, data_root=data_root, data_test_root=data_test_root, model=model,
             optimize=optimize, max_epochs=max_epochs, batch_size=batch_size,
             learning_rate=learning_rate, min_score=min_score, max_int8_drop=max_int8_drop,
             registered_model_name=registered_model_name),
        overrides, run_id, pipeline_job,
    )  # fmt: skip
    with open(config.path, "w") as f:
        f.write(f"# run {run}\n\n```yaml\n{OmegaConf.to_yaml(cfg)}```\n")
    return NamedTuple("Configured", overrides=list, run_id=str, optimize_method=str)(
        resolved, run, cfg.optimize.method
    )
